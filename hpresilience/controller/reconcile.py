"""The reconcile pass: one read of every node, then each workflow moved on.

A pass reads every node once (one `scontrol -o show node`), opens a workflow for
each node that carries an ``Action:`` reason (or is unresponsive past a grace
period), trips the circuit breaker on a burst of new flags, and moves each active
workflow on by at most one step (workflow.Steps). Leaving `drain` is gated here:
the concurrency limits and the breaker. Steps that wait on a provider or on the
node's check run in worker threads; the pass alone owns its in-memory state
(`inflight`, `remediating`) and rebuilds it from the journal every pass, so
workers never touch it (issue 9, defect 13).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import structlog

from ..action import NodeAction
from ..slurm import Node, SlurmError, SlurmGateway
from ..slurm.reason import ReasonOwner
from .config import ControllerConfig
from .expedite import expedite_requeued
from .fleet_metrics import RECENT_SECONDS, Unattended, export_nodes, export_repairs
from .journal import Journal, Workflow
from .metrics import ADMIT, ControllerMetrics
from .providers import Provider
from .verdict import is_unresponsive, ts
from .workflow import Step, Steps

log = structlog.get_logger(__name__)

PAUSED_LOG_EVERY_SECONDS = 60.0
# An admitted node must be missing from Slurm this long before it counts as removed (issue 10
# review: a slurm.conf typo fixed by the next reconfigure must not make nodes "new").
FORGET_AFTER_SECONDS = 600.0


@dataclass(frozen=True)
class Candidate:
    node: Node
    action: NodeAction
    reason: str
    detected_at: float


@dataclass
class PassReport:
    nodes: int = 0
    flagged: int = 0
    started: List[str] = field(default_factory=list)
    active: int = 0
    paused: bool = False
    seconds: float = 0.0


class Reconciler:
    def __init__(self, config: ControllerConfig, gateway: SlurmGateway, journal: Journal, provider: Provider,
                 executor: Optional[ThreadPoolExecutor] = None, clock: Callable[[], float] = time.time,
                 metrics: Optional[ControllerMetrics] = None, heartbeat: Callable[[], None] = lambda: None):
        # Called between workflows: a pass of many slow Slurm calls still pings systemd's watchdog.
        self.heartbeat = heartbeat
        self.metrics = metrics or ControllerMetrics()
        self.journal = journal
        self.clock = clock
        self.steps = Steps(config, gateway, journal, provider, clock, self.metrics)
        # Threads start only when needed; the limits, not the pool, bound the work in flight
        # (sized generously so raising max_concurrent by SIGHUP is not capped by it).
        self.executor = executor or ThreadPoolExecutor(max_workers=max(32, 2 * config.limits.max_concurrent),
                                                       thread_name_prefix="hpr-step")
        self.inflight: Dict[str, Future] = {}
        self.first_silent: Dict[str, float] = {}
        self.recommended: Dict[str, str] = {}
        self.last_paused_log = 0.0
        self.partition_sizes: Dict[str, int] = {}
        self.remediating: Dict[str, Set[str]] = {}   # workflow node -> its partitions, past `drain`
        self.first_missing: Dict[str, float] = {}     # admitted nodes Slurm no longer shows, since

    def reconfigure(self, config: ControllerConfig, gateway: SlurmGateway, provider: Provider) -> None:
        """SIGHUP: the steps hold the configuration, gateway and provider; the pass reads them there."""
        self.steps.config, self.steps.gateway, self.steps.provider = config, gateway, provider

    @property
    def automatic(self) -> bool:
        return self.steps.config.controller.mode == "automatic" and not self.steps.config.controller.dry_run

    # ------------------------------------------------------------------ pass
    def run_pass(self) -> PassReport:
        started = time.monotonic()
        now = self.clock()
        report = PassReport()
        self._reap()
        nodes = self.steps.gateway.nodes()
        by_name = {n.name: n for n in nodes}
        report.nodes = len(nodes)
        self.partition_sizes = {}
        for n in nodes:
            for p in n.partitions:
                self.partition_sizes[p] = self.partition_sizes.get(p, 0) + 1
        export_nodes(self.metrics, nodes)
        active = {wf.node: wf for wf in self.journal.active()}
        candidates, unattended = self._candidates(nodes, active, now)
        report.flagged = len(candidates) + len(active)
        breaker = self._check_breaker(candidates, now)
        report.paused = breaker.tripped
        if not self.automatic:
            self._recommend(candidates)
            report.active = self._export(nodes, unattended + self._waiting(candidates, "recommend_only"), now)
            report.seconds = time.monotonic() - started
            return report
        self.metrics.expedited.inc(expedite_requeued(self.steps.gateway, now))
        if breaker.tripped:
            unattended += self._waiting(candidates, "paused")
        else:
            for c in candidates:
                wf = self._open(c, now)
                active[wf.node] = wf
                report.started.append(wf.node)
            for node in self._unadmitted(nodes, active, now):
                # Moved on from the next pass, which reads the node as held.
                if self.steps.hold(node, now) is not None:
                    report.started.append(node.name)
        self.remediating = {wf.node: set(by_name[wf.node].partitions) if wf.node in by_name else set()
                            for wf in active.values() if wf.step != Step.DRAIN}
        for wf in active.values():
            if wf.node in self.inflight:
                continue
            self.heartbeat()
            try:
                self._move(wf, by_name.get(wf.node), now, paused=breaker.tripped)
            except SlurmError as e:
                # slurmctld away, a refused command: the step is retried next pass.
                log.warning("controller.step_error", node=wf.node, step=wf.step, error=str(e))
        report.active = self._export(nodes, unattended, now)
        report.seconds = time.monotonic() - started
        return report

    def _export(self, nodes: List[Node], unattended: List[Unattended], now: float) -> int:
        """The fleet's gauges as this pass leaves it (fleet_metrics); returns the active workflows."""
        active = self.journal.active()
        export_repairs(self.metrics, nodes, active, unattended, self.journal.history(since=now - RECENT_SECONDS),
                       (s.value for s in Step if s is not Step.DONE), now)
        return len(active)

    @staticmethod
    def _waiting(candidates: List[Candidate], why: str) -> List[Unattended]:
        return [Unattended(c.node.name, why, c.detected_at) for c in candidates]

    def _move(self, wf: Workflow, node: Optional[Node], now: float, paused: bool) -> None:
        current = self.steps.advance(wf, node, now)
        if current is None or node is None:
            return
        if current.step == Step.DRAIN:
            if paused or not self._limits_allow(node):
                return
            # Counted before the step: a reboot is issued inside leave_drain, and a give-up
            # there only makes this pass more careful.
            self.remediating[node.name] = set(node.partitions)
            current = self.steps.leave_drain(current, node)
            if current is None:
                return
        work = {Step.VERIFY: self.steps.verify, Step.DEEPCHECK: self.steps.deepcheck}.get(Step(current.step),
                                                                                    self.steps.provider_step)
        self.inflight[current.node] = self.executor.submit(self._guarded, work, current)

    def _check_breaker(self, candidates: List[Candidate], now: float):
        breaker = self.journal.breaker()
        if not breaker.tripped and self.steps.config.breaker.enabled and self.automatic:
            recent = self._recent_flags(candidates, now, breaker.reset_at)
            if len(recent) > self.steps.config.breaker.max_new:
                detail = (f"{len(recent)} nodes flagged within {self.steps.config.breaker.window_seconds:g}s "
                          f"(limit {self.steps.config.breaker.max_new}): {', '.join(sorted(recent)[:20])}")
                self.journal.trip_breaker(detail)
                log.error("controller.breaker_tripped", detail=detail,
                          hint="automatic action paused; run `hpresilience controller resume` once understood")
                breaker = self.journal.breaker()
        if breaker.tripped and now - self.last_paused_log >= PAUSED_LOG_EVERY_SECONDS:
            self.last_paused_log = now
            log.error("controller.paused", detail=breaker.detail, since=breaker.tripped_at,
                      hint="run `hpresilience controller resume` to let automatic action continue")
        return breaker

    def _unadmitted(self, nodes: List[Node], active: Dict[str, Workflow], now: float) -> List[Node]:
        """With `deepcheck.hold_new_nodes` (issue 10): nodes that never passed a deep check,
        in service with no reason, to be held until they do. The nodes present when the
        switch turns on are the baseline; a node missing from Slurm for FORGET_AFTER_SECONDS
        is forgotten, so re-added it is new (a node missing for one reconfigure is not). A node
        an admin put back in service after its admission ended is theirs: admitted."""
        if not self.steps.config.deepcheck.hold_new_nodes:
            self.journal.stop_admission()
            return []
        self.journal.start_admission(n.name for n in nodes)
        admitted = self.journal.admitted() or set()
        present = {n.name for n in nodes}
        for name in admitted - present:
            self.first_missing.setdefault(name, now)
        for name in list(self.first_missing):
            if name in present or name not in admitted:
                del self.first_missing[name]
        self.journal.forget(n for n, since in self.first_missing.items() if now - since >= FORGET_AFTER_SECONDS)
        held = []
        for n in nodes:
            if (n.name in admitted or n.name in active or not n.is_responding
                    or n.reason_owner is not ReasonOwner.NONE):
                continue
            past = self.journal.history(node=n.name)
            if past and past[-1].action == ADMIT and past[-1].status in ("failed", "abandoned"):
                self.journal.admit([n.name], why=f"returned to service by someone else after workflow {past[-1].id}")
                continue
            held.append(n)
        return held

    def _reap(self) -> None:
        for node, future in list(self.inflight.items()):
            if future.done():
                del self.inflight[node]
                error = future.exception()
                if error is not None:
                    log.error("controller.worker_error", node=node, error=f"{type(error).__name__}: {error}")

    def _candidates(self, nodes: List[Node], active: Dict[str, Workflow],
                    now: float) -> Tuple[List[Candidate], List[Unattended]]:
        """Nodes to open a workflow for, and nodes needing a repair that none will be opened for
        (given up, handled before, silent with no power cycle possible yet): the latter only
        feed hpr_controller_unattended_nodes (issue 12)."""
        found: List[Candidate] = []
        unattended: List[Unattended] = []
        for node in nodes:
            if node.name in active:
                continue
            since = ts(node.reason_time) if node.reason else None
            ours = node.action_reason
            if ours is not None:
                self.first_silent.pop(node.name, None)
                if node.is_drained or node.is_down:
                    found.append(Candidate(node, ours.action, node.reason or "", since or now))
                continue
            if node.reason_owner is ReasonOwner.GAVE_UP:
                unattended.append(Unattended(node.name, "gave_up", since or now))
            if not is_unresponsive(node):
                self.first_silent.pop(node.name, None)
                continue
            since = since or self.first_silent.setdefault(node.name, now)
            if (self.steps.config.workflow.power_cycle_unresponsive and self.steps.provider.can_power_cycle
                    and now - since >= self.steps.config.workflow.unresponsive_grace_seconds):
                found.append(Candidate(node, NodeAction.POWER_CYCLE, node.reason or "Not responding", since))
            else:
                unattended.append(Unattended(node.name, "unresponsive", since))
        # Every candidate, a silent node's too (issue 12 review: a power cycle re-opened at once
        # for a node that revived and fell silent again, its grace skipped).
        handled = [c for c in found if self._already_handled(c)]
        unattended += [Unattended(c.node.name, "gave_up", c.detected_at) for c in handled]
        return [c for c in found if c not in handled], unattended

    def _already_handled(self, c: Candidate) -> bool:
        """The same flagging (same reason set at the same time) already had a workflow
        that finished: e.g. an admin resumed the node meanwhile and set it again unchanged
        would carry a new time. Prevents a loop on a node we gave up on."""
        past = self.journal.history(node=c.node.name)
        return bool(past) and past[-1].data.get("reason_time") == c.detected_at and past[-1].reason == c.reason

    def _recent_flags(self, candidates: List[Candidate], now: float, reset_at: Optional[float]) -> Set[str]:
        floor = max(now - self.steps.config.breaker.window_seconds, reset_at or 0.0)
        # Admissions of new nodes are not flags: adding 25 nodes must not pause remediation.
        recent = {wf.node for wf in self.journal.history(since=floor) if wf.detected_at >= floor and wf.action != ADMIT}
        return recent | {c.node.name for c in candidates if c.detected_at >= floor}

    def _recommend(self, candidates: List[Candidate]) -> None:
        for c in candidates:
            if self.recommended.get(c.node.name) == c.reason:
                continue
            self.recommended[c.node.name] = c.reason
            detail = {"action": c.action.value, "reason": c.reason, "state": c.node.state_text,
                      "mode": self.steps.config.controller.mode, "dry_run": self.steps.config.controller.dry_run}
            self.journal.record(c.node.name, "recommendation", detail)
            log.warning("controller.recommend", node=c.node.name, **detail,
                        next=f"{'wait for jobs, then ' if c.node.is_busy else ''}{c.action.value}")

    def _open(self, c: Candidate, now: float) -> Workflow:
        action = c.action
        ours = c.node.action_reason
        data = {"reason_time": c.detected_at, "step_at": now, "seen_reason": c.node.reason,
                "seen_time": ts(c.node.reason_time)}
        why = self.steps.escalation(c.node.name, action, ours.fault if ours else None, now)
        if why is not None:
            action = NodeAction.REPLACE
            data["escalated"] = why
        wf = self.journal.open_workflow(c.node.name, action.value, c.reason, Step.DRAIN.value, c.detected_at, data)
        self.metrics.started.labels(wf.action).inc()
        if why is not None:
            self.metrics.escalations.labels(c.action.value).inc()
        log.info("controller.workflow_started", node=wf.node, workflow=wf.id, action=wf.action, reason=c.reason,
                 escalated=why)
        return wf

    def _limits_allow(self, node: Node) -> bool:
        limits = self.steps.config.limits
        if len(self.remediating) >= limits.max_concurrent:
            return False
        for p in node.partitions:
            cap = max(1, math.floor(self.partition_sizes.get(p, 1) * limits.max_percent / 100))
            if sum(1 for parts in self.remediating.values() if p in parts) >= cap:
                return False
        return True

    def _guarded(self, work: Callable[[Workflow], None], wf: Workflow) -> None:
        try:
            work(wf)
        except SlurmError as e:
            log.warning("controller.step_error", node=wf.node, step=wf.step, error=str(e))

    def close(self) -> None:
        self.executor.shutdown(wait=True)
