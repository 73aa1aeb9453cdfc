"""What every kernel-log source shares: the line it returns, its cursor in
state_dir, anomaly logging and line splitting."""
from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Set, runtime_checkable

import structlog

from ...statefile import read_json, write_json
from ..kernel_line import KernelLine

log = structlog.get_logger("hpresilience.agent.logsource")

DEFAULT_MAX_BYTES = 1024 * 1024
MAX_LINE_BYTES = 64 * 1024
PARTIAL_TIMEOUT_SECONDS = 1.0
DEFAULT_MAX_AGE_SECONDS = 3600.0
SAVE_INTERVAL_SECONDS = 1.0
# Re-written even when unchanged, so a restart can tell how long the agent was away.
HEARTBEAT_SECONDS = 60.0


@dataclass(frozen=True)
class LogLine:
    text: str           # decoded with errors="replace"; no trailing newline, no NUL
    source: str         # the source's name, e.g. "kmsg" or "file:/var/log/messages"
    received_at: float  # time.time() when read
    # What the rules read: the message with the time the kernel stamped it (issue 9, defect 10:
    # a line read late after an agent outage is not news). None when the line must not be
    # classified: another program wrote it, or it is a file line without a date.
    kernel_line: Optional[KernelLine] = None


@runtime_checkable
class LogSource(Protocol):
    name: str

    def read(self, max_bytes: int = DEFAULT_MAX_BYTES) -> List[LogLine]:
        """What is new now (possibly nothing), about max_bytes at most; never blocks, never raises on I/O."""
        ...

    def lag_bytes(self) -> int:
        """Bytes known to be waiting that read() has not returned yet."""
        ...

    @property
    def errors(self) -> int:
        """Errors of the source itself since it was opened (I/O error, file missing or unreadable,
        journalctl failed to start or exited); the agent exports them per source (issue 12)."""
        ...

    def close(self) -> None:
        ...


class LogSourceError(Exception):
    """The source cannot work at all here (missing program, no permission); raised at construction."""


class Anomalies:
    """Logs each anomaly once when it starts, not on every poll while it lasts, and counts
    every occurrence in `errors` (a source's errors, hpr_agent_kernel_log_errors_total, issue 12):
    a file missing for an hour is one log line but an error on every poll, so the rate shows it lasts."""

    def __init__(self, source: str) -> None:
        self._source = source
        self._active: Set[str] = set()
        self.errors = 0

    def report(self, key: str, event: str, **fields: Any) -> None:
        self.errors += 1
        self.note(key, event, **fields)

    def note(self, key: str, event: str, **fields: Any) -> None:
        """Logs an anomaly once, like report(), without counting it as an error: nothing failed yet."""
        if key not in self._active:
            self._active.add(key)
            log.warning(event, source=self._source, **fields)

    def occurred(self, event: str, **fields: Any) -> None:
        """A one-off error, logged and counted every time: each is its own event."""
        self.errors += 1
        log.warning(event, source=self._source, **fields)

    def resolved(self, key: str, event: Optional[str] = None, **fields: Any) -> None:
        if key in self._active:
            self._active.discard(key)
            if event:
                log.info(event, source=self._source, **fields)


class Cursor:
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


class LineSplitter:
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


def decode_lines(raws: List[bytes], source: str) -> List[Optional[str]]:
    """Each raw line as text (None for an empty one), in order: a trailing CR is dropped and
    bytes that are not UTF-8 are replaced."""
    out: List[Optional[str]] = []
    undecodable = 0
    for raw in raws:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            out.append(raw.decode("utf-8") or None)
        except UnicodeDecodeError:
            out.append(raw.decode("utf-8", errors="replace"))
            undecodable += 1
    if undecodable:
        # Not an Anomalies key: each batch of bad bytes is its own occurrence.
        log.info("logsource.undecodable_lines", source=source, lines=undecodable)
    return out


def log_capped(splitter: LineSplitter, source: str, cap: int) -> None:
    if splitter.capped:
        log.warning("logsource.lines_capped", source=source, lines=splitter.capped, max_line_bytes=cap)
        splitter.capped = 0
