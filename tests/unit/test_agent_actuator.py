"""The agent's actuator against the in-memory Slurm model (issue 9): ownership, never downgrading, and the
shared-cause budget of defect 8 (one outside event must not fail a partition)."""
import pytest

from hpresilience.action import NodeAction
from hpresilience.agent.actuator import Outcome
from hpresilience.slurm import NodeState
from tests.decision_harness import ADMIN, OURS, Cluster


@pytest.fixture
def cluster(tmp_path) -> Cluster:
    return Cluster.build(tmp_path, nodes="n[1-10]")   # one partition of 10: budget 10% = 1 node


def test_a_shared_cause_fault_is_reported_not_applied_once_the_partition_budget_is_spent(cluster):
    assert cluster.flag("n2", NodeAction.REBOOT, "HUNG_TASK") is Outcome.APPLIED
    assert "[HUNG_TASK]" in cluster.gateway.node("n2").reason
    before = len(cluster.model.writes)
    assert cluster.flag("n1", NodeAction.REBOOT, "HUNG_TASK") is Outcome.BUDGET_SPENT
    assert cluster.model.writes[before:] == []
    assert cluster.gateway.node("n1").reason is None


def test_a_local_fault_applies_whatever_the_budget(cluster):
    cluster.flag("n2", NodeAction.REBOOT, "HUNG_TASK")
    assert cluster.flag("n1", NodeAction.REBOOT, "XID_79", "GPU 3") is Outcome.APPLIED
    assert cluster.gateway.node("n1").action_reason.fault.code == "XID_79"


def test_the_budget_counts_only_nodes_out_for_the_same_code(cluster):
    cluster.flag("n2", NodeAction.REBOOT, "IB_PORT_DOWN", "mlx5_0 port 1")
    assert cluster.flag("n1", NodeAction.REBOOT, "HUNG_TASK") is Outcome.APPLIED


def test_someone_elses_reason_is_left_alone(cluster):
    cluster.admin_sets("n1", "bad DIMM, ticket 42")
    before = len(cluster.model.writes)
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1") is Outcome.FOREIGN_REASON
    assert cluster.writes_by(OURS, "n1", since=before) == []
    assert (cluster.gateway.node("n1").reason, cluster.gateway.node("n1").reason_user) == ("bad DIMM, ticket 42", ADMIN)


def test_replace_is_never_downgraded_to_reboot(cluster):
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1") is Outcome.APPLIED
    replace = cluster.gateway.node("n1").reason
    assert cluster.flag("n1", NodeAction.REBOOT, "XID_79", "GPU 3") is Outcome.ALREADY
    assert cluster.gateway.node("n1").reason == replace


def test_reboot_is_upgraded_to_replace(cluster):
    cluster.flag("n1", NodeAction.REBOOT, "XID_73", "GPU 1")
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1") is Outcome.APPLIED
    assert cluster.gateway.node("n1").action_reason.action is NodeAction.REPLACE


def test_a_node_rebooting_is_not_touched(cluster):
    cluster.gateway.reboot("n1", reason="Action: Reboot", next_state=NodeState.RESUME)
    before = len(cluster.model.writes)
    assert cluster.flag("n1", NodeAction.REPLACE, "XID_74", "GPU 1") is Outcome.REBOOTING
    assert cluster.model.writes[before:] == []
