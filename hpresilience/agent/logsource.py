"""Kernel-log sources: what is new in a log file, /dev/kmsg or the journal, now.

Every source answers one question without blocking: "which lines appeared
since I last asked?", within a byte budget so a flood costs bounded memory and
CPU per poll. Classifying lines is someone else's job (kernel_rules).

Lessons this module is built around:
- node-problem-detector replayed old kmsg lines after a restart (PR #1259) and
  flagged nodes for faults a reboot had already cleared. Every source persists
  a cursor in state_dir and resumes after it; with no cursor it starts at "now"
  (files: end of file; kmsg/journal: records younger than max_age_seconds,
  Azure healthagent's one-hour rule).
- NPD's kmsg reader closed silently under a flood (#1168). Nothing here stops
  following on an error: I/O errors are logged once and retried on the next
  read(), a dead journalctl is restarted with backoff.
- A line is at most `max_line_bytes`; the rest of an over-long line is
  discarded, so a 1 MB line or a binary file never grows a buffer unbounded.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Set, Tuple, runtime_checkable

import structlog

from ..statefile import read_json, write_json

log = structlog.get_logger(__name__)

DEFAULT_MAX_BYTES = 1024 * 1024
MAX_LINE_BYTES = 64 * 1024
PARTIAL_TIMEOUT_SECONDS = 1.0
DEFAULT_MAX_AGE_SECONDS = 3600.0
SAVE_INTERVAL_SECONDS = 1.0
# Re-written even when unchanged, so a restart can tell how long the agent was away.
HEARTBEAT_SECONDS = 60.0
# Bytes remembered before the read position: if they change, the file was rewritten under us.
_SIG_BYTES = 32


@dataclass(frozen=True)
class LogLine:
    text: str           # decoded with errors="replace"; no trailing newline, no NUL
    source: str         # the source's name, e.g. "kmsg" or "file:/var/log/messages"
    received_at: float  # time.time() when read, not when the kernel logged it


@runtime_checkable
class LogSource(Protocol):
    name: str

    def read(self, max_bytes: int = DEFAULT_MAX_BYTES) -> List[LogLine]:
        """What is new now (possibly nothing), about max_bytes at most; never blocks, never raises on I/O."""
        ...

    def lag_bytes(self) -> int:
        """Bytes known to be waiting that read() has not returned yet."""
        ...

    def close(self) -> None:
        ...


class LogSourceError(Exception):
    """The source cannot work at all here (missing program, no permission); raised at construction."""


# --------------------------------------------------------------------------- shared parts
class _Anomalies:
    """Logs each anomaly once when it starts, not on every poll while it lasts."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._active: Set[str] = set()

    def report(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._active:
            self._active.add(key)
            log.warning(event, source=self._source, **fields)

    def resolved(self, key: str, event: Optional[str] = None, **fields: Any) -> None:
        if key in self._active:
            self._active.discard(key)
            if event:
                log.info(event, source=self._source, **fields)


class _Cursor:
    """A source's position in state_dir, written atomically (statefile: temp + rename).

    Written at most once per SAVE_INTERVAL while it changes, every HEARTBEAT
    while idle and always on close, so `saved_at` says when the agent was last
    alive and caught up: a restart compares it with max_age_seconds."""

    def __init__(self, state_dir: Path, name: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:60]
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]  # two paths may share a slug
        self.path = Path(state_dir) / f"logsource-{slug}-{digest}.json"
        self._name = name
        self._last: Optional[Dict[str, Any]] = None
        self._last_at = -math.inf
        self._failing = False

    def load(self, max_age_seconds: float) -> Optional[Dict[str, Any]]:
        """The saved position, or None when there is none or it is too old to resume from."""
        data = read_json(self.path, None)
        if data is None:
            return None
        saved_at = data.get("saved_at") if isinstance(data, dict) else None
        if not isinstance(saved_at, (int, float)):
            log.warning("logsource.cursor_invalid", source=self._name, path=str(self.path))
            return None
        away = time.time() - saved_at
        if away > max_age_seconds:
            # Lines written while we were away that long describe faults that may be
            # long repaired; replaying them drains healthy nodes (NPD PR #1259).
            log.info("logsource.cursor_stale", source=self._name, away_seconds=round(away),
                     max_age_seconds=max_age_seconds)
            return None
        return data

    def save(self, state: Dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force:
            since = now - self._last_at
            if since < SAVE_INTERVAL_SECONDS or (state == self._last and since < HEARTBEAT_SECONDS):
                return
        try:
            write_json(self.path, {**state, "saved_at": time.time()})
        except OSError as e:
            if not self._failing:
                log.warning("logsource.cursor_write_failed", source=self._name, path=str(self.path), error=str(e))
            self._failing = True
            self._last_at = now  # retry at the next interval, not on every poll
            return
        if self._failing:
            log.info("logsource.cursor_write_recovered", source=self._name)
        self._failing = False
        self._last = dict(state)
        self._last_at = now


class _LineSplitter:
    """Cuts a byte stream into lines, holding at most `cap` bytes of an unfinished one.

    A line longer than `cap` is emitted cut to `cap` as soon as it is that long,
    and the rest is dropped up to its newline. An unfinished line held for
    `timeout` seconds is emitted anyway (a writer that crashed mid-line never
    sends the newline); whatever arrives after it then comes as its own line."""

    def __init__(self, cap: int, timeout: float) -> None:
        self._cap = cap
        self._timeout = timeout
        self._partial = b""
        self._partial_since = 0.0
        self._discarding = False
        self.capped = 0  # lines cut since the owner last took the count

    @property
    def held(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes, now: float) -> List[bytes]:
        pieces = data.split(b"\n")
        tail = pieces.pop()
        if pieces:
            if self._discarding:
                del pieces[0]  # the end of an over-long line already emitted cut
                self._discarding = False
            elif self._partial:
                pieces[0] = self._partial + pieces[0]
            self._partial = b""
            if max(map(len, pieces), default=0) > self._cap:
                self.capped += sum(1 for p in pieces if len(p) > self._cap)
                pieces = [p[:self._cap] for p in pieces]
        if self._discarding or not tail:
            return pieces
        if not self._partial:
            self._partial_since = now
        self._partial += tail
        if len(self._partial) > self._cap:
            pieces.append(self._partial[:self._cap])
            self.capped += 1
            self._partial = b""
            self._discarding = True
        return pieces

    def stale(self, now: float) -> List[bytes]:
        if self._partial and now - self._partial_since >= self._timeout:
            return self.flush()
        return []

    def flush(self) -> List[bytes]:
        """The unfinished line, now: its stream ended (rotation, truncation, deletion)."""
        out = [self._partial] if self._partial else []
        self._partial = b""
        self._discarding = False
        return out


def _to_lines(raws: List[bytes], source: str) -> List[LogLine]:
    now = time.time()
    out: List[LogLine] = []
    undecodable = 0
    for raw in raws:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            undecodable += 1
        out.append(LogLine(text, source, now))
    if undecodable:
        # Not an _Anomalies key: each batch of bad bytes is its own occurrence.
        log.info("logsource.undecodable_lines", source=source, lines=undecodable)
    return out


def _log_capped(splitter: _LineSplitter, source: str, cap: int) -> None:
    if splitter.capped:
        log.warning("logsource.lines_capped", source=source, lines=splitter.capped, max_line_bytes=cap)
        splitter.capped = 0


# --------------------------------------------------------------------------- plain files
class FileSource:
    """Follows a log file the way `tail -F` does, without losing or replaying lines.

    Rotation (the path now names another inode): the old file is read to its
    end, its unfinished last line emitted, then the new file is read from its
    start. Lines a writer appends to the old file after that switch are lost,
    as with tail -F; logrotate HUPs the writer right after the rename.
    Truncation (copytruncate): the file shrank below our offset, or the bytes
    just before our offset changed (truncated and rewritten past our offset
    between two polls); read again from 0. Deletion: the deleted file is read to
    its end and closed (holding it would pin its disk space); the path is
    retried on every read and a new file is read from its start.

    Where to start:
    - no cursor (first start) or a cursor older than max_age_seconds: at the end
      of the file; what is already there is history, not news. A file that does
      not exist yet is read from its start when it appears.
    - cursor for the file at the path, whose bytes before the offset are
      unchanged: at the cursor's offset.
    - cursor for another inode (rotated while we were stopped): the cursor's
      file is looked for beside the path (logrotate renames within the
      directory: messages.1, messages-20240101) and read from the offset, then
      the current file from 0.
    - otherwise the cursor's position is gone (truncated, compressed away,
      replaced; a new file may even reuse the old inode number). The file is
      read from 0 when it was modified after the cursor was saved (truncated
      or created no earlier than our stop, so all of it is news), else from
      its end (an unchanged older file swapped in is history).
    The cursor records the start of the held unfinished line, so a restart
    reads that line again whole instead of losing it.
    """

    def __init__(self, path: os.PathLike, state_dir: os.PathLike, *,
                 max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS, max_line_bytes: int = MAX_LINE_BYTES,
                 partial_timeout_seconds: float = PARTIAL_TIMEOUT_SECONDS) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self._cap = max_line_bytes
        self._splitter = _LineSplitter(max_line_bytes, partial_timeout_seconds)
        self._anomalies = _Anomalies(self.name)
        self._cursor = _Cursor(Path(state_dir), self.name)
        self._fd: Optional[int] = None
        self._id: Tuple[int, int] = (-1, -1)  # (st_dev, st_ino) of the open file
        self._offset = 0                       # next byte of _fd to read
        self._sig = b""                        # the bytes just before _offset
        self._closed = False
        # An I/O error while placing ourselves is retried by read(); until then the saved cursor stays as is.
        self._initial_cursor = self._cursor.load(max_age_seconds)
        self._started = False
        try:
            self._start(self._initial_cursor)
        except OSError as e:
            self._anomalies.report("io_error", "logsource.io_error", path=str(self.path), error=str(e))

    # ---------------------------------------------------------------- public
    def read(self, max_bytes: int = DEFAULT_MAX_BYTES) -> List[LogLine]:
        if self._closed:
            return []
        raws: List[bytes] = []
        try:
            self._poll(raws, max_bytes)
            self._anomalies.resolved("io_error", "logsource.io_recovered")
        except OSError as e:
            self._anomalies.report("io_error", "logsource.io_error", path=str(self.path), error=str(e))
        raws.extend(self._splitter.stale(time.monotonic()))
        _log_capped(self._splitter, self.name, self._cap)
        self._save()
        return _to_lines(raws, self.name)

    def lag_bytes(self) -> int:
        lag = 0
        try:
            if self._fd is not None:
                lag = max(0, os.fstat(self._fd).st_size - self._offset)
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._id:
                lag += st.st_size  # a new file waits behind the one being drained (or none is open)
        except OSError:
            pass
        return lag

    def close(self) -> None:
        if self._closed:
            return
        self._save(force=True)
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---------------------------------------------------------------- start
    def _start(self, cursor: Optional[Dict[str, Any]]) -> None:
        fd = self._open_path()
        if fd is not None:
            try:
                self._place(fd, cursor)
            except OSError:
                os.close(fd)
                raise
        # else a file that appears later was created after we started: read it all
        self._started = True

    def _place(self, fd: int, cursor: Optional[Dict[str, Any]]) -> None:
        st = os.fstat(fd)
        if cursor is None:
            self._follow(fd, st, st.st_size)
            return
        try:
            cur_id = (int(cursor["dev"]), int(cursor["ino"]))
            cur_offset = int(cursor["offset"])
            cur_sig = bytes.fromhex(cursor.get("sig", ""))
        except (KeyError, TypeError, ValueError):
            log.warning("logsource.cursor_invalid", source=self.name, path=str(self._cursor.path))
            self._follow(fd, st, st.st_size)
            return
        if (st.st_dev, st.st_ino) == cur_id:
            if _intact(fd, st.st_size, cur_offset, cur_sig):
                self._follow(fd, st, cur_offset)
                return
        else:
            old = self._find_renamed(cur_id, cur_offset, cur_sig)
            if old is not None:
                os.close(fd)
                log.info("logsource.rotated_while_stopped", source=self.name, resume_in=old[1], offset=cur_offset)
                self._follow(old[0], os.fstat(old[0]), cur_offset)
                return
        # What we had read is gone: truncated, or replaced by a file that may even reuse the inode number.
        if st.st_mtime >= cursor["saved_at"]:
            log.warning("logsource.replaced_while_stopped", source=self.name,
                        detail="the cursor's position is gone; lines written after it to the old file are not read")
            self._follow(fd, st, 0)
        else:
            log.warning("logsource.unknown_file", source=self.name,
                        detail="not the cursor's file and unchanged since the cursor was saved: starting at end")
            self._follow(fd, st, st.st_size)

    def _find_renamed(self, file_id: Tuple[int, int], offset: int, sig: bytes) -> Optional[Tuple[int, str]]:
        """The cursor's file, renamed within the directory and still holding what we had read."""
        try:
            with os.scandir(self.path.parent) as entries:
                candidates = [e.path for e in entries if e.inode() == file_id[1]]
        except OSError:
            return None
        for candidate in candidates:
            try:
                fd = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == file_id and stat.S_ISREG(st.st_mode) and _intact(fd, st.st_size, offset, sig):
                return fd, candidate
            os.close(fd)
        return None

    # ---------------------------------------------------------------- follow
    def _open_path(self) -> Optional[int]:
        try:
            # O_NONBLOCK: opening a FIFO put at the path by mistake must not hang the agent.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            self._anomalies.report("missing", "logsource.file_missing", path=str(self.path),
                                   detail="will read it from its start when it appears")
            return None
        except OSError as e:
            self._anomalies.report("unopenable", "logsource.file_unreadable", path=str(self.path), error=str(e))
            return None
        self._anomalies.resolved("unopenable")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self._anomalies.report("not_regular", "logsource.not_a_regular_file", path=str(self.path))
            return None
        self._anomalies.resolved("not_regular")
        self._anomalies.resolved("missing", "logsource.file_appeared", path=str(self.path))
        return fd

    def _follow(self, fd: int, st: os.stat_result, offset: int) -> None:
        self._fd = fd
        self._id = (st.st_dev, st.st_ino)
        self._offset = offset
        n = min(_SIG_BYTES, offset)
        self._sig = os.pread(fd, n, offset - n) if n else b""

    def _poll(self, raws: List[bytes], budget: int) -> None:
        if not self._started:
            self._start(self._initial_cursor)
        if self._fd is None:
            fd = self._open_path()
            if fd is None:
                return
            self._follow(fd, os.fstat(fd), 0)
        switches = 0
        while self._fd is not None:
            size = os.fstat(self._fd).st_size
            if not _intact(self._fd, size, self._offset, self._sig):
                log.warning("logsource.truncated", source=self.name, offset=self._offset, size=size)
                raws.extend(self._splitter.flush())
                self._offset, self._sig = 0, b""
            if size > self._offset:
                if budget <= 0:
                    return
                data = os.pread(self._fd, min(budget, size - self._offset), self._offset)
                if data:
                    self._offset += len(data)
                    budget -= len(data)
                    self._sig = (self._sig + data[-_SIG_BYTES:])[-_SIG_BYTES:]
                    # NUL runs are holes a copytruncate leaves before a non-O_APPEND writer's
                    # next line: dropping them here keeps them from counting as one over-long line.
                    raws.extend(self._splitter.feed(data.replace(b"\x00", b""), time.monotonic()))
                    continue
            # At the end of this file: has the path moved on to another one?
            if switches >= 2 or not self._path_replaced(raws):
                return
            switches += 1

    def _path_replaced(self, raws: List[bytes]) -> bool:
        """At the end of the open file: switch to the file the path names now, if another."""
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._anomalies.report("missing", "logsource.file_missing", path=str(self.path),
                                   detail="will read it from its start when it appears")
            if os.fstat(self._fd).st_nlink == 0:
                raws.extend(self._splitter.flush())
                os.close(self._fd)
                self._fd, self._id, self._offset, self._sig = None, (-1, -1), 0, b""
            # else renamed and not re-created yet: keep reading the renamed file.
            return False
        if (st.st_dev, st.st_ino) == self._id:
            return False
        if os.fstat(self._fd).st_size > self._offset:
            return True  # the writer appended to the old file meanwhile: drain it first
        fd = self._open_path()
        if fd is None:
            return False
        log.info("logsource.rotated", source=self.name, old_inode=self._id[1], read_bytes=self._offset)
        raws.extend(self._splitter.flush())
        os.close(self._fd)
        self._follow(fd, os.fstat(fd), 0)
        return True

    def _save(self, force: bool = False) -> None:
        if not self._started:
            return
        if self._fd is None:
            state: Dict[str, Any] = {"dev": -1, "ino": -1, "offset": 0, "sig": ""}
        else:
            committed = self._offset - self._splitter.held
            n = min(_SIG_BYTES, committed)
            try:
                sig = os.pread(self._fd, n, committed - n) if n else b""
            except OSError:
                return
            state = {"dev": self._id[0], "ino": self._id[1], "offset": committed, "sig": sig.hex()}
        self._cursor.save(state, force=force)


def _intact(fd: int, size: int, offset: int, sig: bytes) -> bool:
    """Whether the file still holds, just before `offset`, the bytes we read there."""
    if size < offset:
        return False
    return not sig or os.pread(fd, len(sig), offset - len(sig)) == sig


# --------------------------------------------------------------------------- /dev/kmsg
@dataclass(frozen=True)
class KmsgRecord:
    facility: int
    level: int        # syslog severity, 0 (emerg) .. 7 (debug)
    seq: int
    usec: int         # printk time: microseconds since boot
    continued: bool   # flag "c": older kernels split one message over several records
    message: str
    fields: Dict[str, str] = field(default_factory=dict)  # SUBSYSTEM=pci, DEVICE=+pci:0000:00:01.0


_KMSG_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def _unescape_kmsg(body: bytes) -> bytes:
    """Undo the kernel's \\xNN escaping, so text matches what syslog files hold.

    Control bytes stay escaped: a message must stay one line."""
    def byte(m: re.Match[bytes]) -> bytes:
        value = int(m.group(1), 16)
        return bytes([value]) if value >= 0x20 and value != 0x7F else m.group(0)

    return _KMSG_ESCAPE.sub(byte, body) if b"\\x" in body else body


def parse_kmsg_record(raw: bytes) -> Optional[KmsgRecord]:
    """One /dev/kmsg record, or None if it is malformed.

    >>> r = parse_kmsg_record(b"4,1203,5123456,-;NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.\\n")
    >>> (r.level, r.seq, r.usec, r.message)
    (4, 1203, 5123456, 'NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.')
    >>> parse_kmsg_record(b"garbage") is None
    True
    """
    header, sep, rest = raw.partition(b";")
    if not sep:
        return None
    parts = header.split(b",")  # newer kernels append fields such as caller=T123
    if len(parts) < 4:
        return None
    try:
        prio, seq, usec = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    if prio < 0 or seq < 0 or usec < 0:
        return None
    lines = rest.split(b"\n")
    fields: Dict[str, str] = {}
    for meta in lines[1:]:
        key, eq, value = meta[1:].partition(b"=")
        if meta.startswith(b" ") and eq:
            fields[key.decode("utf-8", "replace")] = _unescape_kmsg(value).decode("utf-8", "replace")
    message = _unescape_kmsg(lines[0].replace(b"\x00", b"")).decode("utf-8", "replace")
    return KmsgRecord(facility=prio >> 3, level=prio & 7, seq=seq, usec=usec, continued=parts[3] == b"c",
                      message=message, fields=fields)


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _timens_monotonic_offset_usec() -> int:
    """How far this time namespace's CLOCK_MONOTONIC is from the kernel's.

    printk stamps use the kernel's clock; an agent in a time namespace (the test
    cluster's emulated nodes) would otherwise misjudge every record's age."""
    try:
        for line in Path("/proc/self/timens_offsets").read_text().splitlines():
            name, secs, nsecs = line.split()
            if name == "monotonic":
                return int(secs) * 1_000_000 + int(nsecs) // 1000
    except (OSError, ValueError):
        pass
    return 0


class KmsgSource:
    """Reads /dev/kmsg: one record per read(2), non-blocking.

    Start: opening /dev/kmsg starts at the oldest record still in the ring
    buffer, which is history after a restart. Records are skipped when
    - their seq is at or below the saved one and the boot is the same
      (/proc/sys/kernel/random/boot_id; comparing seqs alone cannot tell a
      reboot from a restart, since a restart also sees the ring start at low
      seqs), or
    - they are older than max_age_seconds (the age check applies always, so a
      new boot is read from its start only as far back as max_age_seconds).
    Ages compare the printk stamp with CLOCK_MONOTONIC: printk's clock, like
    MONOTONIC and unlike BOOTTIME, does not count suspend (moot on servers).

    EPIPE means the kernel overwrote records before we read them; it moves us
    to the oldest remaining one, and the gap in seq numbers is reported as lost.
    """

    _RECORD_BUFFER = 16384  # kernel records are < 8 KiB; a shorter buffer gets EINVAL

    def __init__(self, state_dir: os.PathLike, *, path: str = "/dev/kmsg",
                 max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS) -> None:
        self.path = path
        self.name = "kmsg" if path == "/dev/kmsg" else f"kmsg:{path}"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError as e:
            raise LogSourceError(f"cannot read {path}: {e.strerror}; run the agent as root or with CAP_SYSLOG "
                                 "(kernel.dmesg_restrict=1 hides it from others), or use the 'journal' source") from e
        except OSError as e:
            raise LogSourceError(f"cannot open {path}: {e.strerror}; use the 'journal' source or a log file") from e
        self._max_age_usec = int(max_age_seconds * 1_000_000)
        self._mono_offset_usec = _timens_monotonic_offset_usec()
        self._boot_id = _boot_id()
        self._anomalies = _Anomalies(self.name)
        self._cursor = _Cursor(Path(state_dir), self.name)
        saved = self._cursor.load(math.inf)  # seqs only mean something within a boot; age is checked per record
        self._skip_through = -1
        if saved and self._boot_id is not None and saved.get("boot_id") == self._boot_id:
            try:
                self._skip_through = int(saved["seq"])
            except (KeyError, TypeError, ValueError):
                log.warning("logsource.cursor_invalid", source=self.name, path=str(self._cursor.path))
        self._last_seq: Optional[int] = None
        self._drained = True
        self._closed = False

    def read(self, max_bytes: int = DEFAULT_MAX_BYTES) -> List[LogLine]:
        if self._closed:
            return []
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 - self._mono_offset_usec
        raws: List[bytes] = []
        used = malformed = too_old = lost = 0
        self._drained = False
        while used < max_bytes:
            try:
                raw = os.read(self._fd, self._RECORD_BUFFER)
            except BlockingIOError:
                self._drained = True
                break
            except BrokenPipeError:
                continue  # overwritten under us; the next read returns the oldest record left
            except OSError as e:
                self._anomalies.report("io_error", "logsource.io_error", path=self.path, error=str(e))
                break
            if not raw:
                self._drained = True
                break
            self._anomalies.resolved("io_error", "logsource.io_recovered")
            used += len(raw)
            record = parse_kmsg_record(raw)
            if record is None:
                malformed += 1
                continue
            if self._last_seq is not None and record.seq > self._last_seq + 1:
                lost += record.seq - self._last_seq - 1
            self._last_seq = record.seq
            if record.seq <= self._skip_through:
                continue
            if now_usec - record.usec > self._max_age_usec:
                too_old += 1
                continue
            if record.facility != 0:
                # Written to /dev/kmsg by a program (facility user, ...), not by the kernel:
                # `echo "NVRM: Xid ... 79" > /dev/kmsg` from a job must not fail a node.
                continue
            raws.append(record.message.encode("utf-8")[:MAX_LINE_BYTES])
        if lost:
            log.warning("logsource.kmsg_lost", source=self.name, records=lost,
                        detail="the kernel ring buffer overwrote records before they were read")
        if malformed:
            log.warning("logsource.kmsg_malformed", source=self.name, records=malformed)
        if too_old:
            log.info("logsource.kmsg_skipped_old", source=self.name, records=too_old,
                     max_age_seconds=self._max_age_usec / 1e6)
        self._save()
        return _to_lines(raws, self.name)

    def lag_bytes(self) -> int:
        """0 once a read reached the end of the ring; else a lower bound (the kernel does not say how much)."""
        return 0 if self._drained else 1

    def close(self) -> None:
        if self._closed:
            return
        self._save(force=True)
        self._closed = True
        os.close(self._fd)

    def _save(self, force: bool = False) -> None:
        seq = self._last_seq if self._last_seq is not None else self._skip_through
        if seq >= 0 and self._boot_id is not None:
            self._cursor.save({"boot_id": self._boot_id, "seq": seq}, force=force)


# --------------------------------------------------------------------------- journald
_BACKOFF_MIN_SECONDS = 1.0
_BACKOFF_MAX_SECONDS = 60.0
_HEALTHY_RUN_SECONDS = 60.0  # a journalctl that ran this long before dying resets the backoff
_JSON_LINE_CAP = 1024 * 1024  # JSON escaping can grow a 64 KiB message several times over


class JournalSource:
    """`journalctl -f -o json` as a child process, read without blocking.

    unit=None follows the kernel's messages (`-k`, this boot), else `--unit`.
    The cursor (`__CURSOR` of the last entry) is saved in state_dir and passed
    as --after-cursor on every (re)start; without one, entries of the last
    max_age_seconds are read (--since), like KmsgSource. Entries older than
    max_age_seconds are dropped here too, whatever journalctl returns. A
    journalctl that exits is restarted with exponential backoff (1 s .. 60 s).
    If it rejects the saved cursor (journal vacuumed, file corrupted), it is
    restarted from "now": a replay of the last hour could re-flag old faults.
    """

    def __init__(self, state_dir: os.PathLike, *, unit: Optional[str] = None,
                 max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS, journalctl: str = "journalctl",
                 max_line_bytes: int = MAX_LINE_BYTES) -> None:
        exe = shutil.which(journalctl)
        if exe is None:
            raise LogSourceError(f"{journalctl!r} not found on PATH: install systemd's journalctl (package "
                                 "'systemd' on Debian, Ubuntu and RHEL) or use the 'kmsg' source or a log file")
        self.name = "journal" if unit is None else f"journal:{unit}"
        self._argv = [exe, "-k" if unit is None else f"--unit={unit}", "--follow", "--output=json", "--all",
                      "--no-pager", "--lines=all"]
        self._max_age = max_age_seconds
        self._cap = max_line_bytes
        self._anomalies = _Anomalies(self.name)
        self._state = _Cursor(Path(state_dir), self.name)
        saved = self._state.load(max_age_seconds)
        self._cursor: Optional[str] = saved.get("cursor") if saved else None
        self._since = time.time() - max_age_seconds  # where to start when there is no cursor
        self._proc: Optional[subprocess.Popen] = None
        self._splitter = _LineSplitter(_JSON_LINE_CAP, math.inf)  # half a JSON object is worthless
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
        _log_capped(self._splitter, self.name, _JSON_LINE_CAP)
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
        messages: List[bytes] = []
        bad = too_old = capped = 0
        wall = time.time()
        for raw in raws:
            try:
                entry = json.loads(raw)
                cursor = entry["__CURSOR"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            self._cursor = cursor
            self._entries_this_run += 1
            try:
                age = wall - int(entry.get("__REALTIME_TIMESTAMP", 0)) / 1e6
            except (TypeError, ValueError):
                age = 0.0
            if age > self._max_age:
                too_old += 1
                continue
            message = entry.get("MESSAGE")
            if isinstance(message, str):
                message = message.encode("utf-8", "surrogatepass")
            elif isinstance(message, list):  # journalctl's JSON for binary messages: a list of byte values
                try:
                    message = bytes(message)
                except (TypeError, ValueError):
                    bad += 1
                    continue
            else:
                continue  # no MESSAGE field (or null): nothing to classify
            message = message.replace(b"\x00", b"")
            if len(message) > self._cap:
                capped += 1
                message = message[:self._cap]
            messages.append(message.replace(b"\n", b" "))
        if bad:
            log.warning("logsource.journal_unparsable", source=self.name, entries=bad)
        if capped:
            log.warning("logsource.lines_capped", source=self.name, lines=capped, max_line_bytes=self._cap)
        if too_old:
            log.info("logsource.journal_skipped_old", source=self.name, entries=too_old,
                     max_age_seconds=self._max_age)
        return _to_lines(messages, self.name)

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
        log.warning("logsource.journalctl_exited", source=self.name, returncode=rc, stderr=stderr,
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


# --------------------------------------------------------------------------- factory
def open_source(spec: str, state_dir: os.PathLike) -> LogSource:
    """The source a configuration entry names: "kmsg", "journal" or an absolute file path."""
    text = spec.strip() if isinstance(spec, str) else ""
    if text in ("kmsg", "/dev/kmsg"):
        return KmsgSource(state_dir)
    if text == "journal":
        return JournalSource(state_dir)
    if not os.path.isabs(text):
        raise ValueError(f"kernel log source {spec!r}: expected 'kmsg', 'journal' or an absolute file path")
    try:
        mode = os.stat(text).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG  # followed from its start once it appears
    if not stat.S_ISREG(mode):
        raise ValueError(f"kernel log source {spec!r} is not a regular file")
    return FileSource(text, state_dir)


__all__ = ["DEFAULT_MAX_BYTES", "FileSource", "JournalSource", "KmsgRecord", "KmsgSource", "LogLine", "LogSource",
           "LogSourceError", "MAX_LINE_BYTES", "open_source", "parse_kmsg_record"]
