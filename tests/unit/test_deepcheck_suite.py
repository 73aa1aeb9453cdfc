"""The deep-check framework (issue 10): the suite's verdicts and exit codes, parameters as data per
partition and feature, strict configuration errors, and the `hpresilience deepcheck` command."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpresilience.cli import main
from hpresilience.config import ConfigError, load_dataclass
from hpresilience.deepcheck.check import Check, CouldNotRun, Skip
from hpresilience.deepcheck.checks import CHECKS
from hpresilience.deepcheck.config import DeepCheckConfig
from hpresilience.deepcheck.result import Level, Status, SuiteReport, Verdict
from hpresilience.deepcheck.suite import NodeFacts, run_one, run_suite


class Scripted(Check):
    """A check whose collect does what the test says (a test double of an outside tool)."""
    name = "scripted"
    params = {"limit": 1.0}

    def __init__(self, outcome):
        self.outcome = outcome
        self.ran = 0

    def collect(self, ctx):
        self.ran += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def evaluate(self, observed, params):
        return Verdict(Status.PASS if observed <= params["limit"] else Status.FAIL, f"value {observed}")


def report_of(*statuses: Status) -> SuiteReport:
    from hpresilience.deepcheck.result import CheckResult
    return SuiteReport("n1", Level.QUICK, tuple(CheckResult(f"c{i}", s, "") for i, s in enumerate(statuses)), 0, 0)


@pytest.mark.parametrize("statuses,status,code", [
    ((Status.PASS, Status.SKIP), Status.PASS, 0),
    ((Status.PASS, Status.FAIL, Status.ERROR), Status.FAIL, 1),   # evidence against the node wins
    ((Status.PASS, Status.ERROR), Status.ERROR, 2),
    ((), Status.ERROR, 2),                                        # nothing ran is not a pass
    ((Status.SKIP, Status.SKIP), Status.ERROR, 2),                # nor is nothing checked
])
def test_the_suite_verdict_and_exit_code(statuses, status, code):
    report = report_of(*statuses)
    assert (report.status, report.exit_code) == (status, code)
    assert SuiteReport.from_dict(json.loads(json.dumps(report.to_dict()))).status is status


@pytest.mark.parametrize("outcome,status,summary", [
    (0.5, Status.PASS, "value 0.5"),
    (2.0, Status.FAIL, "value 2.0"),
    (Skip("no such device"), Status.SKIP, "no such device"),
    (CouldNotRun("tool hung"), Status.ERROR, "tool hung"),
    (ZeroDivisionError("bug"), Status.ERROR, "check crashed: ZeroDivisionError: bug"),  # a bug never fails a node
])
def test_run_one_maps_every_outcome(outcome, status, summary):
    from hpresilience.deepcheck.check import Context
    check = Scripted(outcome)
    result = run_one(check, Context("n1", Level.QUICK, {"limit": 1.0}))
    assert check.ran == 1 and (result.status, result.summary) == (status, summary)


def test_a_required_check_that_is_skipped_is_an_error(tmp_path):
    config = DeepCheckConfig(required=["dcgm"], checks={"dcgm": {}})
    facts = NodeFacts("n1")
    env = {"PATH": str(tmp_path)}   # no dcgmi here
    report = run_suite(CHECKS, ["dcgm", "disk"], Level.QUICK, facts, config, str(tmp_path), env=env)
    dcgm = report.results[0]
    assert dcgm.status is Status.ERROR and dcgm.summary.startswith("required, but skipped: dcgmi is not installed")
    assert report.results[1].status is Status.PASS and report.exit_code == 2


def test_parameters_come_from_defaults_then_the_file_then_matching_overrides():
    config = load_dataclass(DeepCheckConfig, {
        "checks": {"gpu_burn": {"min_tflops": 400.0, "seconds": {"quick": 5}}},
        "overrides": [{"feature": "h100", "checks": {"gpu_burn": {"min_tflops": 600.0}}},
                      {"partition": "debug", "checks": {"gpu_burn": {"min_tflops": 1.0}}}]}, "test.toml")
    plain = config.params_for("gpu_burn")
    assert plain["min_tflops"] == 400.0 and plain["seconds"] == {"quick": 5, "standard": 60, "full": 300}
    assert plain["min_relative"] == 0.8                                            # untouched default
    assert config.params_for("gpu_burn", partitions=["train"], features=["h100"])["min_tflops"] == 600.0
    assert config.params_for("gpu_burn", partitions=["debug"], features=["h100"])["min_tflops"] == 1.0  # file order


@pytest.mark.parametrize("data,key,problem", [
    ({"levels": {"quick": ["gpu_bunr"]}}, "deepcheck", "unknown check 'gpu_bunr'"),
    ({"checks": {"gpu_burn": {"min_tflop": 1.0}}}, "deepcheck", "checks.gpu_burn.min_tflop: unknown parameter"),
    ({"checks": {"gpu_burn": {"min_tflops": "fast"}}}, "deepcheck", "expected a value like 0.0, got 'fast'"),
    ({"checks": {"dcgm": {"run_level": {"quick": 1, "slow": 2}}}}, "deepcheck", "run_level.slow"),
    ({"overrides": [{"checks": {}}]}, "deepcheck.overrides[0]", "exactly one of partition or feature"),
    ({"required": ["dcgmi"]}, "deepcheck", "required: unknown check 'dcgmi'"),
])
def test_bad_configuration_names_the_key(data, key, problem):
    with pytest.raises(ConfigError) as e:
        load_dataclass(DeepCheckConfig, data, "agent.toml", "deepcheck")
    assert e.value.key == key and problem in e.value.problem


def test_the_command_runs_the_chosen_checks_and_exits_with_the_verdict(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'[deepcheck.checks.disk]\npaths = ["{tmp_path}"]\nsize_mb = 1\n')
    result = CliRunner().invoke(main, ["deepcheck", "--config", str(config), "--no-slurm", "--only", "disk",
                                       "--json", "--level", "quick"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["level"] == "quick" and [c["name"] for c in report["checks"]] == ["disk"]
    assert report["checks"][0]["evidence"][str(tmp_path)]["size_mb"] == 1
    config.write_text(f'[deepcheck.checks.disk]\npaths = ["{tmp_path}"]\nsize_mb = 1\nmin_write_mb_s = 1e9\n')
    result = CliRunner().invoke(main, ["deepcheck", "--config", str(config), "--no-slurm", "--only", "disk"])
    assert result.exit_code == 1 and "FAIL  disk" in result.output and "< 1e+09" in result.output


def test_an_unknown_check_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(main, ["deepcheck", "--no-slurm", "--only", "nope"])
    assert result.exit_code == 2 and "unknown check(s) nope" in result.output


def test_disk_reads_back_what_it_wrote(tmp_path):
    from hpresilience.deepcheck.checks.disk import DiskSample, measure
    sample = measure(str(tmp_path), 2 << 20)
    assert sample.intact and sample.size_bytes == 2 << 20 and list(Path(tmp_path).iterdir()) == []
    verdict = CHECKS["disk"].evaluate([DiskSample("/x", 1 << 20, 0.01, 0.01, intact=False)],
                                      CHECKS["disk"].params | {"paths": ["/x"]})
    assert verdict.status is Status.FAIL and "differs" in verdict.summary


@pytest.mark.parametrize("args", [["--nodes", "n[1-2]", "--only", "disk"], ["--nodes", "n[1-2]", "--apply"],
                                  ["--apply", "--no-slurm"]])
def test_options_that_cannot_go_together_are_refused(args):
    result = CliRunner().invoke(main, ["deepcheck", *args])
    assert result.exit_code == 2 and "Usage:" in result.output
