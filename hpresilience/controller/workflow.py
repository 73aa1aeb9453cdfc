"""The per-node remediation workflow and the reconcile pass that drives it.

A pass reads every node once (one `scontrol -o show node`), picks up nodes
that carry an ``Action:`` reason (or are unresponsive past a grace period) and
moves each active workflow on by at most one step:

    drain ─┬─ reboot ──────→ await_boot ─┐
           ├─ replace ─────→ await_node ─┼─→ verify ─→ release ─→ done
           └─ power_cycle ─→ await_boot ─┘

- drain: jobs leave (FAIL/DRAIN let them finish; DOWN has none); the
  concurrency limits and the circuit breaker gate leaving this step.
- reboot / replace / power_cycle: the step is journaled *before* its side
  effect (scontrol reboot, a provider call) and the facts needed to recognise
  completion (BootTime before, provider notes) go with it, so a controller
  killed at any point neither repeats nor forgets it.
- a maintenance reservation (MAINT, users: the controller's user) is put on the
  node before any side effect and removed last, so no user job lands on it
  between a reboot and the verdict of its own check.
- verify: the node's own check (`hpresilience check`) runs on it through Slurm
  (srun -w NODE in that reservation); exit 0 → release; exit 1 → escalate
  (reboot → replace) or give up; the check not running at all is retried.

Giving up leaves the node DRAINed with a reason starting ``hpresilience:`` that
says why and names the workflow: no longer an ``Action:`` reason, so neither the
controller nor the agent loops on it; a human takes over.
"""
from __future__ import annotations

import datetime as dt
import enum
import math
import os
import pwd
import re
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import structlog

from ..slurm import Node, SlurmCommandError, SlurmError, SlurmGateway, SlurmUnavailable
from ..slurm.gateway import NodeState
from ..slurm.models import StepResult
from ..slurm.reason import AUTO_RESUME_MARK, EXPEDITE_MARK, Action, format_reason, parse_reason, sanitize_reason
from .config import ControllerConfig, expand_argv
from .journal import Journal, Workflow
from .metrics import ControllerMetrics
from .providers import Provider, ProviderError, ProviderInterrupted

log = structlog.get_logger(__name__)

# Slurm's BootTime moves by about a second between reads; a "new" boot is later than this.
BOOT_JITTER_SECONDS = 2.0
# A check that could not run (srun error, timeout, exit 2) is tried this many times.
VERIFY_ATTEMPTS = 3
# Reasons Slurm itself writes as a consequence of a reboot or of a node going
# silent. While a workflow owns a node past `drain` they are expected, not
# someone else's.
SLURM_REASONS = ("reboot issued", "reboot requested", "reboot asap", "reboot timed out", "reboot complete",
                 "node unexpectedly rebooted", "not responding", "power_down", "powered down")
GAVE_UP_PREFIX = "hpresilience:"
PAUSED_LOG_EVERY_SECONDS = 60.0


class Step(str, enum.Enum):
    DRAIN = "drain"
    REBOOT = "reboot"
    AWAIT_BOOT = "await_boot"
    REPLACE = "replace"
    AWAIT_NODE = "await_node"
    POWER_CYCLE = "power_cycle"
    VERIFY = "verify"
    RELEASE = "release"
    DONE = "done"


REBOOT, REPLACE, POWER_CYCLE = "reboot", "replace", "power_cycle"
FIRST_EFFECT = {REBOOT: Step.REBOOT, REPLACE: Step.REPLACE, POWER_CYCLE: Step.POWER_CYCLE}


def is_slurm_reason(reason: Optional[str]) -> bool:
    """A reason Slurm wrote because of a reboot or silence (see SLURM_REASONS).

    >>> is_slurm_reason("Node unexpectedly rebooted"), is_slurm_reason("bad fan")
    (True, False)
    """
    text = (reason or "").strip().lower()
    return any(text.startswith(r) for r in SLURM_REASONS)


def is_unresponsive(node: Node) -> bool:
    """A silent node nobody has claimed: no reason, or only Slurm's own."""
    if not node.flags & {"NOT_RESPONDING"} or node.flags & {"POWERED_DOWN", "POWERING_DOWN", "POWERING_UP"}:
        return False
    return not node.reason or is_slurm_reason(node.reason)


def _summary(output: str) -> str:
    r"""The check's first finding line, short enough for a Slurm reason.

    >>> _summary("REBOOT XID_79 [GPU 3]: fell off the bus\nsrun: error: n3: task 0: Exited with exit code 1\n")
    'REBOOT XID_79 [GPU 3]: fell off the bus'
    """
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("srun:")]
    return sanitize_reason(lines[0] if lines else output, 120)


def check_verdict(result: StepResult) -> str:
    """healthy | unhealthy | not_run. srun exits 1 for its own errors too (bad
    partition, node gone), so "unhealthy" needs srun's word that the task itself
    exited 1 (`hpresilience check`: 1 = findings, 2 = could not look).

    >>> check_verdict(StepResult(1, "XID 79\\nsrun: error: n3: task 0: Exited with exit code 1"))
    'unhealthy'
    >>> check_verdict(StepResult(1, "srun: error: Unable to allocate resources: Invalid partition name specified"))
    'not_run'
    """
    if result.returncode == 0:
        return "healthy"
    if result.returncode == 1 and re.search(r"task \d+: Exited with exit code 1\b", result.output):
        return "unhealthy"
    return "not_run"


def _ts(when: Optional[dt.datetime]) -> Optional[float]:
    return when.timestamp() if when is not None else None


@dataclass(frozen=True)
class Candidate:
    node: Node
    action: str
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
        self.config = config
        # Called between workflows: a pass of many slow Slurm calls still pings systemd's watchdog.
        self.heartbeat = heartbeat
        self.metrics = metrics or ControllerMetrics()
        self.gateway = gateway
        self.journal = journal
        self.provider = provider
        # Threads start only when needed; the limits, not the pool, bound the work in flight
        # (sized generously so raising max_concurrent by SIGHUP is not capped by it).
        self.executor = executor or ThreadPoolExecutor(max_workers=max(32, 2 * config.limits.max_concurrent),
                                                       thread_name_prefix="hpr-step")
        self.clock = clock
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.inflight: Dict[str, Future] = {}
        self.first_silent: Dict[str, float] = {}
        self.recommended: Dict[str, str] = {}
        self.last_paused_log = 0.0
        self.partition_sizes: Dict[str, int] = {}
        self.remediating: Dict[str, Set[str]] = {}   # workflow node -> its partitions, past `drain`
        # Fault injection for the crash tests in tests/integration/test_controller.py:
        # SIGKILL ourselves at a named point, e.g. "enter:reboot" or "effect:replace".
        self.crash_at = os.environ.get("HPR_TEST_CRASH_AT", "")

    # ------------------------------------------------------------------ pass
    @property
    def automatic(self) -> bool:
        return self.config.controller.mode == "automatic" and not self.config.controller.dry_run

    def run_pass(self) -> PassReport:
        started = time.monotonic()
        now = self.clock()
        report = PassReport()
        self._reap()
        nodes = self.gateway.nodes()
        by_name = {n.name: n for n in nodes}
        report.nodes = len(nodes)
        self.partition_sizes = {}
        for n in nodes:
            for p in n.partitions:
                self.partition_sizes[p] = self.partition_sizes.get(p, 0) + 1
        active = {wf.node: wf for wf in self.journal.active()}
        candidates = self._candidates(nodes, active, now)
        report.flagged = len(candidates) + len(active)
        breaker = self.journal.breaker()
        if not breaker.tripped and self.config.breaker.enabled and self.automatic:
            recent = self._recent_flags(candidates, now, breaker.reset_at)
            if len(recent) > self.config.breaker.max_new:
                detail = (f"{len(recent)} nodes flagged within {self.config.breaker.window_seconds:g}s "
                          f"(limit {self.config.breaker.max_new}): {', '.join(sorted(recent)[:20])}")
                self.journal.trip_breaker(detail)
                log.error("controller.breaker_tripped", detail=detail,
                          hint="automatic action paused; run `hpresilience controller resume` once understood")
                breaker = self.journal.breaker()
        report.paused = breaker.tripped
        if breaker.tripped and now - self.last_paused_log >= PAUSED_LOG_EVERY_SECONDS:
            self.last_paused_log = now
            log.error("controller.paused", detail=breaker.detail, since=breaker.tripped_at,
                      hint="run `hpresilience controller resume` to let automatic action continue")
        if not self.automatic:
            self._recommend(candidates)
            report.active = len(active)
            report.seconds = time.monotonic() - started
            return report
        self._expedite_requeued()
        if not breaker.tripped:
            for c in candidates:
                wf = self._open(c, now)
                active[wf.node] = wf
                report.started.append(wf.node)
        self.remediating = {wf.node: set(by_name[wf.node].partitions) if wf.node in by_name else set()
                            for wf in active.values() if wf.step != Step.DRAIN}
        for wf in active.values():
            if wf.node in self.inflight:
                continue
            self.heartbeat()
            try:
                self._advance(wf, by_name.get(wf.node), now, paused=breaker.tripped)
            except SlurmError as e:
                # slurmctld away, a refused command: the step is retried next pass.
                log.warning("controller.step_error", node=wf.node, step=wf.step, error=str(e))
        report.active = len(self.journal.active())
        report.seconds = time.monotonic() - started
        return report

    def _expedite_requeued(self) -> None:
        """`srun --auto-resume` requeued a job and marked its Comment (or Slurm requeued an
        auto-resume job whose batch host died): make it eligible now rather than after
        Slurm's requeue delay (~121 s before 25.11). The auto-resume runner cannot do it
        itself: the requeue kills it."""
        try:
            pending = self.gateway.pending_jobs()
        except SlurmError as e:
            log.warning("controller.expedite_failed", error=str(e))
            return
        for job in pending:
            requeued_auto_resume = AUTO_RESUME_MARK in job.comment and job.restart_count > 0
            if job.reason != "BeginTime" or not (EXPEDITE_MARK in job.comment or requeued_auto_resume):
                continue
            rest = " ".join(job.comment.replace(EXPEDITE_MARK, " ").split())
            try:
                self.gateway.update_job(job.job_id, now=True, comment=rest)
            except SlurmError as e:
                log.warning("controller.expedite_failed", job=job.job_id, error=str(e))
                continue
            log.info("controller.expedited", job=job.job_id, detail="requeued by auto-resume; eligible now")

    def _reap(self) -> None:
        for node, future in list(self.inflight.items()):
            if future.done():
                del self.inflight[node]
                error = future.exception()
                if error is not None:
                    log.error("controller.worker_error", node=node, error=f"{type(error).__name__}: {error}")

    def _candidates(self, nodes: List[Node], active: Dict[str, Workflow], now: float) -> List[Candidate]:
        found = []
        for node in nodes:
            if node.name in active:
                continue
            ours = node.action_reason
            if ours is not None:
                self.first_silent.pop(node.name, None)
                if node.is_drained or node.is_down:
                    found.append(Candidate(node, ours.action.value.lower(), node.reason or "",
                                           _ts(node.reason_time) or now))
                continue
            if not is_unresponsive(node):
                self.first_silent.pop(node.name, None)
                continue
            since = _ts(node.reason_time) if node.reason else None
            since = since or self.first_silent.setdefault(node.name, now)
            if (self.config.workflow.power_cycle_unresponsive and self.provider.can_power_cycle
                    and now - since >= self.config.workflow.unresponsive_grace_seconds):
                found.append(Candidate(node, POWER_CYCLE, node.reason or "Not responding", since))
        return [c for c in found if not self._already_handled(c)]

    def _already_handled(self, c: Candidate) -> bool:
        """The same flagging (same reason set at the same time) already had a workflow
        that finished: e.g. an admin resumed the node meanwhile and set it again unchanged
        would carry a new time. Prevents a loop on a node we gave up on."""
        past = self.journal.history(node=c.node.name)
        return bool(past) and past[-1].data.get("reason_time") == c.detected_at and past[-1].reason == c.reason

    def _recent_flags(self, candidates: List[Candidate], now: float, reset_at: Optional[float]) -> Set[str]:
        floor = max(now - self.config.breaker.window_seconds, reset_at or 0.0)
        recent = {wf.node for wf in self.journal.history(since=floor) if wf.detected_at >= floor}
        return recent | {c.node.name for c in candidates if c.detected_at >= floor}

    def _recommend(self, candidates: List[Candidate]) -> None:
        for c in candidates:
            if self.recommended.get(c.node.name) == c.reason:
                continue
            self.recommended[c.node.name] = c.reason
            detail = {"action": c.action, "reason": c.reason, "state": c.node.state_text,
                      "mode": self.config.controller.mode, "dry_run": self.config.controller.dry_run}
            self.journal.record(c.node.name, "recommendation", detail)
            log.warning("controller.recommend", node=c.node.name, **detail,
                        next=f"{'wait for jobs, then ' if c.node.is_busy else ''}{c.action}")

    def _open(self, c: Candidate, now: float) -> Workflow:
        action = c.action
        data = {"reason_time": c.detected_at, "step_at": now}
        if action == REBOOT:
            done = [wf.finished_at for wf in self.journal.history(node=c.node.name)
                    if wf.action == REBOOT and wf.status == "done" and wf.finished_at]
            if done and now - done[-1] < self.config.workflow.refault_window_seconds:
                action = REPLACE
                data["escalated"] = f"flagged for reboot again {now - done[-1]:.0f}s after the last reboot"
        wf = self.journal.open_workflow(c.node.name, action, c.reason, Step.DRAIN.value, c.detected_at, data)
        self.metrics.started.labels(wf.action).inc()
        log.info("controller.workflow_started", node=wf.node, workflow=wf.id, action=wf.action, reason=c.reason,
                 escalated=data.get("escalated"))
        return wf

    # ------------------------------------------------------------------ steps
    def _advance(self, wf: Workflow, node: Optional[Node], now: float, paused: bool) -> None:
        if node is None:
            self._finish(wf, "abandoned", "node is no longer in Slurm's configuration")
            return
        if self._foreign(wf, node):
            self._abandon_to_someone_else(wf, node)
            return
        step = Step(wf.step)
        if step is Step.DRAIN:
            self._drain(wf, node, now, paused)
        elif step is Step.REBOOT:
            self._reboot(wf, node)
        elif step in (Step.AWAIT_BOOT, Step.AWAIT_NODE):
            self._await(wf, node, now)
        elif step in (Step.REPLACE, Step.POWER_CYCLE, Step.VERIFY):
            work = self._provider_step if step is not Step.VERIFY else self._verify
            self.inflight[wf.node] = self.executor.submit(self._guarded, work, wf)
        elif step is Step.RELEASE:
            self._release(wf)

    def _foreign(self, wf: Workflow, node: Node) -> bool:
        """Someone else (an admin, NHC) put their reason on the node: hands off."""
        if not node.reason or node.action_reason is not None:
            return False
        if wf.step != Step.DRAIN or wf.action == POWER_CYCLE:
            return not is_slurm_reason(node.reason) and not node.reason.startswith(GAVE_UP_PREFIX)
        return True

    def _abandon_to_someone_else(self, wf: Workflow, node: Node) -> None:
        log.warning("controller.hands_off", node=node.name, workflow=wf.id, reason=node.reason,
                    detail="someone else set this reason; the workflow stops and the node is theirs")
        self._drop_reservation(node.name)
        self._finish(wf, "abandoned", f"reason changed to {node.reason!r} by someone else")

    def _drain(self, wf: Workflow, node: Node, now: float, paused: bool) -> None:
        if node.action_reason is None and not node.reason and (node.available or node.is_busy):
            self._finish(wf, "abandoned", "returned to service by someone else")
            return
        if node.is_busy and not node.is_down:
            timeout = self.config.workflow.drain_timeout_seconds
            if not timeout or now - wf.data.get("step_at", now) < timeout:
                return
            log.warning("controller.drain_timeout", node=node.name, seconds=timeout)
            self.gateway.set_state(node.name, NodeState.DOWN, node.reason or wf.reason)  # kills the jobs
            self.journal.record(node.name, "drain_timeout", {"seconds": timeout}, wf.id)
            return
        if paused or not self._limits_allow(node):
            return
        if wf.action == REPLACE and not self.provider.can_replace:
            self._give_up(wf, node, f"replacement needed but provider {self.provider.name!r} cannot replace")
            return
        if wf.action == POWER_CYCLE and not self.provider.can_power_cycle:
            self._give_up(wf, node, f"power cycle needed but provider {self.provider.name!r} cannot")
            return
        nxt = FIRST_EFFECT[wf.action]
        moved = self._to(wf, nxt, {"boot_before": _ts(node.boot_time)})
        if moved is not None:
            self.remediating[wf.node] = set(node.partitions)
            if nxt is Step.REBOOT:
                self._reboot(moved, node)
            else:
                self.inflight[wf.node] = self.executor.submit(self._guarded, self._provider_step, moved)

    def _limits_allow(self, node: Node) -> bool:
        limits = self.config.limits
        if len(self.remediating) >= limits.max_concurrent:
            return False
        for p in node.partitions:
            cap = max(1, math.floor(self.partition_sizes.get(p, 1) * limits.max_percent / 100))
            if sum(1 for parts in self.remediating.values() if p in parts) >= cap:
                return False
        return True

    def _reboot(self, wf: Workflow, node: Node) -> None:
        # Evidence that the reboot was already asked for (or even done) before a
        # crash: then never ask again.
        if not (node.reboot_pending or self._booted(node, wf)):
            self._reserve(node.name)
            try:
                self.gateway.reboot(node.name, reason=self._reason(wf, Action.REBOOT), asap=True,
                                    next_state=NodeState.RESUME)
            except SlurmUnavailable:
                raise  # slurmctld away: the next pass asks again
            except SlurmCommandError as e:
                # Slurm refuses to reboot this node (e.g. no RebootProgram): it will not get better.
                self._escalate_or_give_up(wf, node, f"scontrol reboot refused: {e.stderr or e}")
                return
            self._crash_point(f"effect:{Step.REBOOT.value}")
        self._to(wf, Step.AWAIT_BOOT, {"reboot_issued_at": self.clock()})

    def _await(self, wf: Workflow, node: Node, now: float) -> None:
        if self._booted(node, wf) and node.is_responding and not node.reboot_pending:
            self._to(wf, Step.VERIFY, {"booted_at": _ts(node.boot_time), "verify_attempts": 0})
            return
        rebooting = wf.step == Step.AWAIT_BOOT
        limit = (self.config.workflow.reboot_timeout_seconds if rebooting
                 else self.config.workflow.register_timeout_seconds)
        if now - wf.data.get("step_at", now) < limit:
            return
        why = f"no new boot within {limit:g}s after {'the ' + wf.action if rebooting else 'replacement'}"
        if rebooting:
            self._escalate_or_give_up(wf, node, why)
        else:
            self._give_up(wf, node, why)

    def _escalate_or_give_up(self, wf: Workflow, node: Node, why: str) -> None:
        if self.provider.can_replace:
            self._escalate(wf, node, why)
        else:
            self._give_up(wf, node, f"{why}; replacement needed but provider {self.provider.name!r} cannot replace")

    def _escalate(self, wf: Workflow, node: Node, why: str) -> None:
        """Reboot (or power cycle) did not help: replace, same workflow."""
        log.warning("controller.escalate", node=node.name, workflow=wf.id, why=why)
        self._set_reason(node, format_reason(Action.REPLACE, why))
        # Facts of the earlier attempt (its check, its provider notes) must not leak into this one.
        moved = self._to(wf, Step.REPLACE, {"escalated": why, "boot_before": _ts(node.boot_time),
                                            "command_started": None, "spare": None, "resumed_at": None,
                                            "verify_attempts": 0}, action=REPLACE)
        if moved is not None:
            self.inflight[wf.node] = self.executor.submit(self._guarded, self._provider_step, moved)

    def _provider_step(self, wf: Workflow) -> None:
        node = wf.node

        def note(facts: Dict[str, object]) -> None:
            self.journal.note(wf.id, wf.step, dict(facts))

        self._reserve(node)
        facts = dict(self.journal.workflow(wf.id).data)
        call = self.provider.power_cycle if wf.step == Step.POWER_CYCLE else self.provider.replace
        try:
            result = call(node, wf.reason, facts, note)
        except ProviderInterrupted as e:
            log.warning("controller.provider_interrupted", node=node, workflow=wf.id, detail=str(e))
            self._to(wf, Step.AWAIT_NODE if wf.step == Step.REPLACE else Step.AWAIT_BOOT, {"interrupted": str(e)})
            return
        except ProviderError as e:
            log.error("controller.provider_failed", node=node, workflow=wf.id, error=str(e))
            self._give_up(wf, self.gateway.node(node), f"{self.provider.name} provider failed: {e}")
            return
        self._crash_point(f"effect:{wf.step}")
        if result.spare:
            self._finish_with_spare(wf, result.spare)
        elif wf.step == Step.REPLACE:
            self._to(wf, Step.AWAIT_NODE, {"provider": result.detail})
        else:
            self._to(wf, Step.AWAIT_BOOT, {"provider": result.detail})

    def _finish_with_spare(self, wf: Workflow, spare: str) -> None:
        why = f"{GAVE_UP_PREFIX} awaiting hardware repair, replaced by {spare} (workflow {wf.id})"
        node = self.gateway.node(wf.node)
        if not self._foreign(wf, node):
            self.gateway.set_state(wf.node, NodeState.DRAIN, why)
        self._drop_reservation(wf.node)
        self._finish(wf, "done", f"spare {spare} in service", {"spare": spare})

    def _verify(self, wf: Workflow) -> None:
        node = self.gateway.node(wf.node)
        if self._foreign(wf, node):
            self._abandon_to_someone_else(wf, node)
            return
        since = wf.data.get("resumed_at") or wf.data.get("booted_at")
        if since and node.action_reason is not None and (_ts(node.reason_time) or 0) > float(since):
            # Flagged again (by the agent, or an admin) since the new boot or since we
            # returned it for the check: the fault is still there.
            self._verification_failed(wf, node, f"flagged again: {node.reason}")
            return
        if not self.config.verify.enabled:
            self._to(wf, Step.RELEASE, {"verified": "skipped (verify.enabled = false)"})
            return
        if not node.is_responding:
            # Registered, then silent again: wait, but not forever.
            if self.clock() - wf.data.get("step_at", self.clock()) > self.config.workflow.register_timeout_seconds:
                self._give_up(wf, node, "not responding since its new boot")
            return
        self._reserve(node.name)
        if node.is_drained or node.is_down:
            # Inside our reservation nobody else can use it; the check needs it schedulable.
            self.gateway.set_state(node.name, NodeState.RESUME)
            wf = self.journal.note(wf.id, wf.step, {"resumed_at": self.clock()}) or wf
        verify = self.config.verify
        argv = expand_argv(verify.command, node=node.name, reason=wf.reason, action=wf.action)
        try:
            result = self.gateway.run_on_node(node.name, argv, timeout=verify.timeout_seconds,
                                              reservation=self._reservation(node.name), srun=verify.srun)
        except SlurmError as e:  # srun missing, refused...: the check did not run
            result = StepResult(None, str(e))
        verdict = check_verdict(result)
        if verdict == "healthy":
            self._to(wf, Step.RELEASE, {"verified_at": self.clock(), "verify_output": sanitize_reason(result.output,
                                                                                                       400)})
        elif verdict == "unhealthy":
            self._verification_failed(wf, self.gateway.node(node.name), f"check failed: {_summary(result.output)}")
        else:
            attempts = int(wf.data.get("verify_attempts", 0)) + 1
            output = sanitize_reason(result.output, 400)
            log.warning("controller.verify_not_run", node=node.name, workflow=wf.id, attempt=attempts,
                        returncode=result.returncode, output=output)
            if attempts >= VERIFY_ATTEMPTS:
                # Our verification is broken (srun, the command), not necessarily the node:
                # never escalate to a replacement on that; a human looks.
                self._give_up(wf, self.gateway.node(node.name), f"check could not run {attempts} times: {output}")
            else:
                self.journal.note(wf.id, wf.step, {"verify_attempts": attempts})

    def _verification_failed(self, wf: Workflow, node: Node, why: str) -> None:
        if wf.action != REPLACE:
            self._escalate_or_give_up(wf, node, f"after {wf.action}: {why}")
        else:
            self._give_up(wf, node, f"after {wf.action}: {why}")

    def _release(self, wf: Workflow) -> None:
        node = self.gateway.node(wf.node)
        if node.action_reason is not None or (node.reason and is_slurm_reason(node.reason)):
            self.gateway.set_state(node.name, NodeState.RESUME)
        self._drop_reservation(node.name)
        self._finish(wf, "done", "back in service", {"in_service_at": self.clock()})

    # ----------------------------------------------------------------- helpers
    def _guarded(self, work: Callable[[Workflow], None], wf: Workflow) -> None:
        try:
            work(wf)
        except SlurmError as e:
            log.warning("controller.step_error", node=wf.node, step=wf.step, error=str(e))

    def _to(self, wf: Workflow, step: Step, data: Dict[str, object],
            action: Optional[str] = None) -> Optional[Workflow]:
        moved = self.journal.advance(wf.id, wf.step, step.value, {**data, "step_at": self.clock()}, action=action)
        if moved is None:
            log.warning("controller.step_lost", node=wf.node, workflow=wf.id, step=wf.step,
                        detail="another controller instance moved this workflow; not acting")
            return None
        log.info("controller.step", node=wf.node, workflow=wf.id, step=step.value, action=moved.action)
        self._crash_point(f"enter:{step.value}")
        return moved

    def _finish(self, wf: Workflow, status: str, detail: str, data: Optional[Dict[str, object]] = None) -> None:
        done = self.journal.advance(wf.id, wf.step, Step.DONE.value, {**(data or {}), "outcome": detail},
                                    status=status)
        self.remediating.pop(wf.node, None)
        if done is not None:
            self.metrics.finished.labels(done.action, status).inc()
            if done.time_to_service is not None:
                self.metrics.time_to_service.labels(done.action).observe(done.time_to_service)
            log.info("controller.workflow_finished", node=wf.node, workflow=wf.id, status=status, detail=detail,
                     seconds=round(done.finished_at - done.detected_at, 1) if done.finished_at else None)

    def _give_up(self, wf: Workflow, node: Node, why: str) -> None:
        """Leave the node out of service with a reason a human will read."""
        log.error("controller.gave_up", node=node.name, workflow=wf.id, why=why)
        if not self._foreign(wf, node):
            self.gateway.set_state(node.name, NodeState.DRAIN,
                                   f"{GAVE_UP_PREFIX} {why} (workflow {wf.id}; was: {wf.reason})")
        self._drop_reservation(node.name)
        self._finish(wf, "failed", why)

    def _set_reason(self, node: Node, reason: str) -> None:
        state = NodeState.DOWN if node.is_down else NodeState.FAIL
        self.gateway.set_state(node.name, state, reason)

    def _reason(self, wf: Workflow, action: Action) -> str:
        """The workflow's reason if it is an Action: reason, else a plain one for `action`."""
        ours = parse_reason(wf.reason)
        return str(ours) if ours is not None else format_reason(action)

    def _reservation(self, node: str) -> str:
        return f"{self.config.verify.reservation_prefix}{node}"

    def _reserve(self, node: str) -> None:
        name = self._reservation(node)
        if self.gateway.reservation(name) is None:
            self.gateway.create_reservation(name, node, users=[self.user], minutes=None)

    def _drop_reservation(self, node: str) -> None:
        self.gateway.delete_reservation(self._reservation(node))

    def _booted(self, node: Node, wf: Workflow) -> bool:
        before = wf.data.get("boot_before")
        now_boot = _ts(node.boot_time)
        return now_boot is not None and (before is None or now_boot > float(before) + BOOT_JITTER_SECONDS)

    def _crash_point(self, name: str) -> None:
        if self.crash_at == name:
            log.warning("controller.test_crash", point=name)
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

