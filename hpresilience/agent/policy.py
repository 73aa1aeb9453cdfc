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
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, List, Optional

import structlog

from ..finding import Finding, NodeAction
from ..statefile import read_json, write_json
from .config import PolicyConfig

log = structlog.get_logger(__name__)

# Slurm recomputes BootTime from uptime and we read /proc/uptime: allow jitter.
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
    boot_time: float


@dataclass
class Policy:
    config: PolicyConfig
    state_dir: Path
    clock: Callable[[], float] = time.time
    _events: Dict[str, Finding] = field(default_factory=dict)
    _seen: Dict[str, Deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _logged: Dict[str, float] = field(default_factory=dict)
    history: List[HistoryRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._events_file = self.state_dir / "pending-events.json"
        self._history_file = self.state_dir / "history.json"
        self.history = [HistoryRecord(**r) for r in read_json(self._history_file, [])]
        for raw in read_json(self._events_file, []):
            try:
                finding = Finding.from_dict(raw)
            except (TypeError, ValueError) as e:
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
        """Events from before the current boot were dealt with by that boot."""
        stale = [k for k, f in self._events.items() if f.observed_at < boot_time - BOOT_TIME_TOLERANCE]
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
        seen = self._seen[finding.key]
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
        if action is NodeAction.REBOOT and self._rebooted_for_this_recently(boot_time):
            action, escalated = NodeAction.REPLACE, True
        state = next((f.slurm_state for f in candidates if f.action is top.action and f.slurm_state), None)
        return Decision(action, candidates, state or self.config.default_state, escalated)

    def _rebooted_for_this_recently(self, boot_time: float) -> bool:
        now = self.clock()
        return any(
            r.action in (NodeAction.REBOOT.value, NodeAction.REPLACE.value)
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
            self.history.append(HistoryRecord(self.clock(), decision.action.value, decision.findings[0].code,
                                              boot_time))
            self.history = self.history[-HISTORY_LIMIT:]
            write_json(self._history_file, [r.__dict__ for r in self.history])

    @property
    def pending_events(self) -> List[Finding]:
        return list(self._events.values())

    def _save_events(self) -> None:
        write_json(self._events_file, [f.to_dict() for f in self._events.values()])
