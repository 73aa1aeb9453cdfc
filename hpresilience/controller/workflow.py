"""The per-node remediation workflow: its steps, each moving a journaled workflow on.

    drain ─┬─ reboot ──────→ await_boot ─┐
           ├─ replace ─────→ await_node ─┼─→ verify ─→ release ─→ done
           └─ power_cycle ─→ await_boot ─┘
                                   verify ─→ deepcheck ─→ release

- drain: jobs leave (FAIL/DRAIN let them finish; DOWN has none); the reconcile
  pass (reconcile.py) gates leaving this step with the limits and the breaker.
- reboot / replace / power_cycle: the step is journaled *before* its side
  effect (scontrol reboot, a provider call) and the facts needed to recognise
  completion (BootTime before, provider facts) go with it, so a controller
  killed at any point neither repeats nor forgets it.
- a maintenance reservation (MAINT, users: the controller's user) is put on the
  node before any side effect and removed last, so no user job lands on it
  between a reboot and the verdict of its own check.
- verify: the node's own check (`hpresilience check`) runs on it through Slurm
  (srun -w NODE in that reservation).
- deepcheck: the gate (issue 10): `hpresilience deepcheck` at the level configured
  for the remedy (quick after a reboot, full after a replacement) in the same
  reservation; a failure escalates like a fault after the remedy (reboot -> replace
  -> a human), with the failing check in the reason and in history.
- every step first re-reads the node and honours its newest reason
  (verdict.reason_change, issue 9): someone else's reason ends the workflow; an
  upgrade to Replace switches it to a replacement; a fault flagged after the
  workflow's own is never cleared by it.

Admission (issue 10, `deepcheck.hold_new_nodes`): a node that never passed a deep
check (new, or re-added to Slurm's configuration) is held in a workflow of action
``admit``: drained with a reason of ours, then verify -> deepcheck (the new-node
level) -> release. A failure gives the node to a human: it never served, so it is
not ours to replace.

Escalation has one owner, `Steps.escalation` (issue 9): Reboot becomes Replace only
when the same fault (code and device) returns on the same node after a reboot, or
when the reboot itself does not happen (refused, no new boot).

Giving up leaves the node DRAINed with a reason starting ``hpresilience:`` that
says why and names the workflow: no longer an ``Action:`` reason, so neither the
controller nor the agent loops on it; a human takes over.

Steps run in the pass thread or in a worker thread (provider calls, verify). They
change only Slurm and the journal (which has its own lock), never the pass's
in-memory state: the pass re-reads the journal (issue 9, defect 13).
"""
from __future__ import annotations

import enum
import os
import pwd
import re
import signal
import time
from typing import Callable, Dict, List, Optional, Tuple

import structlog

from ..action import NodeAction
from ..deepcheck.checks import CHECKS as KNOWN_CHECKS
from ..deepcheck.result import Status, describe
from ..slurm import Node, SlurmCommandError, SlurmGateway, SlurmUnavailable
from ..slurm.gateway import NodeState
from ..slurm.models import StepResult
from ..slurm.reason import GAVE_UP_PREFIX, Fault, ReasonOwner, format_reason, parse_reason, sanitize_reason
from .config import LEVELS, ControllerConfig, expand_argv
from .journal import Journal, Workflow
from .metrics import ADMIT, ControllerMetrics
from .providers import Provider, ProviderError, ProviderInterrupted
from .verdict import DEEPCHECK_FAULT, Change, check_verdict, gate_record, gate_report, reason_change, summary, ts

log = structlog.get_logger(__name__)

# Slurm's BootTime moves by about a second between reads; a "new" boot is later than this.
BOOT_JITTER_SECONDS = 2.0
# A check that could not run (srun error, timeout, exit 2) is tried this many times.
VERIFY_ATTEMPTS = 3
# A node that restarts on its own after its checks is checked again on its new boot this many
# times; once more, and a human looks at it (a node that keeps crashing is not ours to release).
RECHECKS = 2
# `hpresilience check` prints one line per finding: "REBOOT   XID_79 [GPU 3 (0000:b9:00.0)]: message".
_CHECK_FINDING_RE = re.compile(r"^(?P<action>NONE|REBOOT|REPLACE)\s+(?P<code>[A-Z][A-Z0-9_]*)"
                               r"(?: \[(?P<entity>[^\[\]]*)\])?: ", re.MULTILINE)


class Step(str, enum.Enum):
    DRAIN = "drain"
    REBOOT = "reboot"
    AWAIT_BOOT = "await_boot"
    REPLACE = "replace"
    AWAIT_NODE = "await_node"
    POWER_CYCLE = "power_cycle"
    VERIFY = "verify"
    DEEPCHECK = "deepcheck"
    RELEASE = "release"
    DONE = "done"


FIRST_EFFECT = {NodeAction.REBOOT: Step.REBOOT, NodeAction.REPLACE: Step.REPLACE,
                NodeAction.POWER_CYCLE: Step.POWER_CYCLE}
# Steps that run in a worker thread: they wait on a provider or on the node's checks.
WORKER_STEPS = (Step.REPLACE, Step.POWER_CYCLE, Step.VERIFY, Step.DEEPCHECK)
# Steps after the remedy: a fault flagged now is judged as one that survived the remedy.
CHECK_STEPS = (Step.VERIFY, Step.DEEPCHECK, Step.RELEASE)
# Facts of one remedy attempt: cleared when a workflow escalates, so the provider and the
# check of the replacement start afresh (defect 11: `powered_up` of a power cycle survived
# the escalation and the power-save provider never replaced).
# `checked_boot` and `rechecks` too: the replacement's boot is not a restart of the checked one, and
# new hardware starts with no restarts counted against it (issue 14 reviews).
ATTEMPT_FACTS = {"provider_facts": {}, "resumed_at": None, "verify_attempts": 0, "deepcheck_attempts": 0,
                 "checked_boot": None, "rechecks": 0}


def workflow_fault(wf: Workflow) -> Optional[Fault]:
    """The fault a workflow was opened for (from its reason's [CODE@entity] tag), if known."""
    ours = parse_reason(wf.reason)
    return ours.fault if ours is not None else None


def check_faults(output: str) -> List[Tuple[str, Fault]]:
    """(action, Fault) of every finding line `hpresilience check` printed.

    >>> check_faults("REBOOT   XID_79 [GPU 3 (0000:b9:00.0)]: fell off\\nhealthy")
    [('REBOOT', Fault(code='XID_79', entity='GPU 3 (0000:b9:00.0)'))]
    """
    return [(m["action"], Fault(m["code"], m["entity"] or None)) for m in _CHECK_FINDING_RE.finditer(output)]


class Steps:
    """Every step of a workflow; one call moves one workflow on by at most one step."""

    def __init__(self, config: ControllerConfig, gateway: SlurmGateway, journal: Journal, provider: Provider,
                 clock: Callable[[], float] = time.time, metrics: Optional[ControllerMetrics] = None):
        self.config = config
        self.gateway = gateway
        self.journal = journal
        self.provider = provider
        self.clock = clock
        self.metrics = metrics or ControllerMetrics()
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        # Fault injection for the crash tests in tests/integration/test_controller.py:
        # SIGKILL ourselves at a named point, e.g. "enter:reboot" or "effect:replace".
        self.crash_at = os.environ.get("HPR_TEST_CRASH_AT", "")

    # ----------------------------------------------------------- escalation
    def escalation(self, node: str, action: NodeAction, fault: Optional[Fault], now: float) -> Optional[str]:
        """Why a new Reboot workflow starts as a replacement, or None: the same fault
        (code and device) flagged again on this node within `refault_window_seconds` of a
        completed reboot of it. Any other fault, or one whose identity is unknown (an
        admin's bare `Action: Reboot`), is a new fault: no escalation (issue 9, defect 8)."""
        if action is not NodeAction.REBOOT or fault is None:
            return None
        window = self.config.workflow.refault_window_seconds
        for past in reversed(self.journal.history(node=node)):
            if (past.action == NodeAction.REBOOT.value and past.status == "done" and past.finished_at
                    and now - past.finished_at < window and fault.matches(workflow_fault(past))):
                return f"{fault} flagged again {now - past.finished_at:.0f}s after its reboot"
        return None

    # ------------------------------------------------------------- dispatch
    def advance(self, wf: Workflow, node: Optional[Node], now: float) -> Optional[Workflow]:
        """One step of `wf` in the pass thread. Returns the workflow when the pass must go
        on with it: in drain (the pass gates leaving it) or at a worker step (the pass
        submits it); else None."""
        if node is None:
            self.finish(wf, "abandoned", "node is no longer in Slurm's configuration")
            return None
        wf = self._honour_newest_reason(wf, node)
        if wf is None:
            return None
        step = Step(wf.step)
        if step is Step.DRAIN:
            return wf if self.drain_ready(wf, node, now) else None
        if step is Step.REBOOT:
            self.reboot(wf, node)
        elif step in (Step.AWAIT_BOOT, Step.AWAIT_NODE):
            self.await_node(wf, node, now)
        elif step is Step.RELEASE:
            self.release(wf)
        elif step in WORKER_STEPS:
            return wf
        return None

    def _honour_newest_reason(self, wf: Workflow, node: Node) -> Optional[Workflow]:
        """Issue 9: the node's reason as it is now decides before any step acts."""
        change = reason_change(wf.data, wf.action, node)
        if change is Change.FOREIGN:
            self._hand_off(wf, node)
            return None
        if change is Change.NONE:
            return wf
        if wf.action == ADMIT:
            # An Action: reason on a held node asks for a remedy an admission does not have: the
            # admission ends and the next pass opens that workflow (issue 10 review: accepting it
            # here let the admission's resume clear it).
            self.finish(wf, "done", f"superseded by {node.reason!r}")
            return None
        step = Step(wf.step)
        if change is Change.UPGRADE:
            # Defect 3: a Replace raised while a Reboot waited was lost.
            if step is Step.DRAIN:
                log.warning("controller.upgrade", node=node.name, workflow=wf.id, reason=node.reason)
                return self.journal.advance(wf.id, wf.step, wf.step, self._seen(node, reason=node.reason or wf.reason),
                                            action=NodeAction.REPLACE.value)
            if step in (Step.REBOOT, Step.AWAIT_BOOT, Step.POWER_CYCLE, *CHECK_STEPS):
                self.escalate(wf, node, f"flagged for replacement: {node.reason}", write_reason=False)
                return None
            return self._accept(wf, node)
        # A fresh fault flagged after the workflow's own.
        if step in (Step.DRAIN, Step.REBOOT, Step.REPLACE, Step.POWER_CYCLE):
            return self._accept(wf, node)  # the remedy still to come covers it
        # AWAIT_NODE: the replacement is done; a flag now is about the new hardware and must not be
        # cleared by the resume before its checks (found by the property suite, issue 10 session).
        if step is Step.AWAIT_BOOT:
            return self._accept(wf, node)  # flagged while rebooting: looked at once it is back
        self._fault_after_remedy(wf, node, f"flagged again: {node.reason}",
                                 [(a.action.value.upper(), a.fault)] if (a := node.action_reason) else [])
        return None

    def _accept(self, wf: Workflow, node: Node) -> Optional[Workflow]:
        return self.journal.note(wf.id, wf.step, self._seen(node))

    @staticmethod
    def _seen(node: Node, reason: Optional[str] = None) -> Dict[str, object]:
        return {"seen_reason": reason or node.reason, "seen_time": ts(node.reason_time)}

    def _fault_after_remedy(self, wf: Workflow, node: Node, why: str, found: List[Tuple[str, Fault]]) -> None:
        """After the remedy, a fault is there (the check found it, or it was flagged again).
        The same fault returning escalates a reboot; a new fault is not ours to clear: this
        workflow ends and, if the fault is on the node as an Action: reason, the next pass
        opens a workflow for it; otherwise a human looks."""
        fault = workflow_fault(wf)
        same = fault is not None and any(fault.matches(f) for _, f in found)
        harsher = any(a == "REPLACE" for a, _ in found)
        if wf.action not in (NodeAction.REPLACE.value, ADMIT) and (same or harsher):
            self.escalate(wf, node, f"after {wf.action}: {why}")
        elif node.action_reason is not None and not same and reason_change(wf.data, wf.action, node) is not Change.NONE:
            self.finish(wf, "done", f"superseded by a new fault: {node.reason}")
        else:
            self.give_up(wf, node, f"after {wf.action}: {why}")

    def _hand_off(self, wf: Workflow, node: Node) -> None:
        log.warning("controller.hands_off", node=node.name, workflow=wf.id, reason=node.reason,
                    detail="someone else set this reason; the workflow stops and the node is theirs")
        self._drop_reservation(node.name)
        self.finish(wf, "abandoned", f"reason changed to {node.reason!r} by someone else")

    # ---------------------------------------------------------------- steps
    def drain_ready(self, wf: Workflow, node: Node, now: float) -> bool:
        """Still in drain: True once the node's jobs are gone (or the drain timed out and
        the node was set DOWN). False while waiting or when the workflow ended."""
        if node.action_reason is None and not node.reason and (node.available or node.is_busy):
            if wf.action == ADMIT:  # an admin resumed a held node: their call, it is admitted
                self.journal.admit([node.name], why="resumed by someone else while held")
            self.finish(wf, "abandoned", "returned to service by someone else")
            return False
        if node.is_busy and not node.is_down:
            if wf.action == ADMIT:
                return False  # a job that landed on a new node finishes: never killed for an admission
            timeout = self.config.workflow.drain_timeout_seconds
            if not timeout or now - wf.data.get("step_at", now) < timeout:
                return False
            log.warning("controller.drain_timeout", node=node.name, seconds=timeout)
            reason = node.reason if node.action_reason is not None else self._reason(wf)
            self._write_reason(wf, node, NodeState.DOWN, reason)  # kills the jobs
            self.journal.record(node.name, "drain_timeout", {"seconds": timeout}, wf.id)
            return False
        return True

    def leave_drain(self, wf: Workflow, node: Node) -> Optional[Workflow]:
        """Move to the first effect step (the pass has checked the limits); the reboot
        itself is issued at once, a provider step is returned for a worker. An admission
        has no effect: straight to the checks."""
        if wf.action == ADMIT:
            return self.to(wf, Step.VERIFY, {"verify_attempts": 0})
        action = NodeAction(wf.action)
        if action is NodeAction.REPLACE and not self.provider.can_replace:
            self.give_up(wf, node, f"replacement needed but provider {self.provider.name!r} cannot replace")
            return None
        if action is NodeAction.POWER_CYCLE and not self.provider.can_power_cycle:
            self.give_up(wf, node, f"power cycle needed but provider {self.provider.name!r} cannot")
            return None
        nxt = FIRST_EFFECT[action]
        moved = self.to(wf, nxt, {"boot_before": ts(node.boot_time)})
        if moved is None:
            return None
        if nxt is Step.REBOOT:
            self.reboot(moved, node)
            return None
        return moved

    def reboot(self, wf: Workflow, node: Node) -> None:
        # Evidence that the reboot was already asked for (or even done) before a
        # crash: then never ask again.
        if not (node.reboot_pending or self._booted(node, wf)):
            self._reserve(node.name)
            try:
                # The node's own Action: reason when it has one: a fault flagged while the jobs
                # drained is kept, not overwritten with the workflow's first reason.
                reason = node.reason if node.action_reason is not None else self._reason(wf)
                self.gateway.reboot(node.name, reason=reason, asap=True, next_state=NodeState.RESUME)
            except SlurmUnavailable:
                raise  # slurmctld away: the next pass asks again
            except SlurmCommandError as e:
                # Slurm refuses to reboot this node (e.g. no RebootProgram): it will not get better.
                self._escalate_or_give_up(wf, node, f"scontrol reboot refused: {e.stderr or e}")
                return
            self.crash_point(f"effect:{Step.REBOOT.value}")
        moved = self.to(wf, Step.AWAIT_BOOT, {"reboot_issued_at": self.clock()})
        if moved is not None:
            # Our own reboot reason (same text, new time) is not someone's fresh flag.
            self._accept(moved, self.gateway.node(node.name))

    def await_node(self, wf: Workflow, node: Node, now: float) -> None:
        if self._booted(node, wf) and node.is_responding and not node.reboot_pending:
            self.to(wf, Step.VERIFY, {"booted_at": ts(node.boot_time), "verify_attempts": 0, "checked_boot": None})
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
            self.give_up(wf, node, why)

    def _escalate_or_give_up(self, wf: Workflow, node: Node, why: str) -> None:
        if self.provider.can_replace:
            self.escalate(wf, node, why)
        else:
            self.give_up(wf, node, f"{why}; replacement needed but provider {self.provider.name!r} cannot replace")

    def escalate(self, wf: Workflow, node: Node, why: str, write_reason: bool = True) -> None:
        """The reboot (or power cycle) did not help: replace, same workflow. The pass
        submits the provider step."""
        if not self.provider.can_replace:
            self.give_up(wf, node, f"{why}; replacement needed but provider {self.provider.name!r} cannot replace")
            return
        log.warning("controller.escalate", node=node.name, workflow=wf.id, why=why)
        if write_reason:
            # Defect 5: re-read and refuse when someone else's reason arrived meanwhile.
            written = self._write_reason(wf, node, NodeState.DOWN if node.is_down else NodeState.FAIL,
                                         format_reason(NodeAction.REPLACE, why, workflow_fault(wf)))
            if written is None:
                return
            node = written
        moved = self.to(wf, Step.REPLACE, {"escalated": why, "boot_before": ts(node.boot_time), **ATTEMPT_FACTS,
                                           **self._seen(node)}, action=NodeAction.REPLACE.value)
        if moved is not None and write_reason:
            # Our own decisions only: a newer Action: Replace someone else set (write_reason=False)
            # is a new request, not an escalation, whatever step it arrives in (issue 12 review).
            self.metrics.escalations.labels(wf.action).inc()

    def provider_step(self, wf: Workflow) -> None:
        """A worker: the provider replaces or power-cycles the node."""
        node = wf.node
        self._reserve(node)
        facts = dict(self.journal.workflow(wf.id).data.get("provider_facts") or {})

        def note(new: Dict[str, object]) -> None:
            facts.update(new)
            self.journal.note(wf.id, wf.step, {"provider_facts": dict(facts)})

        call = self.provider.power_cycle if wf.step == Step.POWER_CYCLE else self.provider.replace
        try:
            result = call(node, self._reason(wf), dict(facts), note)
        except ProviderInterrupted as e:
            log.warning("controller.provider_interrupted", node=node, workflow=wf.id, detail=str(e))
            self.to(wf, Step.AWAIT_NODE if wf.step == Step.REPLACE else Step.AWAIT_BOOT, {"interrupted": str(e)})
            return
        except ProviderError as e:
            log.error("controller.provider_failed", node=node, workflow=wf.id, error=str(e))
            self.give_up(wf, self.gateway.node(node), f"{self.provider.name} provider failed: {e}")
            return
        self.crash_point(f"effect:{wf.step}")
        if result.spare:
            self._finish_with_spare(wf, result.spare)
            return
        # The provider may have written our reason again (POWER_DOWN_FORCE): that is not a new flag.
        now = self.gateway.node(node)
        seen = self._seen(now) if now.action_reason is not None else {}
        nxt = Step.AWAIT_NODE if wf.step == Step.REPLACE else Step.AWAIT_BOOT
        self.to(wf, nxt, {"provider": result.detail, **seen})

    def _finish_with_spare(self, wf: Workflow, spare: str) -> None:
        why = f"{GAVE_UP_PREFIX} awaiting hardware repair, replaced by {spare} (workflow {wf.id})"
        node = self.gateway.node(wf.node)
        self._write_reason(wf, node, NodeState.DRAIN, why)
        self._drop_reservation(wf.node)
        self.finish(wf, "done", f"spare {spare} in service", {"spare": spare})

    def verify(self, wf: Workflow) -> None:
        """A worker: the node's own check, through srun in our reservation."""
        ready = self._ready_for_checks(wf)
        if ready is None:
            return
        wf, node = ready
        boot = {"checked_boot": ts(node.boot_time)}
        if not self.config.verify.enabled:
            self._verified(wf, {"verified": "skipped (verify.enabled = false)", **boot})
            return
        verify = self.config.verify
        result = self._run_on_node(node, expand_argv(verify.command, node=node.name, reason=wf.reason,
                                                      action=wf.action), verify.timeout_seconds, verify.srun)
        verdict = check_verdict(result)
        if verdict == "healthy":
            self._verified(wf, {"verified_at": self.clock(), "verify_output": sanitize_reason(result.output, 400),
                                **boot})
        elif verdict == "unhealthy":
            self._fault_after_remedy(wf, self.gateway.node(node.name), f"check failed: {summary(result.output)}",
                                     check_faults(result.output))
        else:
            self._not_run(wf, node, "check", result)

    def _verified(self, wf: Workflow, data: Dict[str, object]) -> None:
        gate = self.config.deepcheck.level_after(wf.action)
        if gate is None:
            self.to(wf, Step.RELEASE, {**data, "deepcheck": "off"})
        else:
            self.to(wf, Step.DEEPCHECK, {**data, "deepcheck_level": gate, "deepcheck_attempts": 0})

    def deepcheck(self, wf: Workflow) -> None:
        """A worker: the deep-check gate (issue 10), `hpresilience deepcheck` on the node in
        our reservation. Pass: release. Fail: the remedy did not make the node good:
        escalate a reboot to a replacement, give a replacement up to a human. Could not
        run: tried again, then a human (never a replacement on our own inability)."""
        ready = self._ready_for_checks(wf)
        if ready is None:
            return
        wf, node = ready
        gate = self.config.deepcheck
        level = str(wf.data["deepcheck_level"])
        result = self._run_on_node(node, expand_argv(gate.command, node=node.name, reason=wf.reason,
                                                      action=wf.action, level=level),
                                   gate.timeout_seconds[level], self._gate_srun(node), job_name="hpr-deepcheck")
        report = gate_report(result)
        if report is None or report.status not in (Status.PASS, Status.FAIL):
            self._not_run(wf, node, "deep check", result)
            return
        record = gate_record(report)
        self.journal.record(node.name, "deepcheck", record, wf.id)
        self.metrics.deepcheck_runs.labels(level, report.status.value).inc()
        for failed in report.failed():
            self.metrics.deepcheck_failures.labels(failed.name if failed.name in KNOWN_CHECKS else "other").inc()
        if report.status is Status.PASS:
            self.to(wf, Step.RELEASE, {"deepcheck": record})
            return
        why = "deep check failed: " + "; ".join(describe(r, 100) for r in report.failed())
        log.warning("controller.deepcheck_failed", node=node.name, workflow=wf.id, level=level, why=why)
        self.journal.note(wf.id, wf.step, {"deepcheck": record})
        if all(r.evidence.get("suggested_action") == "fix_configuration" for r in report.failed()):
            # DCGM's CONFIG severity (persistence mode off, ...): new hardware would not fix it.
            self.give_up(wf, self.gateway.node(node.name), f"{why} (a configuration problem, not hardware)")
            return
        self._fault_after_remedy(wf, self.gateway.node(node.name), why, [("REPLACE", DEEPCHECK_FAULT)])

    def _ready_for_checks(self, wf: Workflow) -> Optional[Tuple[Workflow, Node]]:
        """The node, responding, schedulable inside our reservation, with the workflow as it
        is now; None when the workflow ended or moved, or the node is silent (waited on)."""
        node = self.gateway.node(wf.node)
        current = self._honour_newest_reason(wf, node)
        if current is None or current.step != wf.step:
            return None
        wf = current
        if not self._on_checked_boot(wf, node):
            return None
        self._reserve(node.name)
        if node.is_drained or node.is_down:
            # Inside our reservation nobody else can use it; the checks need it schedulable.
            self.gateway.set_state(node.name, NodeState.RESUME)
            wf = self.journal.note(wf.id, wf.step, {"resumed_at": self.clock(), "seen_reason": None,
                                                    "seen_time": None}) or wf
        return wf, node

    def _on_checked_boot(self, wf: Workflow, node: Node) -> bool:
        """The node answers, on the boot its checks ran on. The checks vouch for one boot: a
        node that restarted on its own after them (a crash: Slurm's "Node unexpectedly
        rebooted"; or died and came back) is checked again on its new boot, and one that went
        silent is waited on, never released on the old boot's results (found by the property
        suite, issue 14 session: a node killed and powered on between its verification and the
        release was resumed over Slurm's reason, its agent's new flag refused meanwhile)."""
        checked = wf.data.get("checked_boot")
        if "checked_boot" not in wf.data and wf.step in (Step.DEEPCHECK.value, Step.RELEASE.value):
            checked = wf.data.get("booted_at")   # journaled by a version that did not record it
        now_boot = ts(node.boot_time)
        if checked is not None and now_boot is not None and now_boot > float(checked) + BOOT_JITTER_SECONDS:
            rechecks = int(wf.data.get("rechecks", 0)) + 1
            log.warning("controller.restarted_after_checks", node=node.name, workflow=wf.id, step=wf.step,
                        recheck=rechecks)
            restart = {"step": wf.step, "checked_boot": checked, "boot": now_boot, "recheck": rechecks}
            if rechecks > RECHECKS:
                self._restarted(node, wf, restart)
                self.give_up(wf, node, f"restarted on its own {rechecks} times after its checks passed")
            elif self.to(wf, Step.VERIFY, {"booted_at": now_boot, "verify_attempts": 0, "checked_boot": None,
                                           "rechecks": rechecks}) is not None:
                # After the move: a move another instance won (or a crash before it) records nothing.
                self._restarted(node, wf, restart)
            return False
        if not node.is_responding:
            # Registered, then silent again: wait, but not forever.
            if self.clock() - wf.data.get("step_at", self.clock()) > self.config.workflow.register_timeout_seconds:
                self.give_up(wf, node, "not responding since its new boot")
            return False
        return True

    def _restarted(self, node: Node, wf: Workflow, restart: Dict[str, object]) -> None:
        self.journal.record(node.name, "restarted_after_checks", restart, wf.id)
        self.metrics.rechecks.inc()

    def _run_on_node(self, node: Node, argv: List[str], timeout: float, srun: List[str],
                     job_name: str = "hpr-verify") -> StepResult:
        try:
            return self.gateway.run_on_node(node.name, argv, timeout=timeout, reservation=self._reservation(node.name),
                                            srun=srun, job_name=job_name)
        except SlurmCommandError as e:  # srun missing, refused...: the command did not run
            return StepResult(None, str(e))

    def _gate_srun(self, node: Node) -> List[str]:
        """The gate's step gets the whole node: every CPU, all memory and every GRES Slurm
        knows of. A one-task step without them sees no GPU where ConstrainDevices is on, and
        gpu_count would fail a healthy node (issue 10 review)."""
        gres = [f"--gres={','.join(node.gres)}"] if node.gres else []
        return [*self.config.verify.srun, "--exclusive", "--mem=0", *gres]

    def _not_run(self, wf: Workflow, node: Node, what: str, result: StepResult) -> None:
        """The check step could not run: again next pass, then a human. Our verification
        being broken (srun, the command) says nothing about the node: never a replacement."""
        key = f"{wf.step}_attempts"
        attempts = int(wf.data.get(key, 0)) + 1
        output = sanitize_reason(result.output, 400)
        log.warning("controller.check_not_run", node=node.name, workflow=wf.id, step=wf.step, attempt=attempts,
                    returncode=result.returncode, output=output)
        if attempts >= VERIFY_ATTEMPTS:
            self.give_up(wf, self.gateway.node(node.name), f"{what} could not run {attempts} times: {output}")
        else:
            self.journal.note(wf.id, wf.step, {key: attempts})

    def release(self, wf: Workflow) -> None:
        """Back in service, unless the node's reason is no longer the workflow's: a fault
        flagged after the verification is never cleared here (issue 9, defect 4; the
        re-read in `advance` hands it to the next workflow)."""
        node = self.gateway.node(wf.node)
        if reason_change(wf.data, wf.action, node) is not Change.NONE:
            return  # the next pass honours it before this step runs again
        if not self._on_checked_boot(wf, node):
            return
        if node.is_drained or node.is_down:
            self.gateway.set_state(node.name, NodeState.RESUME)
        self._drop_reservation(node.name)
        gate = wf.data.get("deepcheck")
        if isinstance(gate, dict) and gate.get("status") == "pass" and LEVELS.index(gate["level"]) >= LEVELS.index(
                self.config.deepcheck.new_node_level):
            self.journal.admit([node.name], why=f"passed a {gate['level']} deep check (workflow {wf.id})")
        self.finish(wf, "done", "back in service", {"in_service_at": self.clock()})

    # --------------------------------------------------------------- helpers
    def to(self, wf: Workflow, step: Step, data: Dict[str, object], action: Optional[str] = None) -> Optional[Workflow]:
        moved = self.journal.advance(wf.id, wf.step, step.value, {**data, "step_at": self.clock()}, action=action)
        if moved is None:
            log.warning("controller.step_lost", node=wf.node, workflow=wf.id, step=wf.step,
                        detail="another controller instance moved this workflow; not acting")
            return None
        log.info("controller.step", node=wf.node, workflow=wf.id, step=step.value, action=moved.action)
        self.crash_point(f"enter:{step.value}")
        return moved

    def finish(self, wf: Workflow, status: str, detail: str, data: Optional[Dict[str, object]] = None) -> None:
        done = self.journal.advance(wf.id, wf.step, Step.DONE.value, {**(data or {}), "outcome": detail},
                                    status=status)
        if done is not None:
            self.metrics.finished.labels(done.action, status).inc()
            if done.time_to_service is not None:
                self.metrics.time_to_service.labels(done.action).observe(done.time_to_service)
            log.info("controller.workflow_finished", node=wf.node, workflow=wf.id, status=status, detail=detail,
                     seconds=round(done.finished_at - done.detected_at, 1) if done.finished_at else None)

    def hold(self, node: Node, now: float) -> Optional[Workflow]:
        """Open an admission for a node that never passed a deep check: drained with a reason
        of ours (the gave-up form, so neither the agent nor the controller acts on it); a job
        that already landed on it finishes (admissions never time the drain out)."""
        wf = self.journal.open_workflow(node.name, ADMIT, "new node: held until a deep check passes", Step.DRAIN.value,
                                        now, {"step_at": now})
        reason = f"{GAVE_UP_PREFIX} held until a deep check passes: new node (workflow {wf.id}; was: none)"
        current = self.gateway.node(node.name)
        if current.reason_owner is not ReasonOwner.NONE:   # someone's reason arrived meanwhile: theirs
            self.finish(wf, "abandoned", f"reason {current.reason!r} set before the hold")
            return None
        self.gateway.set_state(node.name, NodeState.DRAIN, reason)
        held = self.gateway.node(node.name)
        self.metrics.started.labels(ADMIT).inc()
        log.info("controller.hold_new_node", node=node.name, workflow=wf.id)
        return self.journal.note(wf.id, wf.step, {"hold_reason": reason, **self._seen(held)})

    def give_up(self, wf: Workflow, node: Node, why: str) -> None:
        """Leave the node out of service with a reason a human will read."""
        log.error("controller.gave_up", node=node.name, workflow=wf.id, why=why)
        self._write_reason(wf, node, NodeState.DRAIN, f"{GAVE_UP_PREFIX} {why} (workflow {wf.id}; was: {wf.reason})")
        self._drop_reservation(node.name)
        self.finish(wf, "failed", why)

    def _write_reason(self, wf: Workflow, node: Node, state: NodeState, reason: str) -> Optional[Node]:
        """Set `state` and `reason` unless someone else's reason is on the node now: the
        node is re-read first (defect 5). Returns the node as read after the write, or
        None when it was left alone."""
        current = self.gateway.node(node.name)
        held = current.reason is not None and current.reason == wf.data.get("hold_reason")   # our admission's
        if not held and current.reason_owner not in (ReasonOwner.NONE, ReasonOwner.ACTION, ReasonOwner.SLURM):
            log.warning("controller.write_skipped", node=node.name, workflow=wf.id, reason=current.reason,
                        detail="someone else's reason is on the node")
            return None
        self.gateway.set_state(node.name, state, reason)
        return self.gateway.node(node.name)

    def _reason(self, wf: Workflow) -> str:
        """The reason we write for the workflow's effect: its own if it is an Action: reason.
        A power cycle of a silent node starts from Slurm's "Not responding"; written by us, that
        text would read as someone else's (Slurm's own is Slurm's only when SlurmUser wrote it),
        so it becomes an Action: Reboot of ours that says what happens. (Reboot and replace
        workflows open only on Action: reasons.)"""
        ours = parse_reason(wf.reason)
        return str(ours) if ours is not None else format_reason(NodeAction.REBOOT, f"power cycle: {wf.reason}")

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
        now_boot = ts(node.boot_time)
        return now_boot is not None and (before is None or now_boot > float(before) + BOOT_JITTER_SECONDS)

    def crash_point(self, name: str) -> None:
        if self.crash_at == name:
            log.warning("controller.test_crash", point=name)
            os.kill(os.getpid(), signal.SIGKILL)
