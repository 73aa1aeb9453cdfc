"""srun --auto-resume's recoveries counted where the controller can see them (issue 12): the
events files the runner appends to (`auto-resume-<job>.events.jsonl`) in a state directory the
controller shares ([controller] autoresume_state_dir, the runner's state_dir set cluster-wide).

Users write these files, so they only count, never cause an action (docs/safety.md), and nothing
in them can hurt the controller: only regular files are opened, without following links and
without blocking (a FIFO named like one must not hang a pass), at most MAX_READ_BYTES of each per
pass, and every value is checked against a fixed set before it reaches a label. Events written
before this controller started were its predecessor's to count (Prometheus reads a restarted
counter as a reset, so counting them again would show old recoveries as new)."""
from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import structlog

from .metrics import RESUME_PATHS, ControllerMetrics

log = structlog.get_logger(__name__)

EVENTS_PREFIX, EVENTS_SUFFIX = "auto-resume-", ".events.jsonl"
MAX_READ_BYTES = 1 << 20
MAX_RECOVERY_SECONDS = 7 * 86400.0


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
        self.warned = False

    def start_counting(self) -> None:
        """From now on only: a standby that takes over must not count again what the previous
        leader counted (a dashboard sums the controllers' series)."""
        self.since = self.clock()
        self.positions.clear()

    def scan(self) -> int:
        """Count the events appended since the last scan; returns how many were counted."""
        try:
            entries = [e for e in os.scandir(self.directory)
                       if e.name.startswith(EVENTS_PREFIX) and e.name.endswith(EVENTS_SUFFIX)]
        except OSError as e:
            if not self.warned:   # once: an unmounted shared directory is not a new problem each pass
                log.warning("controller.autoresume_events_unreadable", directory=str(self.directory), error=str(e))
                self.warned = True
            return 0
        self.warned = False
        counted = 0
        for entry in entries:
            try:
                counted += self._read(entry)
            except OSError as e:
                log.warning("controller.autoresume_events_file", file=entry.path, error=str(e))
        names = {e.name for e in entries}
        self.positions = {n: p for n, p in self.positions.items() if n in names}
        return counted

    def _read(self, entry: os.DirEntry) -> int:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or (st.st_mtime < self.since and entry.name not in self.positions):
            return 0
        pos = self.positions.get(entry.name)
        if pos is None or pos.inode != st.st_ino or st.st_size < pos.offset:
            pos = self.positions[entry.name] = _Position(st.st_ino, 0)
        if st.st_size == pos.offset:
            return 0
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0
            chunk = os.pread(fd, MAX_READ_BYTES, pos.offset)
        finally:
            os.close(fd)
        complete = chunk.rfind(b"\n") + 1
        if complete == 0:
            # A line longer than we read at once is no line of the runner's: skip it whole.
            pos.offset += len(chunk) if len(chunk) == MAX_READ_BYTES else 0
            return 0
        pos.offset += complete
        return sum(self._count(line) for line in chunk[:complete].splitlines())

    def _count(self, line: bytes) -> int:
        try:
            event = json.loads(line)
        except ValueError:
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
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
