"""The controller's reconcile pass and steps against the in-memory Slurm model (issue 9, deliverable 3):
regression tests for defects 2, 3, 4, 5, 8, 11, 12 and 13. Real Reconciler, Steps, Journal and providers;
only Slurm is the model (tests/slurm_model.py), and squeue a fake command runner (defect 12)."""
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import pytest

from hpresilience.action import NodeAction
from hpresilience.controller.expedite import expedite_requeued
from hpresilience.controller.reconcile import Reconciler
from hpresilience.slurm import NodeState, SlurmGateway
from hpresilience.slurm.backend import ScontrolBackend
from hpresilience.slurm.models import StepResult
from hpresilience.slurm.runner import Target
from hpresilience.slurm.scontrol_parse import PENDING_JOB_FIELDS, parse_pending_jobs
from tests.decision_harness import ADMIN, OURS, Cluster, check_result
from tests.slurm_model import deepcheck_result

XID_79 = ("XID_79", "GPU 3")


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    return Cluster.build(tmp_path)


def only_workflow(cluster: Cluster, node: str):
    [wf] = cluster.workflows(node)
    return wf


# ------------------------------------------------------------------ the plain path
def test_reboot_workflow_reboots_verifies_and_returns_the_node(cluster):
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status) == ("reboot", "done")
    assert cluster.reboots("n1") == 1 and cluster.power_downs("n1") == 0
    # its own check, then the quick deep-check gate (issue 10), both inside our reservation
    assert [(s.node, "deepcheck" in s.argv, s.reservation) for s in cluster.model.steps_run] == [
        ("n1", False, "hpr_verify_n1"), ("n1", True, "hpr_verify_n1")]
    assert "quick" in cluster.model.steps_run[1].argv
    node = cluster.gateway.node("n1")
    assert node.available and node.reason is None


# ------------------------------------------------------------------ defect 2
@pytest.mark.parametrize("admin_reason", ["Not responding - DO NOT POWER CYCLE, BIOS flash",
                                          "Powered down for PSU swap"])
def test_an_admins_reason_on_a_silent_node_is_never_taken_for_slurms(cluster, admin_reason):
    cluster.admin_sets("n1", admin_reason, NodeState.DOWN)
    cluster.model.kill("n1")
    cluster.model.advance(cluster.model.slurmd_timeout + cluster.config.workflow.unresponsive_grace_seconds + 1)
    cluster.flag("n2", NodeAction.REBOOT, *XID_79)   # the positive sign: a real flag in the same pass
    before = len(cluster.model.writes)
    report = cluster.run_pass()
    assert report.started == ["n2"]
    assert cluster.workflows("n1") == []
    assert cluster.writes_by(OURS, "n1", since=before) == []
    node = cluster.gateway.node("n1")
    assert (node.reason, node.reason_user) == (admin_reason, ADMIN)


def test_a_silent_node_with_slurms_own_reason_is_power_cycled(cluster):
    cluster.model.kill("n1")
    cluster.model.advance(cluster.model.slurmd_timeout + cluster.config.workflow.unresponsive_grace_seconds + 1)
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status) == ("power_cycle", "done")
    assert cluster.gateway.node("n1").available


# ------------------------------------------------------------------ defect 3
def test_a_replace_raised_while_a_reboot_waits_in_drain_replaces(cluster):
    job = cluster.model.submit("n1")
    cluster.flag("n1", NodeAction.REBOOT, "XID_73", "GPU 1")
    cluster.run_pass()
    assert only_workflow(cluster, "n1").step == "drain"
    cluster.model.advance(5)
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1").value == "applied"
    cluster.run_pass()
    cluster.model.finish(job)
    cluster.model.advance(5)
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status) == ("replace", "done")
    assert cluster.power_downs("n1") == 1
    assert cluster.reboots("n1") == 0


# ------------------------------------------------------------------ defect 4
def test_a_fault_flagged_after_verification_is_not_cleared_at_release(cluster):
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    for _ in range(10):
        cluster.run_pass()
        if only_workflow(cluster, "n1").step == "release":
            break
        cluster.model.advance(5)
    assert only_workflow(cluster, "n1").step == "release"
    cluster.model.advance(2)
    assert cluster.flag("n1", NodeAction.REBOOT, "XID_48", "GPU 0").value == "applied"
    fresh = cluster.gateway.node("n1").reason
    before = len(cluster.model.writes)
    cluster.run_pass()
    assert cluster.writes_by(OURS, "n1", since=before) == []
    node = cluster.gateway.node("n1")
    assert node.reason == fresh and node.is_drained
    cluster.run_pass()
    first, second = cluster.workflows("n1")
    assert first.status == "done" and "superseded" in first.data["outcome"]
    assert (second.reason, second.action, second.status) == (fresh, "reboot", "active")


def run_to(cluster: Cluster, node: str, step: str) -> None:
    for _ in range(10):
        cluster.run_pass()
        if only_workflow(cluster, node).step == step:
            return
        cluster.model.advance(5)
    raise AssertionError(f"never reached {step}: {only_workflow(cluster, node)}")


@pytest.mark.parametrize("step", ["deepcheck", "release"])
def test_a_node_that_restarted_after_its_checks_is_checked_again_not_released(cluster, step):
    """Found by the property suite (issue 14 session): killed and powered on between its checks
    and the release, the node was resumed over Slurm's "Node unexpectedly rebooted" on the old
    boot's results. The checks vouch for one boot: a new one is checked again."""
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    run_to(cluster, "n1", step)
    checks = len(cluster.model.steps_run)
    cluster.model.kill("n1")
    cluster.model.advance(5)
    cluster.model.power_on("n1")
    node = cluster.gateway.node("n1")
    assert node.reason == "Node unexpectedly rebooted" and node.is_down
    before = len(cluster.model.writes)
    cluster.run_pass()
    assert not any(w.fields.get("state") == "RESUME" for w in cluster.writes_by(OURS, "n1", since=before))
    wf = only_workflow(cluster, "n1")
    assert (wf.step, wf.data["rechecks"]) == ("verify", 1)
    [restart] = [e.detail for e in cluster.journal.events(workflow_id=wf.id) if e.kind == "restarted_after_checks"]
    assert (restart["step"], restart["recheck"]) == (step, 1) and restart["boot"] > restart["checked_boot"]
    assert cluster.reconciler.metrics.registry.get_sample_value("hpr_controller_restarts_after_checks_total") == 1
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.status, wf.action) == ("done", "reboot")
    assert [s.node for s in cluster.model.steps_run[checks:]] == ["n1", "n1"]   # verified and gated again
    assert cluster.gateway.node("n1").available


def test_a_node_that_keeps_restarting_after_its_checks_goes_to_a_human(cluster):
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    for _ in range(3):
        run_to(cluster, "n1", "release")
        cluster.model.kill("n1")
        cluster.model.advance(5)
        cluster.model.power_on("n1")
        cluster.run_pass()
    wf = only_workflow(cluster, "n1")
    assert (wf.status, wf.data["outcome"]) == ("failed", "restarted on its own 3 times after its checks passed")
    node = cluster.gateway.node("n1")
    assert node.reason.startswith("hpresilience: restarted on its own 3 times") and not node.available


def test_an_escalations_new_hardware_is_not_taken_for_a_restart(cluster):
    """Review (issue 14 session): the checked boot survived an escalation, so the replacement's
    new boot counted as the node restarting on its own after its checks."""
    gates = []

    def deepcheck(node: str, level: str) -> StepResult:
        gates.append(level)
        return deepcheck_result(node, level, failed=["dcgm"] if len(gates) == 1 else [])

    cluster.model.deepcheck = deepcheck
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status, gates) == ("replace", "done", ["quick", "full"])   # escalated, replaced
    assert wf.data.get("rechecks", 0) == 0
    assert not [e for e in cluster.journal.events(workflow_id=wf.id) if e.kind == "restarted_after_checks"]


def test_a_replace_flagged_at_release_is_not_taken_for_a_restart(cluster):
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    run_to(cluster, "n1", "release")
    cluster.model.advance(2)
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1").value == "applied"
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status) == ("replace", "done") and wf.data.get("rechecks", 0) == 0


def test_a_node_silent_at_its_release_is_not_resumed(cluster):
    """Died after its checks and not back: waited on, never resumed into service unchecked."""
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    run_to(cluster, "n1", "release")
    cluster.model.kill("n1")
    cluster.model.advance(cluster.model.slurmd_timeout + 1)
    assert not cluster.gateway.node("n1").is_responding
    before = len(cluster.model.writes)
    cluster.run_pass()
    assert cluster.writes_by(OURS, "n1", since=before) == []
    assert only_workflow(cluster, "n1").step == "release"
    cluster.model.advance(cluster.config.workflow.register_timeout_seconds + 1)
    cluster.run_pass()
    wf = only_workflow(cluster, "n1")
    assert (wf.status, wf.data["outcome"]) == ("failed", "not responding since its new boot")


# ------------------------------------------------------------------ defect 5
def test_escalation_keeps_a_reason_someone_set_while_the_check_ran(cluster):
    admin_reason = "bad DIMM, ticket 42"

    def check(node: str) -> StepResult:
        with cluster.model.as_user(ADMIN):
            cluster.model.update_nodes(node, "DRAIN", admin_reason)
        return check_result("REBOOT   XID_79 [GPU 3]: fell off the bus")

    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.model.check = check
    cluster.settle()
    assert cluster.model.steps_run, "the check ran"
    node = cluster.gateway.node("n1")
    assert (node.reason, node.reason_user) == (admin_reason, ADMIN)
    assert cluster.power_downs("n1") == 0
    wf = only_workflow(cluster, "n1")
    assert wf.status == "abandoned" and wf.action == "reboot"


# ------------------------------------------------------------------ defect 8 (controller part)
def test_escalation_only_when_the_same_fault_returns_after_its_reboot(cluster):
    actions = []
    for code, entity in [XID_79, ("XID_48", "GPU 0"), XID_79]:
        cluster.flag("n1", NodeAction.REBOOT, code, entity)
        cluster.settle()
        actions.append(cluster.workflows("n1")[-1].action)
        cluster.model.advance(60)
    assert actions == ["reboot", "reboot", "replace"]
    assert "escalated" in cluster.workflows("n1")[-1].data
    assert cluster.power_downs("n1") == 1


def test_an_admins_bare_action_reboot_twice_reboots_both_times(cluster):
    for _ in range(2):
        cluster.admin_sets("n1", "Action: Reboot", NodeState.FAIL)
        cluster.settle()
        cluster.model.advance(60)
    assert [(wf.action, wf.status) for wf in cluster.workflows("n1")] == [("reboot", "done")] * 2
    assert cluster.reboots("n1") == 2 and cluster.power_downs("n1") == 0


# ------------------------------------------------------------------ defect 11
def test_a_power_cycle_that_does_not_help_escalates_to_a_real_replacement(cluster):
    checks: List[str] = []

    def check(node: str) -> StepResult:
        checks.append(node)
        return check_result("REPLACE  XID_79 [GPU 3]: fell off the bus") if len(checks) == 1 else check_result()

    cluster.model.check = check
    cluster.model.kill("n1")
    cluster.model.advance(cluster.model.slurmd_timeout + cluster.config.workflow.unresponsive_grace_seconds + 1)
    cluster.settle()
    wf = only_workflow(cluster, "n1")
    assert (wf.action, wf.status) == ("replace", "done") and "escalated" in wf.data
    assert checks == ["n1", "n1"]
    assert cluster.power_downs("n1") == 2   # the power cycle's, then the replacement's own


# ------------------------------------------------------------------ defect 12
class FakeSqueue:
    """squeue at the subprocess boundary (the CommandRunner's place): prints the --Format fields asked
    for, each followed by its separator, one job per line; a comment's newline is printed as is."""

    def __init__(self, jobs: List[Dict[str, str]]):
        self.jobs = jobs
        self.calls: List[List[str]] = []

    def run(self, argv: Sequence[str], target: Optional[Target] = None) -> str:
        self.calls.append(list(argv))
        if argv[0] == "scontrol":
            return ""
        spec = next(a for a in argv if a.startswith("--Format=")).split("=", 1)[1]
        wanted = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--jobs=")), None)
        lines = []
        for job in self.jobs:
            if wanted is not None and job["JobID"] not in wanted:
                continue
            cells = []
            for item in spec.split(","):
                name, _, sep = item.partition(":")
                cells.append(job[name] + sep)
            lines.append("".join(cells))
        return "".join(f"{line}\n" for line in lines)

    def updated_jobs(self) -> List[str]:
        return [a.split("=", 1)[1] for argv in self.calls if argv[:2] == ["scontrol", "update"]
                for a in argv if a.startswith("jobid=")]


FORGED = "x\n999|BeginTime|1|hpr-expedite"


def test_a_comment_cannot_forge_a_pending_job_record():
    squeue = FakeSqueue([{"JobID": "12", "Reason": "BeginTime", "RestartCnt": "1", "Comment": FORGED,
                          "SubmitTime": "2026-11-29T20:55:58"},
                         {"JobID": "13", "Reason": "BeginTime", "RestartCnt": "1", "Comment": "hpr-expedite",
                          "SubmitTime": "2026-11-29T20:55:58"}])
    table = squeue.run(["squeue", "--noheader", "--states=PD", PENDING_JOB_FIELDS])
    assert [row[:3] for row in parse_pending_jobs(table)] == [(12, "BeginTime", 1), (13, "BeginTime", 1)]
    gateway = SlurmGateway(ScontrolBackend(runner=squeue))
    assert [j.job_id for j in gateway.requeued_jobs()] == [12, 13]
    assert expedite_requeued(gateway) == 1
    assert squeue.updated_jobs() == ["13"]


# ------------------------------------------------------------------ defect 13
def test_a_worker_step_never_changes_the_passs_own_state(tmp_path):
    cluster = Cluster.build(tmp_path)
    release = threading.Event()
    entered = threading.Event()

    def check(node: str) -> StepResult:
        entered.set()
        assert release.wait(30), "the test never released the check"
        return check_result("REBOOT   XID_79 [GPU 3]: fell off the bus")

    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    for _ in range(5):   # drain → reboot → await_boot → verify, synchronously
        cluster.run_pass()
        if only_workflow(cluster, "n1").step == "verify":
            break
        cluster.model.advance(5)
    assert only_workflow(cluster, "n1").step == "verify"
    cluster.model.check = check
    with ThreadPoolExecutor(max_workers=2) as pool:
        reconciler = Reconciler(cluster.config, cluster.gateway, cluster.journal, cluster.provider,
                                executor=pool, clock=cluster.model.clock)
        reconciler.run_pass()
        assert entered.wait(30), "the verify worker started"
        inflight, remediating = dict(reconciler.inflight), {k: set(v) for k, v in reconciler.remediating.items()}
        assert list(inflight) == ["n1"] and list(remediating) == ["n1"]
        release.set()
        inflight["n1"].result(timeout=30)
        assert (dict(reconciler.inflight), reconciler.remediating) == (inflight, remediating)
    assert only_workflow(cluster, "n1").step == "replace"   # the worker did its work: escalated

