"""The agent's control socket (issue 13): the root-only path by which a drill injects a fault.

`hpresilience drill` (through `hpresilience agent inject`) asks a node's agent to act as if its kernel
log had shown a fault. The injected Finding goes the way a kernel-log finding goes (the policy's
events, then the main loop's decision and the actuator), so a drill proves the real path; it is marked
as a drill (monitor "drill", message "DRILL <id>: ...") in the Slurm reason, the controller's journal
and history, and the logs.

One connection, one request, one reply, each one JSON line::

    → {"inject": "XID_74", "entity": "GPU 0", "drill": "d1"}      (entity optional)
    ← {"ok": true, "finding": {...}}   or   {"ok": false, "error": "..."}

Only a code that the agent's own rules give an action for (reboot or replace) is accepted, through
RuleSet.finding_for: the rules are the one code → action table. Safety (docs/safety.md, I5): the socket
is 0600 (in a 0700 directory when the agent makes it) and the peer's uid, from SO_PEERCRED, must be 0;
the request is bounded in size and time, and its fields are checked against fixed forms, so nothing
but a root-chosen code, device name and drill id reaches a reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import structlog

from ..finding import Finding, NodeAction
from .kernel_rules import RuleSet

log = structlog.get_logger(__name__)

REQUEST_MAX_BYTES = 4096
REPLY_MAX_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
ROOT_UID = 0
DRILL_MONITOR = "drill"
DRILL_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,40}")
CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")            # a reason's [CODE] (slurm.reason)
ENTITY_RE = re.compile(r"[A-Za-z0-9 ._:()/+-]{1,64}")    # a device name: no brackets, quotes or control characters
REQUEST_KEYS = ("inject", "entity", "drill")


class ControlError(Exception):
    """The control socket cannot be served; the message names the path."""


class RequestError(ValueError):
    """A request refused; the message is the reply's error."""


@dataclass(frozen=True)
class Injection:
    code: str
    drill: str
    entity: Optional[str] = None


def parse_request(raw: bytes) -> Injection:
    """One request line → an Injection; RequestError says what is wrong with it."""
    try:
        data = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):  # RecursionError: deep nesting, which json does not bound
        raise RequestError("the request is not JSON") from None
    if not isinstance(data, dict):
        raise RequestError('expected one JSON object: {"inject": CODE, "drill": ID, "entity": E (optional)}')
    unknown = sorted(set(data) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} (known: {', '.join(REQUEST_KEYS)})")
    code, drill, entity = data.get("inject"), data.get("drill"), data.get("entity")
    if not isinstance(code, str) or not CODE_RE.fullmatch(code):
        raise RequestError("inject: expected a finding code (A-Z, 0-9, _), e.g. XID_74")
    if not isinstance(drill, str) or not DRILL_ID_RE.fullmatch(drill):
        raise RequestError("drill: expected a drill id of 1 to 40 characters A-Z a-z 0-9 . _ -")
    if entity is not None and (not isinstance(entity, str) or not ENTITY_RE.fullmatch(entity)):
        raise RequestError("entity: expected a device name of 1 to 64 characters A-Z a-z 0-9 space . _ : ( ) / + -")
    return Injection(code=code, drill=drill, entity=entity)


def drill_finding(rules: RuleSet, injection: Injection) -> Finding:
    """The finding the rules give for the injected fault, marked as the drill's."""
    found = rules.finding_for(injection.code, injection.entity)
    on = f" on {injection.entity!r}" if injection.entity else ""
    if found is None:
        raise RequestError(f"no enabled rule gives {injection.code}{on}")
    if found.action is NodeAction.NONE:
        raise RequestError(f"{injection.code}{on} asks for no action (rule {found.rule}): only faults that "
                           "reboot or replace a node can be injected")
    return dataclasses.replace(found, monitor=DRILL_MONITOR, message=f"DRILL {injection.drill}: {found.message}",
                               evidence=f"injected by drill {injection.drill} through the agent's control socket")


def refusal(uid: int) -> Optional[str]:
    """Why a peer with `uid` may not inject, None for root."""
    if uid == ROOT_UID:
        return None
    return f"only root may inject faults (this request came from uid {uid})"


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end, from the kernel (SO_PEERCRED), not from the request."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def read_line(conn: socket.socket, limit: int, timeout: float, what: str = "request") -> bytes:
    """One line (without its newline, or all until the peer's end), at most `limit` bytes, within
    `timeout` seconds in all: a client that says nothing or floods must not hold the socket."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        if len(data) > limit:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestError(f"no complete {what} within {timeout:g} s")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(limit + 1 - len(data))
        except socket.timeout:
            raise RequestError(f"no complete {what} within {timeout:g} s") from None
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0]
    if len(line) > limit:
        raise RequestError(f"{what} over {limit} bytes")
    return line


def request(path: Path, payload: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """The client's side: send one request, return the agent's reply. Raises OSError when the socket
    cannot be reached, RequestError for a reply that is not one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        raw = read_line(sock, REPLY_MAX_BYTES, timeout, what="reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise RequestError(f"not an agent's reply: {raw[:200]!r}")
    return reply


class ControlServer:
    """Listens on `path` (at construction; ControlError when it cannot) and, once started, serves one
    connection at a time on a daemon thread, handing each accepted injection to `inject`."""

    def __init__(self, path: Path, inject: Callable[[Injection], Finding],
                 timeout: float = REQUEST_TIMEOUT_SECONDS):
        self.path = path
        self.inject = inject
        self.timeout = timeout
        self._sock = _listen(path)
        self._identity = _identity(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept() (Linux)
        except OSError:
            pass  # never started, or already shut down
        self._thread.join(timeout=self.timeout + 1)  # a connection being served ends within its timeout
        self._sock.close()
        if _identity(self.path) == self._identity:  # ours still: a newer agent's socket is left alone
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if not self._stop.is_set():  # e.g. out of file descriptors: wait, not spin
                    log.error("agent.control_error", path=str(self.path), error=str(e))
                    self._stop.wait(1.0)
                continue
            with conn:
                try:
                    self._handle(conn)
                except Exception:  # one bad connection must not end the socket
                    log.exception("agent.control_error", path=str(self.path))

    def _handle(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        try:
            # Read (bounded) before any refusal: a reply sent while the client is still writing would
            # reach it as a broken pipe instead of the reason.
            raw = read_line(conn, REQUEST_MAX_BYTES, self.timeout)
            why = refusal(uid)
            if why is not None:
                log.warning("agent.control_refused", uid=uid, path=str(self.path))
                raise RequestError(why)
            finding = self.inject(parse_request(raw))
            reply: Dict[str, Any] = {"ok": True, "finding": finding.to_dict()}
        except RequestError as e:
            log.warning("agent.drill_rejected", uid=uid, error=str(e))
            reply = {"ok": False, "error": str(e)}
        conn.settimeout(self.timeout)
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as e:  # the client left: the injection (if any) stands
            log.warning("agent.control_reply_failed", error=str(e))


def _listen(path: Path) -> socket.socket:
    _prepare_dir(path.parent)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)   # the socket is born 0600: no chmod by path, which a swapped link could redirect
    try:
        sock.bind(str(path))
        sock.listen(8)
    except OSError as e:
        sock.close()
        raise ControlError(f"{path}: cannot listen: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    return sock


def _prepare_dir(directory: Path) -> None:
    """A directory the agent makes is 0700; one that exists (systemd's RuntimeDirectory) must be its
    owner's alone: in a directory others can write, they could plant a socket that answers (disabling
    ours) or one for the stale check to remove (issue 13 review)."""
    if directory.is_dir():
        st = directory.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ControlError(f"{directory}: the control socket's directory must be owned by the agent's user "
                               f"and writable by it alone (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
    except OSError as e:
        raise ControlError(f"{directory}: cannot create the control socket's directory: {e.strerror or e}") from None


def _remove_stale(path: Path) -> None:
    """A socket left by an earlier run is replaced; anything else at the path is an error, never removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket: not replaced (remove it, or set another "
                           "[agent] control_socket)")
    if _answers(path):
        raise ControlError(f"{path}: another process serves this socket (a second agent?)")
    path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _identity(path: Path) -> Optional[tuple]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
