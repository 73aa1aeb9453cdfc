"""/dev/kmsg, read record by record; kernel_line.parse_kmsg_record parses them."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import List, Optional

from ..kernel_line import KmsgRecord, parse_kmsg_record
from .common import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_BYTES, Anomalies, Cursor, LogLine, LogSourceError, log

__all__ = ["KmsgRecord", "KmsgSource", "parse_kmsg_record"]


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

    Every line carries the wall time of its printk stamp (issue 9, defect 10).

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
        self._anomalies = Anomalies(self.name)
        self._cursor = Cursor(Path(state_dir), self.name)
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
        received = time.time()
        # printk stamps count from the kernel's boot: this is when that was, on the wall clock.
        boot_wall_time = received - now_usec / 1e6
        lines: List[LogLine] = []
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
            lines.append(LogLine(record.message, self.name, received, record.kernel_line(boot_wall_time)))
        if lost:
            log.warning("logsource.kmsg_lost", source=self.name, records=lost,
                        detail="the kernel ring buffer overwrote records before they were read")
        if malformed:
            log.warning("logsource.kmsg_malformed", source=self.name, records=malformed)
        if too_old:
            log.info("logsource.kmsg_skipped_old", source=self.name, records=too_old,
                     max_age_seconds=self._max_age_usec / 1e6)
        self._save()
        return lines

    def lag_bytes(self) -> int:
        """0 once a read reached the end of the ring; else a lower bound (the kernel does not say how much)."""
        return 0 if self._drained else 1

    @property
    def errors(self) -> int:
        return self._anomalies.errors

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
