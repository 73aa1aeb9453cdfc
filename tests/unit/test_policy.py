"""Policy: findings → one decision, with thresholds, de-duplication (no escalation:
the controller owns it, issue 9) and a journal that survives restarts. Pure logic, real files for the journal."""
import json

import pytest

from hpresilience.agent.config import PolicyConfig, Threshold
from hpresilience.agent.policy import Policy
from hpresilience.finding import Finding, NodeAction

BOOT = 1_000_000.0


class Clock:
    def __init__(self, t=BOOT + 100):
        self.t = t

    def __call__(self):
        return self.t


def f(code, action, at=BOOT + 10, entity=None, **kw):
    return Finding(monitor="kernel_log", code=code, action=NodeAction(action), message=f"{code} msg",
                   entity=entity, observed_at=at, **kw)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def policy(tmp_path, clock):
    return Policy(PolicyConfig(), tmp_path, clock=clock)


def test_nothing_to_do(policy):
    assert policy.decide([]) is None
    policy.add_events([f("XID_13", "none")])
    assert policy.decide([]) is None


def test_replace_beats_reboot(policy):
    policy.add_events([f("XID_73", "reboot"), f("XID_74", "replace", at=BOOT + 20)])
    d = policy.decide([f("GPU_LOST", "reboot")])
    assert d.action is NodeAction.REPLACE and d.findings[0].code == "XID_74"
    assert d.detail == "XID_74 msg (+2 more)" and d.slurm_state == "fail"


def test_flood_is_one_fault(policy):
    policy.add_events([f("XID_74", "replace", entity="GPU 3", at=BOOT + i) for i in range(1000)])
    assert len(policy.pending_events) == 1
    assert policy.decide([]).detail == "XID_74 msg"


def test_logging_is_rate_limited(policy, clock):
    key = f("XID_95", "reboot").key
    assert policy.should_log(key) and not policy.should_log(key)
    clock.t += 301
    assert policy.should_log(key)


def test_threshold_counts_within_window(tmp_path, clock):
    policy = Policy(PolicyConfig(thresholds={"OOM_SYSTEM": Threshold(count=3, window_seconds=60)}), tmp_path,
                    clock=clock)
    assert policy.add_events([f("OOM_SYSTEM", "reboot", at=BOOT)]) == []
    assert policy.add_events([f("OOM_SYSTEM", "reboot", at=BOOT + 100)]) == []   # first fell out of the window
    assert policy.add_events([f("OOM_SYSTEM", "reboot", at=BOOT + 110)]) == []
    assert len(policy.add_events([f("OOM_SYSTEM", "reboot", at=BOOT + 120)])) == 1
    assert policy.decide([]).action is NodeAction.REBOOT


def test_slurm_state_from_rule(policy):
    policy.add_events([f("SOFT_LOCKUP", "reboot", slurm_state="drain")])
    assert policy.decide([]).slurm_state == "drain"


def test_slurm_state_per_code_from_config(tmp_path, clock):
    policy = Policy(PolicyConfig(slurm_state={"GPU_LOST": "down"}), tmp_path, clock=clock)
    assert policy.decide([f("GPU_LOST", "reboot")]).slurm_state == "down"
    assert policy.decide([f("ECC_DBE_VOLATILE", "reboot")]).slurm_state == "fail"


def test_events_survive_restart_until_resolved(tmp_path, clock):
    first = Policy(PolicyConfig(), tmp_path, clock=clock)
    first.add_events([f("XID_74", "replace")])
    second = Policy(PolicyConfig(), tmp_path, clock=clock)     # agent restarted, e.g. slurmctld was down
    decision = second.decide([])
    assert decision.action is NodeAction.REPLACE
    second.resolved(decision)
    assert Policy(PolicyConfig(), tmp_path, clock=clock).decide([]) is None


def test_reboot_events_from_a_previous_boot_are_dropped_replace_events_kept(tmp_path, clock):
    Policy(PolicyConfig(), tmp_path, clock=clock).add_events([f("XID_73", "reboot", at=BOOT + 10)])
    later = Policy(PolicyConfig(), tmp_path, clock=clock)
    later.drop_events_before(BOOT + 3600)
    assert later.decide([]) is None
    # A power cycle does not mend an NVLink: a pending Replace survives the new boot.
    later.add_events([f("XID_74", "replace", at=BOOT + 20)])
    again = Policy(PolicyConfig(), tmp_path, clock=clock)
    again.drop_events_before(BOOT + 7200)
    assert again.decide([]).action is NodeAction.REPLACE


def test_threshold_counts_by_code_across_devices(policy):
    hung = [f("HUNG_TASK", "reboot", entity=f"pid {i}", at=BOOT + i) for i in range(3)]
    assert policy.add_events(hung[:2]) == []         # one NFS hiccup is not a node fault
    assert len(policy.add_events(hung[2:])) == 1


def test_a_re_reported_hung_task_counts_once(policy):
    """Issue 9, defect 8: the kernel re-reports a blocked task every 120 s (an NFS or Lustre
    stall); one task blocked for 6 minutes is one hung task, not a burst of three."""
    same = [f("HUNG_TASK", "reboot", entity="pid 4242", at=BOOT + 120 * i) for i in range(5)]
    assert policy.add_events(same) == []
    assert policy.decide([]) is None


def test_the_agent_never_escalates(tmp_path, clock):
    """Issue 9, defect 8: the agent's own escalation by component turned an OOM after an
    unrelated reboot into a Replace. The controller owns escalation; the agent reports
    each fault's own action."""
    policy = Policy(PolicyConfig(thresholds={}), tmp_path, clock=clock)
    policy.add_events([f("XID_73", "reboot", component="gpu")])
    first = policy.decide([])
    assert first.action is NodeAction.REBOOT
    policy.resolved(first)
    clock.t = BOOT + 7200
    again = Policy(PolicyConfig(thresholds={}), tmp_path, clock=clock)   # after the reboot, same fault again
    again.add_events([f("XID_73", "reboot", component="gpu", at=BOOT + 7100)])
    assert again.decide([]).action is NodeAction.REBOOT
    again.add_events([f("OOM_SYSTEM", "reboot", component="memory", at=BOOT + 7150)])
    assert again.decide([]).action is NodeAction.REBOOT


def test_decision_reason_carries_the_fault(policy):
    policy.add_events([f("XID_79", "reboot", entity="GPU 3 (0000:b9:00.0)")])
    reason = policy.decide([]).reason
    assert str(reason) == "Action: Reboot; [XID_79@GPU 3 (0000:b9:00.0)] XID_79 msg"
    assert reason.fault.code == "XID_79" and reason.fault.entity == "GPU 3 (0000:b9:00.0)"


def test_corrupt_journal_is_ignored(tmp_path, clock):
    (tmp_path / "pending-events.json").write_text("{not json")
    assert Policy(PolicyConfig(), tmp_path, clock=clock).decide([]) is None
    # Valid JSON of the wrong shape: bad records dropped one by one, good ones kept.
    good = f("XID_74", "replace").to_dict()
    (tmp_path / "pending-events.json").write_text(f'[{{"code": "X"}}, 7, {json.dumps(good)}]')
    assert Policy(PolicyConfig(), tmp_path, clock=clock).decide([]).action is NodeAction.REPLACE
