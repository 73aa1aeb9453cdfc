"""Findings → one node decision.

Replace beats Reboot beats nothing. Kernel-log findings are *events*: they stay
active until a decision that includes them has been applied (or made moot),
and are journaled so an agent restart or an unreachable slurmctld loses none.
NVML/system findings are *states*: re-reported by their monitor on every pass.

The agent reports the action each fault asks for and never escalates: the
controller, which did the reboot, is the one owner of escalation (issue 9; the
agent's own escalation by component turned an OOM after an unrelated XID reboot
into a replacement). The reason carries the fault ([CODE@entity]) so the
controller can tell the same fault returning from a new one.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import structlog

from ..finding import Finding, NodeAction
from ..slurm.reason import ActionReason, Fault
from ..statefile import read_json, write_json
from .config import PolicyConfig
from .node import STAMP_SLACK_SECONDS

log = structlog.get_logger(__name__)



@dataclass
class Decision:
    action: NodeAction
    findings: List[Finding]          # what justifies it, most severe first
    slurm_state: str

    @property
    def detail(self) -> str:
        """Short human text for the Slurm reason after 'Action: X; [CODE@entity] '."""
        text = self.findings[0].message
        others = len({f.key for f in self.findings}) - 1
        if others > 0:
            text += f" (+{others} more)"
        return text

    @property
    def reason(self) -> ActionReason:
        top = self.findings[0]
        return ActionReason(self.action, self.detail, Fault(top.code, top.entity))


@dataclass
class Policy:
    config: PolicyConfig
    state_dir: Path
    clock: Callable[[], float] = time.time
    _events: Dict[str, Finding] = field(default_factory=dict)
    _seen: Dict[str, Dict[str, float]] = field(default_factory=dict)
    _logged: Dict[str, float] = field(default_factory=dict)
    _occurrence: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._events_file = self.state_dir / "pending-events.json"
        # A damaged journal loses what it cannot say, record by record, never the daemon.
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
        # Counted by code, one count per device within the window: three OOM kills of three
        # processes are three OOMs, but a hung task the kernel re-reports every 120 s (an NFS
        # or Lustre stall) is one (issue 9, defect 8). Times are the kernel's own (defect 10).
        seen = self._seen.setdefault(finding.code, {})
        # Without a device every line is its own occurrence.
        key = finding.key if finding.entity else f"{finding.key}#{next(self._occurrence)}"
        seen[key] = max(now, seen.get(key, now))
        for key in [k for k, at in seen.items() if at < now - threshold.window_seconds]:
            del seen[key]
        return len(seen) >= threshold.count

    # -------------------------------------------------------------- decision
    def decide(self, state_findings: Iterable[Finding]) -> Optional[Decision]:
        candidates = [f for f in list(self._events.values()) + list(state_findings) if f.action is not NodeAction.NONE]
        if not candidates:
            return None
        candidates.sort(key=lambda f: (-f.action.rank, f.observed_at))
        top = candidates[0]
        state = next((f.slurm_state or self.config.slurm_state.get(f.code) for f in candidates
                      if f.action is top.action and (f.slurm_state or f.code in self.config.slurm_state)), None)
        return Decision(top.action, candidates, state or self.config.default_state)

    # --------------------------------------------------------------- outcome
    def resolved(self, decision: Decision) -> None:
        """The decision is settled (applied, or moot); its events are done."""
        keys = {f.key for f in decision.findings}
        if any(k in self._events for k in keys):
            for key in keys:
                self._events.pop(key, None)
            self._save_events()

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
