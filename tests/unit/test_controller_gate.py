"""The deep-check gate in the controller's workflow (issue 10, deliverable 3), against the in-memory
Slurm model: real Reconciler, Steps and Journal; the node's `hpresilience deepcheck --json` is the
model's answer (tests/slurm_model.py `deepcheck_result`)."""
import json

import pytest

from hpresilience.action import NodeAction
from hpresilience.controller.config import ControllerConfig
from hpresilience.slurm import NodeState
from hpresilience.slurm.models import StepResult
from hpresilience.slurm.reason import GAVE_UP_PREFIX, parse_reason
from tests.decision_harness import Cluster, check_result
from tests.slurm_model import deepcheck_result

XID_79 = ("XID_79", "GPU 3")


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    return Cluster.build(tmp_path)


def gate_runs(cluster: Cluster, node: str):
    """(level) of every deep check the controller ran on `node`, in order."""
    return [s.argv[s.argv.index("--level") + 1] for s in cluster.model.steps_run
            if s.node == node and "deepcheck" in s.argv]


def deepcheck_events(cluster: Cluster, node: str):
    return [e.detail for e in cluster.journal.events(node=node) if e.kind == "deepcheck"]


def test_a_passing_node_is_released_with_its_deepcheck_record_in_history(cluster):
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("reboot", "done")
    assert gate_runs(cluster, "n1") == ["quick"]
    [record] = deepcheck_events(cluster, "n1")
    assert record["status"] == "pass" and record["level"] == "quick" and record["checks"] == {"gpu_count": "pass"}
    assert cluster.gateway.node("n1").available


def test_a_failed_deepcheck_after_a_reboot_escalates_to_a_replacement_with_the_check_in_the_reason(cluster):
    results = iter([deepcheck_result("n1", "quick", failed=["dcgm"])])
    cluster.model.deepcheck = lambda node, level: next(results, deepcheck_result(node, level))
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    seen_reasons = []
    for _ in range(40):
        cluster.run_pass()
        seen_reasons.append(cluster.gateway.node("n1").reason)
        if not cluster.journal.active():
            break
        cluster.model.advance(5)
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("replace", "done")
    assert "deep check failed: dcgm: dcgm failed" in wf.data["escalated"]
    escalated = [parse_reason(r) for r in seen_reasons if r and "deep check failed" in r]
    assert escalated and escalated[0].action is NodeAction.REPLACE
    assert escalated[0].fault is not None and escalated[0].fault.code == "XID_79"   # the workflow's own fault
    assert cluster.power_downs("n1") == 1                                          # replaced once
    assert gate_runs(cluster, "n1") == ["quick", "full"]                            # full after the replacement
    assert [r["status"] for r in deepcheck_events(cluster, "n1")] == ["fail", "pass"]
    assert cluster.gateway.node("n1").available


def test_a_replaced_node_whose_deepcheck_fails_is_not_released(cluster):
    cluster.model.deepcheck = lambda node, level: deepcheck_result(node, level, failed=["dcgm"])
    cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 0")
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("replace", "failed")
    node = cluster.gateway.node("n1")
    assert not node.available and node.reason.startswith(GAVE_UP_PREFIX)
    assert "deep check failed: dcgm" in node.reason
    assert cluster.gateway.reservation("hpr_verify_n1") is None          # the reservation is gone
    assert [r["failed"] for r in deepcheck_events(cluster, "n1")] == [["dcgm: dcgm failed"]]


def test_a_deepcheck_that_cannot_run_gives_the_node_to_a_human_and_never_escalates(cluster):
    cluster.model.deepcheck = lambda node, level: deepcheck_result(node, level, errors=["dcgm"])
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("reboot", "failed")
    assert len(gate_runs(cluster, "n1")) == 3 and cluster.power_downs("n1") == 0
    assert "deep check could not run 3 times" in cluster.gateway.node("n1").reason
    assert deepcheck_events(cluster, "n1") == []     # no verdict was journaled


def test_a_configuration_failure_goes_to_a_human_not_to_a_replacement(cluster):
    """DCGM's CONFIG severity (persistence mode off): new hardware would not fix it."""
    report = json.loads(deepcheck_result("n1", "quick", failed=["dcgm"]).output)
    report["checks"][0]["evidence"] = {"suggested_action": "fix_configuration"}
    cluster.model.deepcheck = lambda node, level: StepResult(1, json.dumps(report) + "\n")
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("reboot", "failed") and cluster.power_downs("n1") == 0
    assert "a configuration problem, not hardware" in cluster.gateway.node("n1").reason


def test_the_gate_gets_the_whole_node(cluster):
    """Review of issue 10: a one-task step without the node's GRES sees no GPU where
    ConstrainDevices is on; the gate asks for every CPU, all memory and every GRES."""
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [gate] = [s for s in cluster.model.steps_run if "deepcheck" in s.argv]
    assert {"--exclusive", "--mem=0", "--gres=gpu:8", "--job-name=hpr-deepcheck"} <= set(gate.argv)
    [verify] = [s for s in cluster.model.steps_run if "deepcheck" not in s.argv]
    assert "--exclusive" not in verify.argv


def test_srun_failing_before_the_deepcheck_ran_is_not_a_verdict(cluster):
    cluster.model.deepcheck = lambda node, level: StepResult(1, "srun: error: Unable to allocate resources\n")
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert wf.status == "failed" and cluster.power_downs("n1") == 0


def test_the_gate_can_be_turned_off_per_remedy(tmp_path):
    cluster = Cluster.build(tmp_path)
    cluster.config.deepcheck.after_reboot = "none"
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert wf.status == "done" and wf.data["deepcheck"] == "off"
    assert len(cluster.model.steps_run) == 1 and gate_runs(cluster, "n1") == []   # the check ran, the gate not


# ------------------------------------------------------------------ holding new nodes
@pytest.fixture
def holding(tmp_path) -> Cluster:
    cluster = Cluster.build(tmp_path)
    cluster.config.deepcheck.hold_new_nodes = True
    return cluster


def test_nodes_present_when_holding_starts_stay_in_service(holding):
    holding.run_pass()
    assert holding.journal.admitted() == {"n1", "n2", "n3", "n4"}      # the baseline was taken
    assert holding.workflows() == [] and all(holding.gateway.node(n).available for n in ("n1", "n4"))


def test_a_new_node_is_held_until_its_deepcheck_passes(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.run_pass()
    held = holding.gateway.node("n5")
    assert not held.available and held.is_drained and "held until a deep check passes" in held.reason
    assert held.reason_owner.value == "gave_up"        # ours, never acted on by agent or controller
    holding.settle()
    [wf] = holding.workflows("n5")
    assert (wf.action, wf.status) == ("admit", "done")
    assert gate_runs(holding, "n5") == ["full"] and holding.reboots("n5") == 0
    assert holding.gateway.node("n5").available and "n5" in holding.journal.admitted()
    holding.run_pass()
    assert len(holding.workflows("n5")) == 1                                        # admitted once


def test_a_new_node_failing_its_deepcheck_is_given_to_a_human_not_replaced(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.model.deepcheck = lambda node, level: deepcheck_result(node, level, failed=["gpu_burn"])
    holding.settle()
    [wf] = holding.workflows("n5")
    assert (wf.action, wf.status) == ("admit", "failed") and holding.power_downs("n5") == 0
    node = holding.gateway.node("n5")
    assert not node.available and "deep check failed: gpu_burn" in node.reason
    assert "n5" not in holding.journal.admitted()


def test_a_removed_and_readded_node_is_new_again_but_not_after_a_brief_absence(holding):
    holding.run_pass()
    holding.model.remove_nodes("n4")      # a slurm.conf typo, fixed by the next reconfigure
    holding.run_pass()
    holding.model.add_nodes("n4")
    holding.run_pass()
    assert "n4" in holding.journal.admitted() and holding.workflows("n4") == []
    holding.model.remove_nodes("n4")      # really removed (repair), added back later
    for _ in range(3):
        holding.run_pass()
        holding.model.advance(300)
    assert "n4" not in holding.journal.admitted()
    holding.model.add_nodes("n4")
    holding.run_pass()
    [wf] = holding.workflows("n4")
    assert wf.action == "admit"


def test_switching_holding_off_and_on_takes_a_new_baseline(holding):
    """Review of issue 10: nodes added (and serving) while the switch was off are not drained at once."""
    holding.run_pass()
    holding.config.deepcheck.hold_new_nodes = False
    holding.model.add_nodes("m[1-10]")
    holding.run_pass()
    assert holding.journal.admitted() is None
    holding.config.deepcheck.hold_new_nodes = True
    holding.run_pass()
    assert holding.workflows() == [] and len(holding.journal.admitted()) == 14


def test_adding_many_nodes_does_not_trip_the_breaker(holding):
    holding.run_pass()
    holding.model.add_nodes("m[1-25]")
    holding.run_pass()
    assert len(holding.workflows()) == 25 and not holding.journal.breaker().tripped
    holding.flag("n1", NodeAction.REBOOT, *XID_79)   # a real fault is still remediated
    holding.run_pass()
    assert [wf.action for wf in holding.workflows("n1")] == ["reboot"]


def test_an_action_reason_on_a_held_node_ends_the_admission_and_gets_its_remedy(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.run_pass()
    holding.admin_sets("n5", "Action: Reboot", NodeState.FAIL)
    holding.settle()      # the admission ends ...
    holding.settle()      # ... and the reboot workflow runs
    admit, reboot = holding.workflows("n5")
    assert (admit.action, admit.status) == ("admit", "done") and "superseded" in admit.data["outcome"]
    assert (reboot.action, reboot.status) == ("reboot", "done") and holding.reboots("n5") == 1
    assert gate_runs(holding, "n5") == ["quick"]
    assert "n5" not in holding.journal.admitted()        # a quick check is not the new-node level
    holding.run_pass()
    assert holding.workflows("n5")[-1].action == "admit"  # so it is held for its full check


def test_a_replacement_that_passed_the_full_check_is_admitted(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.run_pass()
    holding.admin_sets("n5", "Action: Replace", NodeState.FAIL)
    holding.settle()
    holding.settle()
    assert [(w.action, w.status) for w in holding.workflows("n5")] == [("admit", "done"), ("replace", "done")]
    assert gate_runs(holding, "n5") == ["full"] and "n5" in holding.journal.admitted()
    holding.run_pass()
    assert len(holding.workflows("n5")) == 2


def test_an_admin_may_return_a_held_node_and_it_stays_returned(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.run_pass()
    holding.admin_sets("n5", "", NodeState.RESUME)
    for _ in range(3):
        holding.run_pass()
    [wf] = holding.workflows("n5")
    assert wf.status == "abandoned" and "n5" in holding.journal.admitted()
    assert holding.gateway.node("n5").available


def test_an_admin_may_return_a_node_whose_admission_failed(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.model.deepcheck = lambda node, level: deepcheck_result(node, level, failed=["gpu_burn"])
    holding.settle()
    assert holding.workflows("n5")[-1].status == "failed"
    holding.admin_sets("n5", "", NodeState.RESUME)
    for _ in range(3):
        holding.run_pass()
    assert len(holding.workflows("n5")) == 1 and "n5" in holding.journal.admitted()


def test_a_job_on_a_held_node_is_never_killed_for_the_admission(tmp_path):
    cluster = Cluster.build(tmp_path)
    cluster.config.deepcheck.hold_new_nodes = True
    cluster.config.workflow.drain_timeout_seconds = 60
    cluster.run_pass()
    cluster.model.add_nodes("n5")
    job = cluster.model.submit("n5")
    for _ in range(5):
        cluster.run_pass()
        cluster.model.advance(60)
    [wf] = cluster.workflows("n5")
    assert wf.step == "drain" and cluster.model.job(job).is_running
    assert "held until a deep check passes" in cluster.gateway.node("n5").reason
    assert all(w.op != "update_node" or w.fields.get("State") != "DOWN" for w in cluster.model.writes)


def test_holding_needs_a_level():
    config = ControllerConfig()
    config.deepcheck.hold_new_nodes, config.deepcheck.new_node_level = True, "none"
    with pytest.raises(ValueError, match="hold_new_nodes needs a new_node_level"):
        config.deepcheck.validate()


def test_an_admins_reason_on_a_new_node_is_left_alone(holding):
    holding.run_pass()
    holding.model.add_nodes("n5")
    holding.admin_sets("n5", "burn-in by vendor")
    holding.run_pass()
    assert holding.workflows("n5") == [] and holding.gateway.node("n5").reason == "burn-in by vendor"
    assert len(holding.workflows()) == 0 and holding.journal.admitted() == {"n1", "n2", "n3", "n4"}


def test_a_controller_killed_in_the_gate_runs_it_again_and_reboots_once(cluster):
    """The gate has no side effect to repeat: a controller that dies once the workflow entered
    `deepcheck` runs the check after its restart (the journal says where it was), and the node
    is rebooted once."""
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    for _ in range(20):
        cluster.run_pass()
        [wf] = cluster.workflows("n1")
        if wf.step == "deepcheck":
            break
        cluster.model.advance(5)
    assert wf.step == "deepcheck" and gate_runs(cluster, "n1") == []
    cluster.restart_controller()
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.status, cluster.reboots("n1"), gate_runs(cluster, "n1")) == ("done", 1, ["quick"])


def test_a_gpu_lost_before_and_after_the_reboot_is_the_same_fault(cluster):
    """Found by ./scripts/demo (issue 10 session): the agent named the GPU with its address while it
    answered ("GPU 3 (0000:86:00.0)"); lost from boot on, the check names it "GPU 3". The same fault
    returning after the reboot escalates to a replacement, not to a human."""
    cluster.flag("n1", NodeAction.REBOOT, "GPU_LOST", "GPU 3 (0000:86:00.0)")
    results = iter([check_result("REBOOT   GPU_LOST [GPU 3]: GPU 3 lost")])
    cluster.model.check = lambda node: next(results, check_result())
    cluster.settle()
    [wf] = cluster.workflows("n1")
    assert (wf.action, wf.status) == ("replace", "done") and cluster.power_downs("n1") == 1
