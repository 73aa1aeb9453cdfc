"""`hpresilience deepcheck --apply` (the prolog/epilog of issue 10) against the in-memory Slurm model:
a failed deep check takes the node out the way the agent would, through the same Actuator."""
from hpresilience.action import NodeAction
from hpresilience.agent.config import AgentConfig
from hpresilience.deepcheck.apply import apply_report, findings
from hpresilience.deepcheck.result import CheckResult, Level, Status, SuiteReport
from hpresilience.slurm import NodeState, SlurmGateway
from hpresilience.slurm.reason import parse_reason
from tests.slurm_model import SlurmModel

DCGM_FAIL = CheckResult("dcgm", Status.FAIL, "dcgmi diag -r 1: memory failed on GPU 3",
                        {"suggested_action": "replace"})
BURN_FAIL = CheckResult("gpu_burn", Status.FAIL, "GPU 2 disagrees with the reference")
CONFIG_FAIL = CheckResult("dcgm", Status.FAIL, "software failed on GPU 0: persistence mode",
                          {"suggested_action": "fix_configuration"})


def report(*results: CheckResult) -> SuiteReport:
    return SuiteReport("n1", Level.QUICK, (CheckResult("disk", Status.PASS, "ok"), *results), 0.0, 1.0)


def setup():
    model = SlurmModel("n[1-4]")
    return model, SlurmGateway(model), AgentConfig()


def test_a_failed_check_fails_the_node_with_our_reason_naming_the_check():
    model, gateway, config = setup()
    assert apply_report(config, report(BURN_FAIL, DCGM_FAIL), gateway) == "applied"
    node = gateway.node("n1")
    assert "FAIL" in node.flags
    ours = parse_reason(node.reason)
    assert ours.action is NodeAction.REPLACE                       # dcgm's ISOLATE-class suggestion wins
    assert (ours.fault.code, ours.fault.entity) == ("DEEPCHECK", "dcgm")
    assert "deep check failed: dcgm: dcgmi diag -r 1: memory failed on GPU 3" in node.reason


def test_a_burn_failure_asks_for_a_reboot():
    _, gateway, config = setup()
    assert [f.action for f in findings(report(BURN_FAIL))] == [NodeAction.REBOOT]
    apply_report(config, report(BURN_FAIL), gateway)
    assert parse_reason(gateway.node("n1").reason).action is NodeAction.REBOOT


def test_nothing_is_applied_for_a_passing_report_or_a_configuration_failure():
    model, gateway, config = setup()
    assert apply_report(config, report(), gateway) is None
    assert apply_report(config, report(CONFIG_FAIL), gateway) is None   # neither a reboot nor new hardware fixes it
    assert gateway.node("n1").reason is None and model.writes == []


def test_someone_elses_reason_is_never_overwritten():
    model, gateway, config = setup()
    with model.as_user("alice"):
        gateway.set_state("n1", NodeState.DRAIN, "vendor burn-in")
    assert apply_report(config, report(DCGM_FAIL), gateway) == "foreign_reason"
    assert gateway.node("n1").reason == "vendor burn-in"


def test_dry_run_and_a_spent_budget_change_nothing():
    model, gateway, config = setup()
    config.agent.dry_run = True
    assert apply_report(config, report(DCGM_FAIL), gateway) == "dry_run"
    config.agent.dry_run = False
    config.policy.shared_cause.codes.append("DEEPCHECK")
    gateway.set_state("n2", NodeState.FAIL, "Action: Reboot; [DEEPCHECK@dcgm] deep check failed: dcgm")
    assert apply_report(config, report(DCGM_FAIL), gateway) == "budget_spent"
    assert gateway.node("n1").reason is None
