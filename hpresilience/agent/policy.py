"""Findings → one node decision.

Replace beats Reboot beats nothing. Kernel-log findings are *events*: they stay
active until a decision that includes them has been applied (or made moot),
and are journaled so an agent restart or an unreachable slurmctld loses none.
NVML/system findings are *states*: re-reported by their monitor on every pass.

Escalation (BRIEF §6): a reboot-class fault on a node that was already marked
for a reboot-class fault within `escalation_window_seconds`, and has booted
since, becomes Replace: the reboot did not fix it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, List, Optional

import structlog

from ..finding import Finding, NodeAction
from ..statefile import read_json, write_json
from .config import PolicyConfig
from .node import STAMP_SLACK_SECONDS

log = structlog.get_logger(__name__)

# Boot times in the history come from /proc/uptime at different moments: allow jitter.
BOOT_TIME_TOLERANCE = 30.0
HISTORY_LIMIT = 200


@dataclass
class Decision:
    action: NodeAction
    findings: List[Finding]          # what justifies it, most severe first
    slurm_state: str
    escalated: bool = False

    @property
    def detail(self) -> str:
        """Short human text for the Slurm reason after 'Action: X; '."""
        text = self.findings[0].message
        others = len({f.key for f in self.findings}) - 1
        if others > 0:
            text += f" (+{others} more)"
        if self.escalated:
            text += "; again after reboot"
        return text


@dataclass
class HistoryRecord:
    at: float
    action: str
    code: str
    component: str
    boot_time: float


@dataclass
class Policy:
    config: PolicyConfig
    state_dir: Path
    clock: Callable[[], float] = time.time
    _events: Dict[str, Finding] = field(default_factory=dict)
    _seen: Dict[str, Deque[float]] = field(default_factory=dict)
    _logged: Dict[str, float] = field(default_factory=dict)
    history: List[HistoryRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._events_file = self.state_dir / "pending-events.json"
        self._history_file = self.state_dir / "history.json"
        # A damaged journal loses what it cannot say, record by record, never the daemon.
        for raw in _records(read_json(self._history_file, []), self._history_file):
            try:
                self.history.append(HistoryRecord(**raw))
            except TypeError as e:
                log.warning("policy.history_record_dropped", error=str(e))
        for raw in _records(read_json(self._events_file, []), self._events_file):
            try:
                finding = Finding.from_dict(raw)
                if finding.slurm_state not in (None, "fail", "drain", "down"):
                    raise ValueError(f"slurm_state {finding.slurm_state!r}")
            except (TypeError, ValueError, KeyError) as e:
                log.warning("policy.pending_event_dropped", error=str(e))
                continue
            self._events[finding.key] = finding

    # ---------------------------------------------------------------- intake
    def add_events(self, findings: Iterable[Finding]) -> List[Finding]:
        """Take kernel-log findings; returns those that count (past their threshold)."""
        counted = []
        for finding in findings:
            if not self._past_threshold(finding):
                continue
            counted.append(finding)
            if finding.action is NodeAction.NONE:
                continue
            known = self._events.get(finding.key)
            if known is None or finding.action.rank > known.action.rank:
                self._events[finding.key] = finding
                self._save_events()
        return counted

    def drop_events_before(self, boot_time: float) -> None:
        """Reboot-class events from before the current boot were dealt with by that boot.
        A Replace-class one was not: the hardware is as broken after a power cycle."""
        stale = [k for k, f in self._events.items()
                 if f.observed_at < boot_time - STAMP_SLACK_SECONDS and f.action is not NodeAction.REPLACE]
        for key in stale:
            del self._events[key]
        if stale:
            log.info("policy.stale_events_dropped", count=len(stale))
            self._save_events()

    def should_log(self, key: str) -> bool:
        """One log event per finding (or outcome) key, not one per line of a flood."""
        now = self.clock()
        last = self._logged.get(key)
        if last is not None and now - last < self.config.log_repeat_seconds:
            return False
        self._logged[key] = now
        return True

    def _past_threshold(self, finding: Finding) -> bool:
        threshold = self.config.thresholds.get(finding.code)
        if threshold is None or threshold.count <= 1:
            return True
        now = finding.observed_at
        # Counted by code, not device: three OOM kills of three different processes are three OOMs.
        seen = self._seen.setdefault(finding.code, deque(maxlen=threshold.count))
        seen.append(now)
        while seen and seen[0] < now - threshold.window_seconds:
            seen.popleft()
        return len(seen) >= threshold.count

    # -------------------------------------------------------------- decision
    def decide(self, state_findings: Iterable[Finding], boot_time: float) -> Optional[Decision]:
        candidates = [f for f in list(self._events.values()) + list(state_findings) if f.action is not NodeAction.NONE]
        if not candidates:
            return None
        candidates.sort(key=lambda f: (-f.action.rank, f.observed_at))
        top = candidates[0]
        action, escalated = top.action, False
        if action is NodeAction.REBOOT and self._rebooted_for_this_recently(top.component, boot_time):
            action, escalated = NodeAction.REPLACE, True
        state = next((f.slurm_state or self.config.slurm_state.get(f.code) for f in candidates
                      if f.action is top.action and (f.slurm_state or f.code in self.config.slurm_state)), None)
        return Decision(action, candidates, state or self.config.default_state, escalated)

    def _rebooted_for_this_recently(self, component: str, boot_time: float) -> bool:
        """The same kind of fault (GPU, memory, kernel, ...) came back after a reboot.
        A different one is a new fault: a hung task after an XID reboot is no reason
        to replace the node."""
        now = self.clock()
        return any(
            r.action in (NodeAction.REBOOT.value, NodeAction.REPLACE.value)
            and r.component == component
            and now - r.at <= self.config.escalation_window_seconds
            and r.boot_time < boot_time - BOOT_TIME_TOLERANCE
            for r in self.history
        )

    # --------------------------------------------------------------- outcome
    def resolved(self, decision: Decision, applied: bool, boot_time: float) -> None:
        """The decision is settled (applied, or moot); its events are done.
        `applied` records it in the history that drives escalation."""
        keys = {f.key for f in decision.findings}
        if any(k in self._events for k in keys):
            for key in keys:
                self._events.pop(key, None)
            self._save_events()
        if applied:
            top = decision.findings[0]
            self.history.append(HistoryRecord(self.clock(), decision.action.value, top.code, top.component,
                                              boot_time))
            self.history = self.history[-HISTORY_LIMIT:]
            try:
                write_json(self._history_file, [r.__dict__ for r in self.history])
            except OSError as e:
                log.error("policy.journal_write_failed", path=str(self._history_file), error=str(e))

    @property
    def pending_events(self) -> List[Finding]:
        return list(self._events.values())

    def _save_events(self) -> None:
        # Disk full or read-only: keep the events in memory and say so, never lose the batch.
        try:
            write_json(self._events_file, [f.to_dict() for f in self._events.values()])
        except OSError as e:
            log.error("policy.journal_write_failed", path=str(self._events_file), error=str(e))



def _records(data: object, path: Path) -> list:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    log.warning("policy.journal_ignored", path=str(path), reason="not a list")
    return []
