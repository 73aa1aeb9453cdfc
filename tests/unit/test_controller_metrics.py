"""The controller's metrics as each reconcile pass leaves them (issue 12, deliverable 1), against
the in-memory Slurm model: the real Reconciler, Steps and Journal; the values are read from the
registry Prometheus would scrape."""
from typing import Dict, Optional

import pytest

from hpresilience.action import NodeAction
from hpresilience.controller.metrics import ControllerMetrics
from hpresilience.slurm import NodeState, SlurmGateway
from tests.decision_harness import ADMIN, Cluster, check_result, controller_config

XID_79 = ("XID_79", "GPU 3")


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    return Cluster.build(tmp_path)


def value(cluster: Cluster, name: str, **labels: str) -> Optional[float]:
    return cluster.reconciler.metrics.registry.get_sample_value(name, labels)


def unattended(cluster: Cluster) -> Dict[str, float]:
    return {why: value(cluster, "hpr_controller_unattended_nodes", why=why)
            for why in ("paused", "recommend_only", "gave_up", "unresponsive")}


def test_labelled_series_exist_at_zero_before_any_event():
    """A dashboard or an alert on a repair that never happened reads 0, not "no data"."""
    registry = ControllerMetrics().registry
    for name, labels in [("hpr_controller_workflows_finished_total", {"action": "replace", "status": "failed"}),
                         ("hpr_controller_escalations_total", {"action": "reboot"}),
                         ("hpr_controller_time_to_service_seconds_count", {"action": "reboot"}),
                         ("hpr_controller_deepcheck_failures_total", {"check": "dcgm"}),
                         ("hpr_controller_unattended_nodes", {"why": "gave_up"}),
                         ("hpr_autoresume_recoveries_total", {"path": "requeue"}),
                         ("hpr_autoresume_recovery_seconds_count", {"path": "in_allocation"})]:
        assert registry.get_sample_value(name, labels) == 0, name


def test_each_pass_counts_every_partitions_nodes_by_state(cluster):
    """hpr_controller_partition_nodes{partition,state}: every state present (0 included), so an alert
    can divide a partition's nodes out by its total."""
    def count(state: str) -> float:
        return value(cluster, "hpr_controller_partition_nodes", partition="train", state=state)

    cluster.run_pass()
    assert count("idle") == 4 and count("failed") == 0 and count("down") == 0
    cluster.flag("n2", NodeAction.REBOOT, "XID_79")
    with cluster.model.as_user(ADMIN):
        SlurmGateway(cluster.model).set_state("n3", NodeState.DRAIN, "disk swap by Ann")
    cluster.run_pass()
    assert (count("idle"), count("failed"), count("drained")) == (2, 1, 1)


def test_a_workflow_waiting_in_drain_shows_its_step_and_age(cluster):
    """hpr_controller_workflow_step_oldest_seconds{step}: the age in the step, from the step's own
    entry time (not the workflow's last note), for the stuck-workflow alert."""
    job = cluster.model.submit("n1")
    assert cluster.model.job(job).is_running
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    cluster.run_pass()
    assert value(cluster, "hpr_controller_workflows_active", step="drain") == 1
    assert value(cluster, "hpr_controller_flagged_nodes", action="reboot") == 1
    cluster.model.advance(600)
    cluster.run_pass()
    assert value(cluster, "hpr_controller_workflow_step_oldest_seconds", step="drain") == pytest.approx(600, abs=1)
    assert value(cluster, "hpr_controller_workflow_step_oldest_seconds", step="reboot") == 0
    cluster.model.finish(job)
    cluster.settle()
    assert value(cluster, "hpr_controller_workflows_active", step="drain") == 0
    assert value(cluster, "hpr_controller_flagged_nodes", action="reboot") == 0
    assert value(cluster, "hpr_controller_time_to_service_seconds_count", action="reboot") == 1
    assert value(cluster, "hpr_controller_node_recent_workflows", node="n1", status="done") == 1


def test_a_flag_the_controller_only_recommends_is_unattended_with_its_age(tmp_path):
    config = controller_config(tmp_path)
    config.controller.mode = "manual"
    cluster = Cluster.build(tmp_path, config=config)
    cluster.flag("n1", NodeAction.REPLACE, *XID_79)
    cluster.model.advance(120)
    cluster.run_pass()
    assert cluster.journal.events(node="n1")[-1].kind == "recommendation"   # the pass saw the flag
    assert unattended(cluster) == {"paused": 0, "recommend_only": 1, "gave_up": 0, "unresponsive": 0}
    assert value(cluster, "hpr_controller_unattended_oldest_seconds") == pytest.approx(120, abs=1)
    assert value(cluster, "hpr_controller_flagged_nodes", action="replace") == 1


def test_flags_held_by_the_breaker_are_unattended_as_paused(cluster):
    cluster.journal.trip_breaker("test: paused by hand")
    cluster.flag("n1", NodeAction.REBOOT, *XID_79)
    report = cluster.run_pass()
    assert report.paused and cluster.workflows("n1") == []
    assert unattended(cluster)["paused"] == 1


def test_a_repair_given_up_stays_unattended_and_counts_against_its_node(cluster):
    """The replacement's check still finds the fault: given up to a human."""
    cluster.model.check = lambda node: check_result("REPLACE  XID_79 [GPU 3]: fell off the bus")
    cluster.flag("n1", NodeAction.REPLACE, *XID_79)
    cluster.settle()
    assert [(wf.action, wf.status) for wf in cluster.workflows("n1")] == [("replace", "failed")]
    cluster.run_pass()
    assert unattended(cluster) == {"paused": 0, "recommend_only": 0, "gave_up": 1, "unresponsive": 0}
    assert value(cluster, "hpr_controller_workflows_finished_total", action="replace", status="failed") == 1
    assert value(cluster, "hpr_controller_node_recent_workflows", node="n1", status="failed") == 1
    assert value(cluster, "hpr_controller_node_recent_workflows", node="n2", status="failed") is None
    cluster.model.advance(24 * 3600 + 1)
    cluster.run_pass()
    assert value(cluster, "hpr_controller_node_recent_workflows", node="n1", status="failed") is None


def test_a_silent_node_is_unattended_until_its_power_cycle_starts(cluster):
    cluster.model.kill("n1")
    cluster.model.advance(cluster.model.slurmd_timeout + 1)
    cluster.run_pass()
    assert unattended(cluster)["unresponsive"] == 1 and cluster.workflows("n1") == []
    cluster.model.advance(cluster.config.workflow.unresponsive_grace_seconds)
    cluster.run_pass()
    assert [wf.action for wf in cluster.workflows("n1")] == ["power_cycle"]
    assert unattended(cluster)["unresponsive"] == 0
    assert value(cluster, "hpr_controller_flagged_nodes", action="power_cycle") == 1


def test_escalations_are_counted_from_the_action_escalated(cluster):
    """The same fault returning after its reboot: the new workflow opens as a replacement."""
    for _ in range(2):
        cluster.flag("n1", NodeAction.REBOOT, *XID_79)
        cluster.settle()
        cluster.model.advance(60)
    assert [wf.action for wf in cluster.workflows("n1")] == ["reboot", "replace"]
    assert value(cluster, "hpr_controller_escalations_total", action="reboot") == 1
    assert value(cluster, "hpr_controller_node_recent_workflows", node="n1", status="done") == 2


def test_a_requeue_the_pass_expedites_is_counted(cluster):
    job = cluster.model.submit("n1", requeue=True, comment="mine")
    cluster.gateway.requeue(job, expedite=True)
    cluster.model.advance(2)
    cluster.run_pass()
    assert cluster.model.job(job).extra["Comment"] == "mine"   # the pass expedited it
    assert value(cluster, "hpr_controller_requeues_expedited_total") == 1


def test_a_silent_node_that_revived_and_fell_silent_again_is_not_power_cycled_at_once(tmp_path):
    """Issue 12 review: _candidates, restructured to report unattended nodes, skipped the loop
    guard for silent nodes: the same silence (Slurm's reason and time unchanged) re-opened a
    power cycle as soon as its abandoned workflow ended, with no grace."""
    config = controller_config(tmp_path)
    config.limits.max_concurrent = 1
    config.workflow.unresponsive_grace_seconds = 60
    cluster = Cluster.build(tmp_path, config=config)
    cluster.model.hang_reboots.add("n2")           # n2's reboot holds the one slot: n1 waits in drain
    cluster.flag("n2", NodeAction.REBOOT, *XID_79)
    cluster.run_pass()
    cluster.model.advance(5)
    cluster.run_pass()
    cluster.model.kill("n1")
    for _ in range(20):
        cluster.run_pass()
        cluster.model.advance(5)
    assert [(wf.action, wf.step) for wf in cluster.workflows("n1")] == [("power_cycle", "drain")]
    cluster.model.revive("n1")
    cluster.run_pass()
    assert [wf.status for wf in cluster.workflows("n1")] == ["abandoned"]
    cluster.model.advance(5)
    cluster.model.kill("n1")
    cluster.model.advance(5)
    cluster.run_pass()
    assert [wf.status for wf in cluster.workflows("n1")] == ["abandoned"]


def test_only_the_controllers_own_escalations_are_counted(tmp_path):
    """n1's reboot never comes back (escalated by us: counted); n2's is overtaken by an admin's
    Action: Replace (a new request, not an escalation: not counted, issue 12 review)."""
    config = controller_config(tmp_path)
    config.limits.max_percent = 100.0
    cluster = Cluster.build(tmp_path, config=config)
    for node in ("n1", "n2"):
        cluster.model.hang_reboots.add(node)
        cluster.flag(node, NodeAction.REBOOT, *XID_79)
    for _ in range(3):
        cluster.run_pass()
        cluster.model.advance(5)
    assert {wf.node: wf.step for wf in cluster.journal.active()} == {"n1": "await_boot", "n2": "await_boot"}
    cluster.admin_sets("n2", "Action: Replace", NodeState.FAIL)
    cluster.run_pass()
    cluster.model.advance(cluster.config.workflow.reboot_timeout_seconds + 1)
    cluster.run_pass()
    assert {wf.node: wf.action for wf in cluster.journal.history()} == {"n1": "replace", "n2": "replace"}
    assert value(cluster, "hpr_controller_escalations_total", action="reboot") == 1
