"""srun --auto-resume's recoveries counted where the controller can see them (issue 12): the
events files the runner appends to (`auto-resume-<job>.events.jsonl`) in a state directory the
controller shares ([controller] autoresume_state_dir, the runner's state_dir set cluster-wide).

Users write these files, so they only count, never cause an action (docs/safety.md), and nothing
in them may hurt the controller (issue 12 review): the scan runs on its own thread, so a slow or
hung shared file system or a flood of files never delays a reconcile pass; only regular files are
opened, without following links and without blocking (a FIFO named like one must not hang the
scan); reads are bounded per file and per scan; every line is parsed under a guard and every value
checked against a fixed set or range before it reaches a label. Events written before this
controller became the active one were its predecessor's to count (Prometheus reads a restarted
counter as a reset, so counting them again would show old recoveries as new)."""
from __future__ import annotations

import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import structlog

from .metrics import RESUME_PATHS, ControllerMetrics

log = structlog.get_logger(__name__)

EVENTS_PREFIX, EVENTS_SUFFIX = "auto-resume-", ".events.jsonl"
MAX_READ_BYTES = 1 << 20            # of one file per scan
MAX_SCAN_BYTES = 8 << 20            # of all files per scan: the rest waits for the next
MAX_RECOVERY_SECONDS = 7 * 86400.0
SCAN_INTERVAL_SECONDS = 10.0


@dataclass
class _Position:
    inode: int
    offset: int


class AutoResumeEvents:
    def __init__(self, directory: Path, metrics: ControllerMetrics, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.metrics = metrics
        self.clock = clock
        self.since = clock()
        self.positions: Dict[str, _Position] = {}
        self.resume_after = ""          # the file a scan that ran out of budget stopped at
        self.warned = False
        self.lock = threading.Lock()    # the scan thread against start_counting from the pass loop
        self.stop = threading.Event()

    def start_counting(self) -> None:
        """From now on only: a standby that takes over must not count again what the previous
        leader counted (a dashboard sums the controllers' series)."""
        with self.lock:
            self.since = self.clock()
            self.positions.clear()

    def run_in_background(self, leading: Callable[[], bool],
                          interval: float = SCAN_INTERVAL_SECONDS) -> threading.Thread:
        """Scan every `interval` while `leading()` (the active controller) until `stop` is set."""
        def loop() -> None:
            while not self.stop.wait(interval):
                if leading():
                    try:
                        self.scan()
                    except Exception:   # a bug here must not end the counting for good
                        log.exception("controller.autoresume_events_error", directory=str(self.directory))
        thread = threading.Thread(target=loop, name="hpr-autoresume-events", daemon=True)
        thread.start()
        return thread

    def scan(self) -> int:
        """Count the events appended since the last scan; returns how many were counted."""
        with self.lock:
            return self._scan()

    def _scan(self) -> int:
        try:
            names = sorted(e.name for e in os.scandir(self.directory)
                           if e.name.startswith(EVENTS_PREFIX) and e.name.endswith(EVENTS_SUFFIX))
        except OSError as e:
            if not self.warned:   # once: an unmounted shared directory is not a new problem each scan
                log.warning("controller.autoresume_events_unreadable", directory=str(self.directory), error=str(e))
                self.warned = True
            return 0
        self.warned = False
        present = set(names)
        self.positions = {n: p for n, p in self.positions.items() if n in present}
        # Round robin: a scan that ran out of budget goes on after the file it stopped at.
        order = [n for n in names if n > self.resume_after] + [n for n in names if n <= self.resume_after]
        self.resume_after = ""
        counted, budget = 0, MAX_SCAN_BYTES
        for name in order:
            if budget <= 0:
                self.resume_after = name
                break
            try:
                found, used = self._read(name, min(budget, MAX_READ_BYTES))
            except OSError as e:
                log.warning("controller.autoresume_events_file", file=name, error=str(e))
                continue
            counted += found
            budget -= used
        return counted

    def _read(self, name: str, limit: int) -> Tuple[int, int]:
        """(events counted, bytes read) from one file."""
        path = self.directory / name
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or (st.st_mtime < self.since and name not in self.positions):
            return 0, 0
        pos = self.positions.get(name)
        if pos is None or pos.inode != st.st_ino or st.st_size < pos.offset:
            pos = self.positions[name] = _Position(st.st_ino, 0)
        if st.st_size == pos.offset:
            return 0, 0
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0, 0
            chunk = os.pread(fd, limit, pos.offset)
        finally:
            os.close(fd)
        complete = chunk.rfind(b"\n") + 1
        if complete == 0:
            # A line longer than one file's read is no line of the runner's: skip it whole.
            pos.offset += len(chunk) if len(chunk) == MAX_READ_BYTES else 0
            return 0, len(chunk)
        pos.offset += complete
        return sum(self._count(line) for line in chunk[:complete].splitlines()), len(chunk)

    def _count(self, line: bytes) -> int:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):   # RecursionError: "[[[[..." (issue 12 review)
            return 0
        if not isinstance(event, dict) or not _number(event.get("at")) or event["at"] < self.since:
            return 0
        kind = event.get("event")
        if kind == "gave_up":
            self.metrics.resume_gave_up.inc()
            return 1
        path, seconds = event.get("path"), event.get("seconds")
        if kind == "resumed" and path in RESUME_PATHS and _number(seconds) and 0 <= seconds <= MAX_RECOVERY_SECONDS:
            self.metrics.resumes.labels(path).inc()
            self.metrics.resume_seconds.labels(path).observe(seconds)
            return 1
        return 0


def _number(value: Optional[object]) -> bool:
    """A finite float, or an int a float holds (a 400-digit int overflows math.isfinite)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) < 2 ** 53
    return isinstance(value, float) and math.isfinite(value)

