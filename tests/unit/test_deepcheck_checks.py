"""The dcgm, cpu_memory and fabric deep checks (issue 10).

`evaluate` is fed the captured real outputs of tests/fixtures/deep-checks/ (provenance in
its README.md). `collect` runs the real stress-ng; dcgmi, ib_write_bw and fi_pingpong need
hardware, so small scripts on PATH in tmp_path replay the captured outputs at the tool
boundary, or hang, to prove the timeout path.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import pytest

from hpresilience.deepcheck.check import Check, Context, CouldNotRun, defaults
from hpresilience.deepcheck.checks.cpu_memory import CpuMemoryCheck, StressObservation
from hpresilience.deepcheck.checks.dcgm import DcgmCheck, DcgmObservation, suggested_action
from hpresilience.deepcheck.checks.fabric import (
    FabricCheck,
    FabricObservation,
    LoopbackRun,
    discover,
    efa_run,
    ib_run,
    parse_rate,
)
from hpresilience.deepcheck.parsers.dcgm import parse_dcgm_diag
from hpresilience.deepcheck.parsers.perftest import parse_ib_write_bw
from hpresilience.deepcheck.parsers.stress_ng import parse_stress_ng
from hpresilience.deepcheck.result import CheckResult, Level, Status
from hpresilience.deepcheck.suite import run_one
from hpresilience.deepcheck.tool import ToolOutput

FIXTURES = Path(__file__).parents[1] / "fixtures" / "deep-checks"
STRESS_NG = "/usr/bin/stress-ng"


def load(name: str) -> str:
    return (FIXTURES / name).read_text()


def params(check: Check, **overrides: Any) -> Dict[str, Any]:
    return {**defaults(check), **overrides}


def run(check: Check, tmp_path: Path, level: Level = Level.STANDARD, path: Optional[str] = None,
        **overrides: Any) -> CheckResult:
    """collect + evaluate through the suite's run_one, with PATH limited to `path`."""
    env = {"PATH": path if path is not None else str(tmp_path / "bin")}
    ctx = Context(node="n1", level=level, params=params(check, **overrides), state_dir=str(tmp_path), env=env)
    return run_one(check, ctx)


def fake_tool(tmp_path: Path, name: str, body: str) -> Path:
    """A shell script called `name` in tmp_path/bin: the outside tool's stand-in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


# --- dcgm: evaluate on the captures --------------------------------------------------

def dcgm_verdict(text: str, exit_status: int = 0, level: int = 2):
    return DcgmCheck().evaluate(DcgmObservation(parse_dcgm_diag(text), exit_status, level), defaults(DcgmCheck()))


def dcgm_doc_verdict(doc: Mapping[str, Any], exit_status: int = 0):
    return dcgm_verdict(json.dumps(doc), exit_status)


@pytest.mark.parametrize("name, version, tests", [
    ("dcgmi-diag-r2-pass.json", None, 11),
    ("dcgmi-diag-dcgm3.1-8gpu-quirks.txt", "3.1.0", 10),
])
def test_dcgm_pass(name, version, tests):
    verdict = dcgm_verdict(load(name))
    assert verdict.status is Status.PASS and verdict.summary == f"dcgmi diag -r 2: {tests} test(s) passed"
    assert verdict.evidence["version"] == version and verdict.evidence["skipped_tests"] == []
    assert "suggested_action" not in verdict.evidence and set(verdict.evidence["tests"].values()) == {"pass"}


def test_dcgm_some_skipped_is_pass_naming_them():
    verdict = dcgm_verdict(load("dcgmi-diag-r3-pass.json"), level=3)
    assert verdict.status is Status.PASS
    assert verdict.summary == "dcgmi diag -r 3: 15 test(s) passed, skipped: EUD Test"
    assert verdict.evidence["skipped_tests"] == ["EUD Test"] and verdict.evidence["tests"]["EUD Test"] == "skip"


@pytest.mark.parametrize("name", ["dcgmi-diag-dcgm4-format.json", "dcgmi-diag-dcgm4-r1-fail-persistence.json"])
def test_dcgm_failure_names_test_gpu_and_warning(name):
    verdict = dcgm_verdict(load(name), exit_status=226, level=1)
    assert verdict.status is Status.FAIL
    assert verdict.summary.startswith("dcgmi diag -r 1: software failed on GPU 0: Persistence Mode: Persistence "
                                      "mode for GPU 0 is disabled.")
    assert verdict.summary.endswith("(error 29, severity 5 CONFIG)")
    # The 4.x test_summary repeats the per-GPU failure: one failure reported, not two.
    (failure,) = verdict.evidence["failing"]
    assert (failure["test"], failure["entity"]) == ("software", "GPU 0")
    assert failure["warnings"][0]["error_id"] == 29 and failure["warnings"][0]["severity_name"] == "CONFIG"
    assert verdict.evidence["failing_entities"] == ["GPU 0"]
    assert verdict.evidence["suggested_action"] == "fix_configuration"
    assert verdict.evidence["exit_status"] == 226


def test_dcgm_gated_plugins_fail_on_software_with_skips_in_evidence():
    verdict = dcgm_verdict(load("dcgmi-diag-dcgm4-r2-skip-gated.json"), exit_status=226)
    assert verdict.status is Status.FAIL and "software failed on GPU 0" in verdict.summary
    assert verdict.evidence["skipped_tests"] == ["memory", "pcie"] and verdict.evidence["version"] == "4.5.2"


def _gated_doc() -> Dict[str, Any]:
    return json.loads(load("dcgmi-diag-dcgm4-r2-skip-gated.json"))


def test_dcgm_all_skipped_is_skip():
    doc = _gated_doc()
    root = doc["DCGM Diagnostic"]
    root["test_categories"] = [c for c in root["test_categories"] if c["category"] != "Deployment"]
    verdict = dcgm_doc_verdict(doc, exit_status=226)
    assert verdict.status is Status.SKIP and verdict.summary == "dcgmi ran no test (all skipped)"
    assert verdict.evidence["skipped_tests"] == ["memory", "pcie"]


def test_dcgm_summary_failure_without_gpu_failure():
    doc = json.loads(load("dcgmi-diag-dcgm4-format.json"))
    memory = doc["DCGM Diagnostic"]["test_categories"][1]["tests"][0]
    memory["test_summary"]["status"] = "Fail"
    verdict = dcgm_doc_verdict(doc, exit_status=226)
    assert verdict.status is Status.FAIL
    assert ("memory", None) in [(f["test"], f["entity"]) for f in verdict.evidence["failing"]]
    assert verdict.summary.endswith("; memory failed") and verdict.evidence["failing_entities"] == ["GPU 0"]


@pytest.mark.parametrize("severities, action", [
    ([5, 2, 6], "replace"), ([6, 5], "reboot"), ([5], "fix_configuration"), ([4, None], "investigate"),
    ([], "investigate"),
])
def test_dcgm_suggested_action(severities, action):
    assert suggested_action(severities) == action


def test_dcgm_isolate_severity_suggests_replace():
    doc = _gated_doc()
    (warning,) = doc["DCGM Diagnostic"]["test_categories"][0]["tests"][0]["results"][0]["warnings"]
    warning["error_severity"] = 2
    verdict = dcgm_doc_verdict(doc)
    assert verdict.status is Status.FAIL and verdict.evidence["suggested_action"] == "replace"
    assert "severity 2 ISOLATE" in verdict.summary


def test_dcgm_warn_is_pass_with_the_warning_in_evidence():
    doc = json.loads(load("dcgmi-diag-dcgm4-format.json"))
    software = doc["DCGM Diagnostic"]["test_categories"][0]["tests"][0]
    software["results"][0]["status"] = software["test_summary"]["status"] = "Warn"
    verdict = dcgm_doc_verdict(doc)
    assert verdict.status is Status.PASS and verdict.evidence["tests"]["software"] == "warn"
    assert verdict.evidence["warnings"][0]["error_id"] == 29


def test_dcgm_unknown_status_is_error():
    doc = json.loads(load("dcgmi-diag-dcgm4-format.json"))
    doc["DCGM Diagnostic"]["test_categories"][0]["tests"][0]["results"][0]["status"] = "Pass"
    doc["DCGM Diagnostic"]["test_categories"][0]["tests"][0]["test_summary"]["status"] = "Running"
    verdict = dcgm_doc_verdict(doc)
    assert verdict.status is Status.ERROR and "status not understood (software: running)" in verdict.summary


def test_dcgm_clean_report_with_nonzero_exit_is_error():
    verdict = dcgm_verdict(load("dcgmi-diag-r2-pass.json"), exit_status=226)
    assert verdict.status is Status.ERROR and verdict.summary == "dcgmi diag -r 2: exited 226 although no test failed"


# --- dcgm: collect through a replaying dcgmi -----------------------------------------

def replaying_dcgmi(tmp_path: Path, fixture: str, exit_status: int) -> Path:
    args = tmp_path / "dcgmi.args"
    fake_tool(tmp_path, "dcgmi", f'echo "$@" > {args}\n/bin/cat {FIXTURES / fixture}\nexit {exit_status}')
    return args


def test_dcgm_collect_reads_report_despite_exit_226(tmp_path):
    args = replaying_dcgmi(tmp_path, "dcgmi-diag-dcgm4-format.json", 226)
    result = run(DcgmCheck(), tmp_path, extra_args=["--fail-early", "-g", "0"])
    assert args.read_text().split() == ["diag", "-r", "2", "-j", "--fail-early", "-g", "0"]
    assert result.status is Status.FAIL and result.evidence["exit_status"] == 226
    assert result.evidence["failing_entities"] == ["GPU 0"]


@pytest.mark.parametrize("level, run_level", [(Level.QUICK, "1"), (Level.FULL, "3")])
def test_dcgm_run_level_per_level(tmp_path, level, run_level):
    args = replaying_dcgmi(tmp_path, "dcgmi-diag-r3-pass.json", 0)
    result = run(DcgmCheck(), tmp_path, level=level)
    assert args.read_text().split()[:4] == ["diag", "-r", run_level, "-j"] and result.status is Status.PASS


def test_dcgm_missing_is_skip(tmp_path):
    result = run(DcgmCheck(), tmp_path)
    assert result.status is Status.SKIP and result.summary == "dcgmi is not installed (not on PATH)"


def test_dcgm_hung_is_error(tmp_path):
    fake_tool(tmp_path, "dcgmi", "exec /bin/sleep 30")
    result = run(DcgmCheck(), tmp_path, timeout_seconds=0.5)
    assert result.status is Status.ERROR and result.summary == "dcgmi did not finish within 0.5s (killed)"


def test_dcgm_no_json_is_error_with_exit_status_and_first_line(tmp_path):
    fake_tool(tmp_path, "dcgmi", "echo >&2\necho 'Error: unable to establish a connection to the host engine' >&2\n"
                                 "exit 255")
    result = run(DcgmCheck(), tmp_path)
    assert result.status is Status.ERROR
    assert result.summary == ("dcgmi exited 255 without a JSON report: "
                              "Error: unable to establish a connection to the host engine")


def test_dcgm_malformed_json_is_error_naming_what(tmp_path):
    half = tmp_path / "half.json"
    text = load("dcgmi-diag-dcgm4-format.json")
    half.write_text(text[: len(text) // 2])
    fake_tool(tmp_path, "dcgmi", f"/bin/cat {half}\nexit 226")
    result = run(DcgmCheck(), tmp_path)
    assert result.status is Status.ERROR and result.summary.startswith("dcgmi diag: invalid JSON")
    assert result.summary.endswith("(dcgmi exit status 226)")


# --- cpu_memory: evaluate on the captures ---------------------------------------------

def stress_verdict(text: str, exit_status: int = 0, **overrides: Any):
    check = CpuMemoryCheck()
    return check.evaluate(StressObservation(parse_stress_ng(text), exit_status, 10), params(check, **overrides))


@pytest.mark.parametrize("name", ["stress-ng-verify-metrics.txt", "stress-ng-verify.txt", "stress-ng-metrics.txt",
                                  "stress-ng-metrics-legacy-info.txt"])
def test_stress_pass(name):
    verdict = stress_verdict(load(name))
    assert verdict.status is Status.PASS and verdict.evidence["skipped"] == {}
    assert verdict.evidence["fail_lines"] == [] and verdict.evidence["exit_status"] == 0


def test_stress_pass_reports_rates():
    verdict = stress_verdict(load("stress-ng-verify-metrics.txt"), min_cpu_bogo_ops_per_s=90.0,
                             min_vm_bogo_ops_per_s=2000.0)
    assert verdict.status is Status.PASS
    assert verdict.summary == "stress-ng 10s verified: cpu 96 bogo ops/s, vm 2034 bogo ops/s"
    assert verdict.evidence["stressors"]["vm"] == {"bogo_ops": 20992.0, "real_time_s": 10.32,
                                                   "bogo_ops_per_s": 2033.93}


def test_stress_memory_verification_failure_fails():
    verdict = stress_verdict(load("stress-ng-verify-fail-memory.txt"), exit_status=2)
    assert verdict.status is Status.FAIL
    assert verdict.summary == ("stress-ng --verify: elon: detected 1 memory error; vm: detected 5 bit errors while "
                               "stressing memory; failed: vm (1); vm: [8014] terminated with an error, exit status=2 "
                               "(stressor failed)")
    assert verdict.evidence["failed"] == {"vm": 1} and len(verdict.evidence["fail_lines"]) == 2


def test_stress_exit_2_alone_fails():
    verdict = stress_verdict(load("stress-ng-verify-metrics.txt"), exit_status=2)
    assert verdict.status is Status.FAIL and verdict.summary == "stress-ng --verify: exit status 2 (a stressor failed)"


@pytest.mark.parametrize("key, value, message", [
    ("min_cpu_bogo_ops_per_s", 100.0, "cpu 95.8 bogo ops/s < min_cpu_bogo_ops_per_s 100"),
    ("min_vm_bogo_ops_per_s", 3000.0, "vm 2033.9 bogo ops/s < min_vm_bogo_ops_per_s 3000"),
])
def test_stress_rate_below_threshold_fails(key, value, message):
    verdict = stress_verdict(load("stress-ng-verify-metrics.txt"), **{key: value})
    assert verdict.status is Status.FAIL and verdict.summary == f"stress-ng: {message}"


def test_stress_threshold_without_metrics_is_noted_not_judged():
    verdict = stress_verdict(load("stress-ng-verify.txt"), min_cpu_bogo_ops_per_s=1.0)
    assert verdict.status is Status.PASS
    assert verdict.evidence["rates_not_judged"] == ["min_cpu_bogo_ops_per_s: no cpu metrics"]


def test_stress_some_instances_skipped_is_pass_with_note():
    verdict = stress_verdict(load("stress-ng-verify-vm-skipped.txt"), exit_status=3)
    assert verdict.status is Status.PASS and verdict.evidence["skipped"] == {"vm": 2}
    assert verdict.summary.endswith("; skipped: vm (2)") and verdict.evidence["passed"] == {"vm": 190}


def test_stress_every_instance_skipped_is_error():
    text = load("stress-ng-verify-vm-skipped.txt").replace("skipped: 2: vm (2)", "skipped: 192: vm (192)")
    verdict = stress_verdict(text.replace("passed: 190: vm (190)", "passed: 0"), exit_status=3)
    assert verdict.status is Status.ERROR
    assert verdict.summary == "stress-ng: no stressor did any work (skipped: vm (192))"


@pytest.mark.parametrize("exit_status, meaning", [(1, "harness error (bad option or out of memory)"),
                                                  (5, "stressor killed by a signal"), (7, "metrics untrustworthy"),
                                                  (99, "unknown exit status")])
def test_stress_exit_status_without_failure_is_error(exit_status, meaning):
    verdict = stress_verdict(load("stress-ng-verify-metrics.txt"), exit_status=exit_status)
    assert verdict.status is Status.ERROR and verdict.summary == f"stress-ng exited {exit_status} ({meaning})"


# --- cpu_memory: collect with the real stress-ng --------------------------------------

needs_stress_ng = pytest.mark.skipif(not os.access(STRESS_NG, os.X_OK), reason="stress-ng is not installed")


@needs_stress_ng
def test_stress_real_run_passes(tmp_path):
    result = run(CpuMemoryCheck(), tmp_path, path="/usr/bin:/bin", seconds=2, cpu_workers=1, vm_bytes="16M")
    assert result.status is Status.PASS, result.summary
    assert result.evidence["stressors"]["cpu"]["bogo_ops"] > 0 and result.evidence["stressors"]["vm"]["bogo_ops"] > 0
    assert result.evidence["seconds"] == 2 and result.evidence["exit_status"] == 0
    assert not list(tmp_path.glob("deepcheck-stress-ng-*"))   # its --temp-path was removed


@needs_stress_ng
def test_stress_real_vm_without_memory_did_no_work_and_passes_with_note(tmp_path):
    # 0.15.06 neither skips nor fails a vm stressor that cannot mmap: it shows 0 bogo ops.
    fake_tool(tmp_path, "stress-ng", f'ulimit -v 400000\nexec {STRESS_NG} "$@"')
    result = run(CpuMemoryCheck(), tmp_path, seconds=1, cpu_workers=1, vm_bytes="4G")
    assert result.status is Status.PASS, result.summary
    assert result.evidence["stressors"]["vm"]["bogo_ops"] == 0 and result.evidence["stressors"]["cpu"]["bogo_ops"] > 0
    assert result.evidence["skipped"] == {"vm": "no work done"}
    assert result.summary.endswith("; skipped: vm (no work done)")


@needs_stress_ng
def test_stress_real_run_where_no_stressor_did_work_is_error(tmp_path):
    # Only the vm stressor, starved of address space: its one row shows 0 bogo ops.
    starved = subprocess.run(["/bin/sh", "-c", f"ulimit -v 400000; exec {STRESS_NG} --vm 1 --vm-bytes 4G --verify "
                              f"--metrics --timeout 1s --temp-path {tmp_path}"], capture_output=True, text=True)
    verdict = stress_verdict(starved.stdout + starved.stderr, exit_status=starved.returncode)
    assert verdict.evidence["stressors"]["vm"]["bogo_ops"] == 0
    assert verdict.status is Status.ERROR
    assert verdict.summary == "stress-ng: no stressor did any work (skipped: vm (no work done))"


@needs_stress_ng
def test_stress_unparseable_output_is_error_naming_stress_ng(tmp_path):
    result = run(CpuMemoryCheck(), tmp_path, path="/usr/bin:/bin", seconds=1, vm_bytes="bogus")
    assert result.status is Status.ERROR
    assert result.summary == ("stress-ng: no metrics, summary, failure or completion line in the output "
                              "(exit status 1: Invalid number bogus)")


def test_stress_missing_is_skip(tmp_path):
    result = run(CpuMemoryCheck(), tmp_path)
    assert result.status is Status.SKIP and result.summary == "stress-ng is not installed (not on PATH)"


def test_stress_hung_is_error(tmp_path):
    fake_tool(tmp_path, "stress-ng", "exec /bin/sleep 30")
    result = run(CpuMemoryCheck(), tmp_path, seconds=0, timeout_slack_seconds=0.5)
    assert result.status is Status.ERROR and result.summary == "stress-ng did not finish within 0.5s (killed)"


# --- fabric: a fake sysfs tree ----------------------------------------------------------

def rdma_device(root: Path, name: str, driver: str = "mlx5_core", state: str = "4: ACTIVE",
                rate: Optional[str] = "100 Gb/sec (4X EDR)", port: int = 1) -> None:
    dev = root / "class" / "infiniband" / name
    port_dir = dev / "ports" / str(port)
    port_dir.mkdir(parents=True)
    (port_dir / "state").write_text(state + "\n")
    if rate is not None:
        (port_dir / "rate").write_text(rate + "\n")
    driver_dir = root / "bus" / "pci" / "drivers" / driver
    driver_dir.mkdir(parents=True, exist_ok=True)
    (dev / "device").mkdir()
    (dev / "device" / "driver").symlink_to(driver_dir)


def fabric_verdict(root: Path, runs: Any, missing: Any = (), **overrides: Any):
    check = FabricCheck()
    observed = FabricObservation(tuple(discover(str(root))), tuple(runs), tuple(missing))
    return check.evaluate(observed, params(check, **overrides))


def ib(device: str, fixture: str = "ib_write_bw.txt") -> LoopbackRun:
    return LoopbackRun(device, "ib_write_bw", 0, parse_ib_write_bw(load(fixture)))


def efa(device: str, fixture: str = "fi_pingpong.txt", exit_status: int = 0) -> LoopbackRun:
    return efa_run(device, ToolOutput([], exit_status, load(fixture), "", 1.0))


def test_discover_reads_driver_state_and_rate(tmp_path):
    rdma_device(tmp_path, "mlx5_0", rate="400 Gb/sec (4X NDR)")
    rdma_device(tmp_path, "rdmap16s27", driver="efa", rate=None)
    ib_dev, efa_dev = discover(str(tmp_path))
    assert (ib_dev.name, ib_dev.driver, ib_dev.efa, ib_dev.tool) == ("mlx5_0", "mlx5_core", False, "ib_write_bw")
    assert (ib_dev.ports[0].state, ib_dev.ports[0].rate_gbits) == ("ACTIVE", 400.0)
    assert (efa_dev.efa, efa_dev.tool, efa_dev.ports[0].rate_gbits) == (True, "fi_pingpong", None)


@pytest.mark.parametrize("text, gbits", [("400 Gb/sec (4X NDR)", 400.0), ("2.5 Gb/sec (1X SDR)", 2.5),
                                         ("", None), ("fast", None)])
def test_parse_rate(text, gbits):
    assert parse_rate(text) == gbits


@pytest.mark.parametrize("rate, fixture", [("100 Gb/sec (4X EDR)", "ib_write_bw.txt"),
                                           ("200 Gb/sec (4X HDR)", "ib_write_bw-loopback-superbench.txt")])
def test_fabric_ib_at_link_speed_passes(tmp_path, rate, fixture):
    rdma_device(tmp_path, "mlx5_0", rate=rate)
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0", fixture)])
    assert verdict.status is Status.PASS and verdict.summary.startswith("1 RDMA device(s) active; mlx5_0 ")
    assert verdict.evidence["mlx5_0"]["fraction_of_link"] > 0.9


def test_fabric_ib_below_fraction_of_link_fails(tmp_path):
    rdma_device(tmp_path, "mlx5_0", rate="400 Gb/sec (4X NDR)")
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0")])
    assert verdict.status is Status.FAIL and verdict.summary == "mlx5_0: 92.5 Gb/s < 0.8 x 400 Gb/s port rate"
    assert verdict.evidence["mlx5_0"]["gbits"] == 92.46 and verdict.evidence["mlx5_0"]["fraction_of_link"] == 0.231


def test_fabric_ib_below_min_gbits_fails(tmp_path):
    rdma_device(tmp_path, "mlx5_0")
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0")], min_gbits=95.0)
    assert verdict.status is Status.FAIL and verdict.summary == "mlx5_0: ib_write_bw 92.5 Gb/s < 95 Gb/s"


def test_fabric_unknown_rate_is_noted_not_judged(tmp_path):
    rdma_device(tmp_path, "mlx5_0", rate=None)
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0")])
    assert verdict.status is Status.PASS
    assert verdict.evidence["notes"] == ["mlx5_0: port rate unknown, min_fraction_of_link not judged"]


def test_fabric_missing_device_fails_and_a_down_port_is_not_evidence(tmp_path):
    """A configured HCA gone is a fault; a port not ACTIVE (still INIT after boot, a leaf switch
    rebooting) is not evidence against the node: ERROR, the gate tries again (issue 10 review)."""
    rdma_device(tmp_path, "mlx5_0")
    rdma_device(tmp_path, "mlx5_1", state="1: DOWN")
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0")], missing=["mlx5_2"])
    assert verdict.status is Status.FAIL
    assert verdict.summary == "mlx5_2: named in fabric.devices but not present"
    assert verdict.evidence["mlx5_1"] == {"driver": "mlx5_core", "ports": {"1": {"state": "DOWN",
                                                                                 "rate": "100 Gb/sec (4X EDR)"}}}
    verdict = fabric_verdict(tmp_path, [ib("mlx5_0")])
    assert verdict.status is Status.ERROR and verdict.summary == "could not test: mlx5_1 port 1 is DOWN"


def test_fabric_efa_pass_and_floor(tmp_path):
    rdma_device(tmp_path, "rdmap16s27", driver="efa")
    assert fabric_verdict(tmp_path, [efa("rdmap16s27")]).status is Status.PASS  # no fraction of link for EFA
    verdict = fabric_verdict(tmp_path, [efa("rdmap16s27")], efa_min_gbits=20.0)
    assert verdict.status is Status.FAIL and verdict.summary == "rdmap16s27: fi_pingpong 17.5 Gb/s < 20 Gb/s"


def test_fabric_efa_failed_run_could_not_test_quoting_the_error(tmp_path):
    """A loopback that did not complete (here the out-of-band socket was refused) is what a
    provider or firewall setting does to every node alike: ERROR, not evidence (issue 10 review)."""
    rdma_device(tmp_path, "rdmap16s27", driver="efa")
    verdict = fabric_verdict(tmp_path, [efa("rdmap16s27", "fi_pingpong-efa-fail-connect.txt", exit_status=1)])
    assert verdict.status is Status.ERROR
    assert verdict.summary == ("could not test: rdmap16s27: fi_pingpong loopback failed (exit status 1): "
                               "[error] util/pingpong.c:373 : failed to connect: Connection refused")


def test_fabric_efa_error_line_with_exit_0_could_not_run():
    with pytest.raises(CouldNotRun, match=r"^fi_pingpong: \[error\] .* \(rdmap16s27, exit status 0\)$"):
        efa("rdmap16s27", "fi_pingpong-efa-fail-connect.txt", exit_status=0)


def test_fabric_ib_client_failure_or_garbage_could_not_run():
    with pytest.raises(CouldNotRun, match="^ib_write_bw on mlx5_0 exited 1: Couldn't connect to localhost:18515$"):
        ib_run("mlx5_0", ToolOutput([], 1, "", "\n Couldn't connect to localhost:18515\n", 1.0))
    with pytest.raises(CouldNotRun, match=r"^ib_write_bw: no bandwidth table in the output \(mlx5_0\)$"):
        ib_run("mlx5_0", ToolOutput([], 0, "Segmentation fault\n", "", 1.0))


# --- fabric: collect with a fake sysfs tree and replaying tools -------------------------

def fabric_run(tmp_path: Path, **overrides: Any) -> CheckResult:
    return run(FabricCheck(), tmp_path, sysfs_root=str(tmp_path / "sys"), server_start_seconds=0.05,
               **{"timeout_seconds": 10.0, **overrides})


def replaying_perftest(tmp_path: Path, name: str, client: str) -> Dict[str, Path]:
    """`name` that, as a server (no "localhost" argument), records its pid and waits to be
    killed; as a client, records its arguments and environment and runs `client`."""
    files = {k: tmp_path / f"{name}.{k}" for k in ("server_pid", "args", "env", "calls")}
    fake_tool(tmp_path, name, f"""
for a in "$@"; do
  if [ "$a" = localhost ]; then
    echo "$@" > {files['args']}; echo "shm=$FI_EFA_ENABLE_SHM_TRANSFER" > {files['env']}
    echo x >> {files['calls']}
    {client}
  fi
done
echo $$ > {files['server_pid']}
exec /bin/sleep 30""")
    return files


def assert_server_killed(files: Dict[str, Path]) -> None:
    pid = int(files["server_pid"].read_text())    # the server did start
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_fabric_no_devices_is_skip(tmp_path):
    result = fabric_run(tmp_path)
    assert result.status is Status.SKIP
    assert result.summary == f"no RDMA devices (nothing in {tmp_path / 'sys'}/class/infiniband)"


def test_fabric_tool_missing_is_skip(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0")
    result = fabric_run(tmp_path)
    assert result.status is Status.SKIP and result.summary == "ib_write_bw is not installed (not on PATH)"


def test_fabric_ib_loopback_replayed(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0")
    files = replaying_perftest(tmp_path, "ib_write_bw", f"/bin/cat {FIXTURES / 'ib_write_bw.txt'}; exit 0")
    result = fabric_run(tmp_path)
    assert result.status is Status.PASS, result.summary
    assert files["args"].read_text().split() == ["-d", "mlx5_0", "-i", "1", "-s", "8388608", "-F", "--report_gbits",
                                                 "localhost"]
    assert result.evidence["mlx5_0"]["gbits"] == 92.46
    assert_server_killed(files)


def test_fabric_client_retried_while_server_not_listening(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0")
    calls = tmp_path / "ib_write_bw.calls"
    files = replaying_perftest(
        tmp_path, "ib_write_bw",
        f"if [ $(/usr/bin/wc -l < {calls}) -lt 2 ]; then echo \"Couldn't connect to localhost:18515\" >&2; exit 1; fi\n"
        f"    /bin/cat {FIXTURES / 'ib_write_bw.txt'}; exit 0")
    result = fabric_run(tmp_path)
    assert result.status is Status.PASS, result.summary
    assert len(files["calls"].read_text().split()) == 2


def test_fabric_hung_client_is_error_and_server_killed(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0")
    files = replaying_perftest(tmp_path, "ib_write_bw", "exec /bin/sleep 30")
    result = fabric_run(tmp_path, timeout_seconds=1.0)
    assert result.status is Status.ERROR and result.summary.startswith("ib_write_bw did not finish within")
    assert files["calls"].exists()
    assert_server_killed(files)


def test_fabric_efa_loopback_replayed_without_shm(tmp_path):
    rdma_device(tmp_path / "sys", "rdmap16s27", driver="efa")
    files = replaying_perftest(tmp_path, "fi_pingpong", f"/bin/cat {FIXTURES / 'fi_pingpong.txt'}; exit 0")
    result = fabric_run(tmp_path)
    assert result.status is Status.PASS, result.summary
    assert files["args"].read_text().split() == ["-e", "rdm", "-p", "efa", "-d", "rdmap16s27-rdm", "localhost"]
    assert files["env"].read_text().strip() == "shm=0"
    assert_server_killed(files)


def test_fabric_efa_failing_run_replayed_could_not_test(tmp_path):
    rdma_device(tmp_path / "sys", "rdmap16s27", driver="efa")
    replaying_perftest(tmp_path, "fi_pingpong", f"/bin/cat {FIXTURES / 'fi_pingpong-efa-fail-connect.txt'} >&2; exit 1")
    result = fabric_run(tmp_path, client_attempts=1)
    assert result.status is Status.ERROR and "failed to connect: Connection refused" in result.summary


def test_fabric_port_down_is_not_tested(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0", state="1: DOWN")
    rdma_device(tmp_path / "sys", "mlx5_1")
    files = replaying_perftest(tmp_path, "ib_write_bw", f"/bin/cat {FIXTURES / 'ib_write_bw.txt'}; exit 0")
    result = fabric_run(tmp_path)
    assert result.status is Status.ERROR and result.summary == "could not test: mlx5_0 port 1 is DOWN"
    assert files["args"].read_text().split()[:2] == ["-d", "mlx5_1"]     # the active one was tested
    assert len(files["calls"].read_text().split()) == 1 and "tool" not in result.evidence["mlx5_0"]


def test_fabric_configured_devices_only_and_missing(tmp_path):
    rdma_device(tmp_path / "sys", "mlx5_0", state="1: DOWN")
    result = fabric_run(tmp_path, devices=["mlx5_4"])
    assert result.status is Status.FAIL and result.summary == "mlx5_4: named in fabric.devices but not present"
    assert result.evidence == {"missing": ["mlx5_4"]}      # mlx5_0, not configured, is left alone
