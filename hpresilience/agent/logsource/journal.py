"""The journal, through `journalctl -f -o json` as a child process."""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..kernel_line import KernelLine
from .common import (
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_BYTES,
    MAX_LINE_BYTES,
    Anomalies,
    Cursor,
    LineSplitter,
    LogLine,
    LogSourceError,
    decode_lines,
    log,
    log_capped,
)

_BACKOFF_MIN_SECONDS = 1.0
_BACKOFF_MAX_SECONDS = 60.0
_HEALTHY_RUN_SECONDS = 60.0  # a journalctl that ran this long before dying resets the backoff
_JSON_LINE_CAP = 1024 * 1024  # JSON escaping can grow a 64 KiB message several times over


class JournalSource:
    """`journalctl -f -o json` as a child process, read without blocking.

    It follows the kernel's messages (`-k`, this boot). The cursor (`__CURSOR`
    of the last entry) is saved in state_dir and passed as --after-cursor
    on every (re)start; without one, entries of the last
    max_age_seconds are read (--since), like KmsgSource. Entries older than
    max_age_seconds are dropped here too, whatever journalctl returns. A
    journalctl that exits is restarted with exponential backoff (1 s .. 60 s).
    If it rejects the saved cursor (journal vacuumed, file corrupted), it is
    restarted from "now": a replay of the last hour could re-flag old faults.
    Every line carries the entry's __REALTIME_TIMESTAMP (issue 9, defect 10).
    """

    def __init__(self, state_dir: os.PathLike, *, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
                 journalctl: str = "journalctl", max_line_bytes: int = MAX_LINE_BYTES) -> None:
        exe = shutil.which(journalctl)
        if exe is None:
            raise LogSourceError(f"{journalctl!r} not found on PATH: install systemd's journalctl (package "
                                 "'systemd' on Debian, Ubuntu and RHEL) or use the 'kmsg' source or a log file")
        self.name = "journal"
        self._argv = [exe, "-k", "--follow", "--output=json", "--all", "--no-pager", "--lines=all"]
        self._max_age = max_age_seconds
        self._cap = max_line_bytes
        self._anomalies = Anomalies(self.name)
        self._state = Cursor(Path(state_dir), self.name)
        saved = self._state.load(max_age_seconds)
        self._cursor: Optional[str] = saved.get("cursor") if saved else None
        self._since = time.time() - max_age_seconds  # where to start when there is no cursor
        self._proc: Optional[subprocess.Popen] = None
        self._splitter = LineSplitter(_JSON_LINE_CAP, math.inf)  # half a JSON object is worthless
        self._stderr = b""
        self._started_at = 0.0
        self._entries_this_run = 0
        self._backoff = _BACKOFF_MIN_SECONDS
        self._next_start = 0.0
        self._closed = False

    def read(self, max_bytes: int = DEFAULT_MAX_BYTES) -> List[LogLine]:
        if self._closed:
            return []
        now = time.monotonic()
        if self._proc is None:
            if now < self._next_start:
                return []
            self._spawn(now)
            if self._proc is None:
                return []
        proc = self._proc
        raws: List[bytes] = []
        eof = False
        used = 0
        while used < max_bytes:
            try:
                data = os.read(proc.stdout.fileno(), min(65536, max_bytes - used))
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            used += len(data)
            raws.extend(self._splitter.feed(data, now))
        self._drain_stderr()
        lines = self._entries(raws)
        if eof:
            self._reap(now)
        log_capped(self._splitter, self.name, _JSON_LINE_CAP)
        if self._cursor is not None:
            self._state.save({"cursor": self._cursor})
        return lines

    def lag_bytes(self) -> int:
        """Bytes journalctl has written into the pipe that read() has not returned yet."""
        if self._proc is None:
            return 0
        buf = bytearray(struct.pack("i", 0))
        try:
            fcntl.ioctl(self._proc.stdout.fileno(), termios.FIONREAD, buf)
        except OSError:
            return self._splitter.held
        return struct.unpack("i", buf)[0] + self._splitter.held

    @property
    def errors(self) -> int:
        return self._anomalies.errors

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        if self._cursor is not None:
            self._state.save({"cursor": self._cursor}, force=True)

    # ---------------------------------------------------------------- internals
    def _command(self) -> List[str]:
        if self._cursor is not None:
            return [*self._argv, f"--after-cursor={self._cursor}"]
        return [*self._argv, f"--since=@{int(self._since)}"]

    def _spawn(self, now: float) -> None:
        argv = self._command()
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, close_fds=True)
        except OSError as e:
            self._anomalies.report("spawn", "logsource.journalctl_failed", argv=argv, error=str(e))
            self._schedule_restart(now)
            return
        self._anomalies.resolved("spawn")
        os.set_blocking(self._proc.stdout.fileno(), False)
        os.set_blocking(self._proc.stderr.fileno(), False)
        self._started_at = now
        self._entries_this_run = 0
        self._stderr = b""
        log.info("logsource.journalctl_started", source=self.name, pid=self._proc.pid,
                 after_cursor=self._cursor is not None)

    def _entries(self, raws: List[bytes]) -> List[LogLine]:
        lines, cursor, entries = journal_lines(raws, self.name, max_age_seconds=self._max_age, cap=self._cap)
        if cursor is not None:
            self._cursor = cursor
        self._entries_this_run += entries
        return lines

    def _drain_stderr(self) -> None:
        assert self._proc is not None
        try:
            while True:
                data = os.read(self._proc.stderr.fileno(), 65536)
                if not data:
                    return
                self._stderr = (self._stderr + data)[-2048:]  # the end says why it failed
        except OSError:  # BlockingIOError included: nothing more for now
            return

    def _reap(self, now: float) -> None:
        assert self._proc is not None
        used_cursor = any(a.startswith("--after-cursor=") for a in self._proc.args)
        rc = self._stop()
        stderr = self._stderr.decode("utf-8", "replace").strip()
        if used_cursor and self._entries_this_run == 0 and rc != 0 and "cursor" in stderr.lower():
            log.warning("logsource.journal_cursor_dropped", source=self.name, stderr=stderr,
                        detail="journalctl rejected the saved cursor; following from now")
            self._cursor = None
            self._since = time.time()
        if now - self._started_at >= _HEALTHY_RUN_SECONDS:
            self._backoff = _BACKOFF_MIN_SECONDS
        # `journalctl --follow` never ends by itself: every exit is an error of the source.
        self._anomalies.occurred("logsource.journalctl_exited", returncode=rc, stderr=stderr,
                                 restart_in_seconds=self._backoff)
        self._schedule_restart(now)

    def _schedule_restart(self, now: float) -> None:
        self._next_start = now + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_SECONDS)

    def _stop(self) -> Optional[int]:
        """Ends journalctl (if running) and returns its exit status."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        self._splitter.flush()  # half an entry from a dead process is dropped; the cursor re-reads it
        return proc.returncode

def journal_lines(raws: List[bytes], source: str, *, max_age_seconds: float = math.inf, cap: int = MAX_LINE_BYTES
                  ) -> Tuple[List[LogLine], Optional[str], int]:
    """`journalctl -o json` output, one entry per raw line → (lines, the last entry's __CURSOR,
    entries read). Entries older than max_age_seconds and entries without a MESSAGE give no line.
    A line is the kernel's when the entry's _TRANSPORT says so (or, since `journalctl -k` reads
    nothing else, when it is absent); its wall time is the entry's __REALTIME_TIMESTAMP."""
    messages: List[bytes] = []
    meta: List[Tuple[Optional[float], bool]] = []
    cursor: Optional[str] = None
    entries = bad = too_old = capped = 0
    wall = time.time()
    for raw in raws:
        try:
            entry = json.loads(raw)
            entry_cursor = entry["__CURSOR"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        cursor = entry_cursor
        entries += 1
        stamp = _realtime(entry)
        if stamp is not None and wall - stamp > max_age_seconds:
            too_old += 1
            continue
        message = _message_bytes(entry.get("MESSAGE"))
        if message is None:
            bad += isinstance(entry.get("MESSAGE"), list)
            continue  # no MESSAGE field (or null): nothing to classify
        if len(message) > cap:
            capped += 1
            message = message[:cap]
        messages.append(message.replace(b"\n", b" "))
        meta.append((stamp, entry.get("_TRANSPORT", "kernel") == "kernel"))
    if bad:
        log.warning("logsource.journal_unparsable", source=source, entries=bad)
    if capped:
        log.warning("logsource.lines_capped", source=source, lines=capped, max_line_bytes=cap)
    if too_old:
        log.info("logsource.journal_skipped_old", source=source, entries=too_old, max_age_seconds=max_age_seconds)
    lines = [LogLine(text, source, wall, KernelLine(text.strip(), "journal", wall_time=stamp, from_kernel=kernel))
             for text, (stamp, kernel) in zip(decode_lines(messages, source), meta) if text is not None]
    return lines, cursor, entries


def _realtime(entry: Dict[str, Any]) -> Optional[float]:
    try:
        return int(entry["__REALTIME_TIMESTAMP"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


def _message_bytes(message: Any) -> Optional[bytes]:
    if isinstance(message, str):
        return message.encode("utf-8", "surrogatepass").replace(b"\x00", b"")
    if isinstance(message, list):  # journalctl's JSON for binary messages: a list of byte values
        try:
            return bytes(message).replace(b"\x00", b"")
        except (TypeError, ValueError):
            return None
    return None
