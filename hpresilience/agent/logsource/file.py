"""Log files (/var/log/messages, kern.log), followed the way `tail -F` does."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..kernel_line import KernelLine, parse_line
from .common import (
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_BYTES,
    MAX_LINE_BYTES,
    PARTIAL_TIMEOUT_SECONDS,
    Anomalies,
    Cursor,
    LineSplitter,
    LogLine,
    decode_lines,
    log,
    log_capped,
)

# Bytes remembered before the read position: if they change, the file was rewritten under us.
_SIG_BYTES = 32


def file_kernel_line(text: str, now: float) -> Optional[KernelLine]:
    """A log file's line as the rules read it, or None when it must not be classified.

    Fails closed (issue 9, defect 9): a line another program wrote (a syslog tag other than
    `kernel`, a user facility) is not the kernel's, and a line without a date (a bare message,
    a dmesg uptime) could be from any boot and any day, so it cannot be placed in a threshold's
    window or told from history. `now` places syslog dates, which have no year."""
    parsed = parse_line(text, now=now)
    if parsed is None or not parsed.from_kernel or parsed.wall_time is None:
        return None
    return parsed


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
        self._splitter = LineSplitter(max_line_bytes, partial_timeout_seconds)
        self._anomalies = Anomalies(self.name)
        self._cursor = Cursor(Path(state_dir), self.name)
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
        log_capped(self._splitter, self.name, self._cap)
        self._save()
        now = time.time()
        return [LogLine(text, self.name, now, file_kernel_line(text, now))
                for text in decode_lines(raws, self.name) if text is not None]

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

    @property
    def errors(self) -> int:
        return self._anomalies.errors

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
            # Not an error yet: the open file is still read to its end (a rotation between rename and
            # create is normal); once it is closed, each read that finds no file counts (issue 12).
            self._anomalies.note("missing", "logsource.file_missing", path=str(self.path),
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
