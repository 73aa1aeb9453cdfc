"""The gpu_count and gpu_burn deep checks (issue 10).

evaluate is pure: every verdict branch from synthetic observations. collect runs the
real code: gpu_count through the real pynvml against the fake libnvidia-ml (in a
subprocess: the loader reads LD_LIBRARY_PATH at start-up), gpu_burn through the real
burn worker on CPU "devices" with the CPU build of torch."""
from __future__ import annotations

import importlib.util
import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from hpresilience.agent.monitors.nvml import GpuStatus, NvLinkStatus, NvmlSnapshot
from hpresilience.deepcheck import burn_worker
from hpresilience.deepcheck.check import Context, CouldNotRun, Skip, defaults
from hpresilience.deepcheck.checks.gpu_burn import BurnObservation, DeviceBurn, GpuBurnCheck, parse_worker_output
from hpresilience.deepcheck.checks.gpu_count import FROM_NODE, FROM_PARAMETER, GpuCountCheck, GpuCountObservation
from hpresilience.deepcheck.result import Level, Status, Verdict
from hpresilience.deepcheck.suite import run_one
from hpresilience.deepcheck.tool import ToolOutput, run_tool
from tests.fake_nvml import FakeGpuState, fake_nvml_env

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (pip install torch, CPU wheel)")

# ---- gpu_count: evaluate -------------------------------------------------------------------------


def gpu(index: int, links: int = 18, down: tuple = (), lost: bool = False) -> GpuStatus:
    if lost:
        return GpuStatus(index=index, pci_bus_id=f"0000:{0x53 + index:02x}:00.0", lost=True,
                         lost_error="NVMLError_GpuIsLost: GPU is lost")
    return GpuStatus(index=index, uuid=f"GPU-{index}", pci_bus_id=f"0000:{0x53 + index:02x}:00.0",
                     nvlinks=tuple(NvLinkStatus(link=i, active=i not in down, was_active=True) for i in range(links)))


def snapshot(*gpus: GpuStatus) -> NvmlSnapshot:
    return NvmlSnapshot(taken_at=0.0, gpu_count=len(gpus), gpus=gpus)


def count_verdict(observed: GpuCountObservation, **params: Any) -> Verdict:
    check = GpuCountCheck()
    return check.evaluate(observed, {**defaults(check), **params})


def test_gpu_count_passes_with_all_gpus_and_links() -> None:
    v = count_verdict(GpuCountObservation(snapshot(*(gpu(i) for i in range(8))), None, 8, FROM_NODE),
                      nvlinks_per_gpu=18)
    assert v.status is Status.PASS, v
    assert v.summary == "8 GPU(s), 18 active NVLinks each, 8 expected (agent config or Slurm Gres)"
    assert v.evidence["gpus"]["GPU 0 (0000:53:00.0)"] == {"uuid": "GPU-0", "nvlinks": 18, "nvlinks_active": 18}


def test_gpu_count_without_expectation_reports_and_passes() -> None:
    v = count_verdict(GpuCountObservation(snapshot(gpu(0), gpu(1)), None))
    assert v.status is Status.PASS
    assert v.summary == "2 GPU(s), none expected: not compared"


def test_no_driver_and_nothing_expected_is_skip() -> None:
    why = "libnvidia-ml.so.1 not found (no NVIDIA driver on this node)"
    v = count_verdict(GpuCountObservation(None, why))
    assert v.status is Status.SKIP
    assert v.summary == f"no NVIDIA driver or GPU: {why}"


def test_fewer_gpus_inside_a_step_allocated_none_is_not_evidence() -> None:
    """Review of issue 10: where ConstrainDevices is on, a job step without GPUs sees none."""
    seen_none = GpuCountObservation(None, "NVML reports 0 GPUs", 8, FROM_NODE, step_without_gpus=True)
    assert count_verdict(seen_none).status is Status.ERROR
    all_seen = GpuCountObservation(snapshot(*(gpu(i) for i in range(8))), None, 8, FROM_NODE, step_without_gpus=True)
    assert count_verdict(all_seen).status is Status.PASS      # the devices were visible after all


def test_no_driver_while_gpus_are_expected_fails() -> None:
    v = count_verdict(GpuCountObservation(None, "no NVIDIA GPUs (Driver Not Loaded)", 8, FROM_PARAMETER))
    assert v.status is Status.FAIL
    assert v.summary == "8 GPU(s) expected, NVML sees none: no NVIDIA GPUs (Driver Not Loaded)"


def test_zero_gpus_is_skip_or_fail_by_expectation() -> None:
    empty = NvmlSnapshot(taken_at=0.0, gpu_count=0)
    assert count_verdict(GpuCountObservation(empty, None)).status is Status.SKIP
    v = count_verdict(GpuCountObservation(empty, None, 4, FROM_NODE))
    assert (v.status, v.summary) == (Status.FAIL, "4 GPU(s) expected, NVML sees none: NVML reports 0 GPUs")


def test_fewer_gpus_than_expected_fails_naming_the_counts() -> None:
    v = count_verdict(GpuCountObservation(snapshot(*(gpu(i) for i in range(7))), None, 8, FROM_NODE))
    assert v.status is Status.FAIL
    assert v.summary == "7 GPU(s) visible, 8 expected (agent config or Slurm Gres)"


def test_more_gpus_than_expected_passes() -> None:
    assert count_verdict(GpuCountObservation(snapshot(gpu(0), gpu(1)), None, 1, FROM_NODE)).status is Status.PASS


def test_gpu_with_links_down_fails_naming_gpu_and_links() -> None:
    gpus = [gpu(i) for i in range(8)]
    gpus[6] = gpu(6, down=(4, 11))
    v = count_verdict(GpuCountObservation(snapshot(*gpus), None, 8, FROM_NODE), nvlinks_per_gpu=18)
    assert v.status is Status.FAIL
    assert v.summary == "GPU 6 (0000:59:00.0) 16 of 18 NVLinks active (down: link 4,11)"
    assert v.evidence["gpus"]["GPU 6 (0000:59:00.0)"]["nvlinks_active"] == 16


def test_gpu_with_too_few_links_at_all_fails() -> None:
    """A PCIe GPU (no links) in a partition that expects NVLink."""
    v = count_verdict(GpuCountObservation(snapshot(gpu(0), gpu(1, links=0)), None), nvlinks_per_gpu=18)
    assert (v.status, v.summary) == (Status.FAIL, "GPU 1 (0000:54:00.0) 0 of 18 NVLinks active")


def test_links_are_not_judged_unless_configured() -> None:
    v = count_verdict(GpuCountObservation(snapshot(gpu(0, down=(0, 1, 2))), None, 1, FROM_NODE))
    assert v.status is Status.PASS


def test_lost_gpu_fails_naming_it() -> None:
    v = count_verdict(GpuCountObservation(snapshot(gpu(0), gpu(1, lost=True)), None, 2, FROM_NODE),
                      nvlinks_per_gpu=18)
    assert v.status is Status.FAIL
    assert v.summary == "GPU 1 (0000:54:00.0) lost (NVMLError_GpuIsLost: GPU is lost)"


# ---- gpu_count: collect through the fake NVML ----------------------------------------------------

RUN_GPU_COUNT = """
import json, sys
from hpresilience import log
from hpresilience.deepcheck.check import Context, defaults
from hpresilience.deepcheck.checks.gpu_count import GpuCountCheck
from hpresilience.deepcheck.result import Level
from hpresilience.deepcheck.suite import run_one
log.configure()  # logs on stderr: stdout carries the result only
args = json.loads(sys.argv[1])
check = GpuCountCheck()
ctx = Context(node="n1", level=Level.QUICK, params={**defaults(check), **args["params"]}, gpu_count=args["gpu_count"])
print(json.dumps(run_one(check, ctx).to_dict()))
"""


def run_gpu_count(env: Dict[str, str], gpu_count: Optional[int] = None, **params: Any) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", RUN_GPU_COUNT, json.dumps({"params": params, "gpu_count": gpu_count})],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_collect_healthy_node_through_nvml(lib_dir: Path, state: FakeGpuState) -> None:
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path), gpu_count=8, nvlinks_per_gpu=18)
    assert (r["status"], r["summary"]) == ("pass", "8 GPU(s), 18 active NVLinks each, 8 expected "
                                                   "(agent config or Slurm Gres)"), r
    assert len(r["evidence"]["gpus"]) == 8


def test_collect_missing_gpu_fails(lib_dir: Path, state: FakeGpuState) -> None:
    state.gpus(7)
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path), expected_gpus=8)
    assert (r["status"], r["summary"]) == ("fail", "7 GPU(s) visible, 8 expected (parameter expected_gpus)"), r


def test_collect_link_down_fails_naming_the_gpu(lib_dir: Path, state: FakeGpuState) -> None:
    state.set("gpu.6.nvlink.3.state", 0)
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path), gpu_count=8, nvlinks_per_gpu=18)
    assert (r["status"], r["summary"]) == ("fail", "GPU 6 (0000:b9:00.0) 17 of 18 NVLinks active (down: link 3)"), r


def test_collect_lost_gpu_fails(lib_dir: Path, state: FakeGpuState) -> None:
    state.lost(2)
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path), gpu_count=8)
    assert r["status"] == "fail", r
    assert r["summary"].startswith("GPU 2 lost (NVMLError_GpuIsLost"), r


def test_collect_driver_not_loaded_skips_or_fails_by_expectation(lib_dir: Path, state: FakeGpuState) -> None:
    state.set("error.nvmlInitWithFlags", 9)  # NVML_ERROR_DRIVER_NOT_LOADED
    env = fake_nvml_env(lib_dir, state.path)
    skipped = run_gpu_count(env)
    assert (skipped["status"], skipped["summary"]) == ("skip", "no NVIDIA driver or GPU: no NVIDIA GPUs "
                                                               "(Driver Not Loaded)"), skipped
    failed = run_gpu_count(env, gpu_count=8)
    assert (failed["status"], failed["summary"]) == ("fail", "8 GPU(s) expected, NVML sees none: no NVIDIA GPUs "
                                                             "(Driver Not Loaded)"), failed


def test_collect_node_without_gpus_skips(lib_dir: Path, state: FakeGpuState) -> None:
    state.gpus(0)
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path))
    assert (r["status"], r["summary"]) == ("skip", "no NVIDIA driver or GPU: no NVIDIA GPUs "
                                                   "(NVML reports 0 devices)"), r


def test_collect_hung_driver_is_error_not_a_verdict(lib_dir: Path, state: FakeGpuState) -> None:
    state.hang(30)
    r = run_gpu_count(fake_nvml_env(lib_dir, state.path), gpu_count=8, call_timeout_seconds=0.5)
    assert r["status"] == "error", r
    assert r["summary"].startswith("gpu_count: NVML did not answer: NVML call did not return within 0.5s"), r


# ---- gpu_burn: evaluate --------------------------------------------------------------------------


def device(index: int, **changes: Any) -> DeviceBurn:
    healthy = DeviceBurn(label=f"GPU {index}", name="NVIDIA H200", tflops=700.0, mem_bw_gbs=4000.0, max_error=8e-7,
                         max_disagreement=0.0, agree=True, unstable_batches=0, batches=40)
    return replace(healthy, **changes)


def burn_verdict(*devices: DeviceBurn, **params: Any) -> Verdict:
    check = GpuBurnCheck()
    return check.evaluate(BurnObservation(dtype="bf16", matrix_size=8192, seconds=60.0, devices=devices),
                          {**defaults(check), **params})


def test_burn_passes_on_healthy_gpus() -> None:
    v = burn_verdict(device(0), device(1, tflops=690.0, mem_bw_gbs=3950.0))
    assert v.status is Status.PASS, v
    assert v.summary == ("2 device(s) agree with the reference and each other; slowest GPU 1: 690.0 TFLOPS bf16, "
                         "3950 GB/s lowest copy bandwidth")
    assert v.evidence["devices"]["GPU 1"] == {"name": "NVIDIA H200", "tflops": 690.0, "mem_bw_gbs": 3950.0,
                                              "max_error": 8e-7, "max_disagreement": 0.0, "agree": True,
                                              "unstable_batches": 0, "batches": 40}


def test_burn_fails_on_a_result_far_from_the_reference() -> None:
    v = burn_verdict(device(0), device(1, max_error=0.25, max_disagreement=0.25, agree=False))
    assert v.status is Status.FAIL
    assert v.summary == ("GPU 1 result differs from the float64 reference by 2.50e-01 (> 0.0001); "
                         "GPU 1 disagrees with the other devices by 2.50e-01 (> 0)")


def test_burn_fails_on_nan() -> None:
    v = burn_verdict(device(0, max_error=None, max_disagreement=None, agree=False))
    assert (v.status, v.summary) == (Status.FAIL, "GPU 0 computed NaN/Inf where the reference is finite")


def test_burn_fails_on_a_gpu_that_disagrees_within_the_reference_tolerance() -> None:
    """Low-bit corruption: close enough to the reference, but not what identical GPUs compute."""
    gpus = [device(i) for i in range(8)]
    gpus[3] = device(3, max_error=2e-6, max_disagreement=1.2e-6, agree=False)
    v = burn_verdict(*gpus)
    assert (v.status, v.summary) == (Status.FAIL, "GPU 3 disagrees with the other devices by 1.20e-06 (> 0)")
    assert v.evidence["devices"]["GPU 3"]["agree"] is False


def test_burn_disagreement_within_a_configured_tolerance_passes() -> None:
    v = burn_verdict(device(0), device(1, max_disagreement=1.2e-6, agree=False), max_disagreement=1e-5)
    assert v.status is Status.PASS


def test_burn_fails_on_a_product_that_changes_under_load() -> None:
    v = burn_verdict(device(0), device(1, unstable_batches=2))
    assert (v.status, v.summary) == (Status.FAIL, "GPU 1 product changed under load in 2 of 40 batches")


def test_burn_fails_below_min_tflops_only_when_set() -> None:
    assert burn_verdict(device(0, tflops=300.0)).status is Status.PASS
    v = burn_verdict(device(0, tflops=300.0), min_tflops=600.0)
    assert (v.status, v.summary) == (Status.FAIL, "GPU 0 300.0 TFLOPS < 600")


def test_burn_fails_a_throttled_gpu_relative_to_the_fastest() -> None:
    v = burn_verdict(device(0), device(1, tflops=520.0), device(2, tflops=690.0))
    assert (v.status, v.summary) == (Status.FAIL, "GPU 1 520.0 TFLOPS < 0.8 x GPU 0's 700.0 (throttled?)")
    assert burn_verdict(device(0), device(1, tflops=520.0), min_relative=0.7).status is Status.PASS


def test_burn_fails_below_min_memory_bandwidth_only_when_set() -> None:
    assert burn_verdict(device(0, mem_bw_gbs=900.0)).status is Status.PASS
    v = burn_verdict(device(0), device(1, mem_bw_gbs=900.0), min_mem_bw_gbs=3000.0)
    assert (v.status, v.summary) == (Status.FAIL, "GPU 1 copy bandwidth 900 GB/s < 3000")


def test_burn_fails_a_gpu_that_raised_while_others_ran() -> None:
    error = "AcceleratorError: CUDA error: uncorrectable ECC error encountered"
    v = burn_verdict(device(0), device(1, error=error))
    assert (v.status, v.summary) == (Status.FAIL, f"GPU 1: {error}")
    assert v.evidence["devices"]["GPU 1"] == {"name": "NVIDIA H200", "error": error}


def test_burn_that_raised_on_every_device_is_error() -> None:
    error = "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"
    v = burn_verdict(device(0, error=error), device(1, error=error))
    assert (v.status, v.summary) == (Status.ERROR, f"the burn could not run on any device: {error}")


# ---- gpu_burn: the worker's output ---------------------------------------------------------------


def worker_output(stdout: str, returncode: int = 0, stderr: str = "") -> ToolOutput:
    return ToolOutput(argv=["python", "burn_worker.py"], returncode=returncode, stdout=stdout, stderr=stderr,
                      seconds=1.0)


def test_worker_skip_is_skip() -> None:
    with pytest.raises(Skip, match="^no CUDA GPU visible to torch$"):
        parse_worker_output(worker_output('{"worker": "burn_worker", "skip": "no CUDA GPU visible to torch"}'))


@pytest.mark.parametrize("stdout, returncode, stderr, message", [
    ("", 1, "Traceback...\nRuntimeError: CUDA driver initialization failed",
     "gpu_burn: burn_worker exited with status 1: RuntimeError: CUDA driver initialization failed"),
    ('{"devices": [', 0, "", "gpu_burn: burn_worker printed no JSON document (Expecting value"),
    ("[1, 2]", 0, "", "gpu_burn: burn_worker printed list, not a JSON object"),
    ('{"dtype": "bf16", "matrix_size": 8, "seconds": 1}', 0, "",
     "gpu_burn: burn_worker's JSON is not as expected: KeyError: 'devices'"),
    ('{"dtype": "bf16", "matrix_size": 8, "seconds": 1, "devices": [{"label": "GPU 0"}]}', 0, "",
     "gpu_burn: burn_worker's JSON is not as expected: KeyError: 'name'"),
    ('{"dtype": "bf16", "matrix_size": 8, "seconds": 1, "devices": []}', 0, "",
     "gpu_burn: burn_worker reported no devices"),
])
def test_worker_failure_or_malformed_output_is_could_not_run(stdout: str, returncode: int, stderr: str,
                                                              message: str) -> None:
    with pytest.raises(CouldNotRun) as e:
        parse_worker_output(worker_output(stdout, returncode, stderr))
    assert str(e.value).startswith(message)


# ---- gpu_burn: the real worker on CPU devices ----------------------------------------------------

# Small enough for a couple of seconds on a CPU, most of it torch's import.
CPU_PARAMS = {"device": "cpu", "seconds": 0.2, "matrix_size": 96, "verify_size": 64, "mem_mb": 4}


def burn_context(**params: Any) -> Context:
    return Context(node="n1", level=Level.QUICK, params={**defaults(GpuBurnCheck()), **CPU_PARAMS, **params})


def run_worker(*args: str) -> BurnObservation:
    """The worker as the check runs it, with options the check does not pass (several CPU devices, corruption)."""
    argv = [sys.executable, burn_worker.__file__, "--device", "cpu", "--seconds", "0.2", "--matrix-size", "96",
            "--verify-size", "64", "--mem-mb", "4", "--mem-seconds", "0.02", *args]
    return parse_worker_output(run_tool(argv, timeout=120, tool="burn_worker"))


@needs_torch
def test_burn_collect_on_cpu_passes() -> None:
    result = run_one(GpuBurnCheck(), burn_context())
    assert result.status is Status.PASS, result
    cpu = result.evidence["devices"]["cpu 0"]
    assert cpu["agree"] is True and cpu["unstable_batches"] == 0 and cpu["batches"] >= 1
    assert cpu["max_error"] < 1e-4 and cpu["tflops"] > 0 and cpu["mem_bw_gbs"] > 0


@needs_torch
def test_burn_catches_corruption_far_from_the_reference() -> None:
    observed = run_worker("--inject-corruption", "0:0.5")
    v = GpuBurnCheck().evaluate(observed, defaults(GpuBurnCheck()))
    assert v.status is Status.FAIL
    assert v.summary.startswith("cpu 0 result differs from the float64 reference by 5.0"), v.summary


@needs_torch
def test_burn_catches_one_device_disagreeing_below_the_reference_tolerance() -> None:
    """Three CPU devices, one with a result off by 1e-6 of the largest element: the reference tolerance (1e-4)
    lets it through; only the comparison between devices names it."""
    observed = run_worker("--cpu-devices", "3", "--inject-corruption", "1:1e-6")
    assert [d.agree for d in observed.devices] == [True, False, True]
    # min_relative off: three "devices" share this machine's few cores, their speeds say nothing.
    v = GpuBurnCheck().evaluate(observed, {**defaults(GpuBurnCheck()), "min_relative": 0.0})
    assert v.status is Status.FAIL
    assert v.summary.startswith("cpu 1 disagrees with the other devices by "), v.summary
    assert observed.devices[1].max_disagreement == pytest.approx(1e-6, rel=0.05)  # rounded to float32
    assert "cpu 0" not in v.summary and "cpu 2" not in v.summary


@needs_torch
def test_burn_on_cuda_skips_without_a_gpu() -> None:
    """On a GPU machine the same call is a small real burn on every GPU."""
    # min_relative off: products this small are bound by launch overhead, not by the GPU.
    result = run_one(GpuBurnCheck(), burn_context(device="cuda", min_relative=0.0))
    if result.status is Status.SKIP:
        assert result.summary.startswith("no CUDA GPU visible to torch"), result
    else:
        assert result.status is Status.PASS, result
        assert set(result.evidence["devices"]) >= {"GPU 0"}


def executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_burn_without_torch_is_skip(tmp_path: Path) -> None:
    # The same interpreter without site-packages: the worker's stdlib imports work, torch's does not.
    python = executable(tmp_path / "python-without-torch", f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    result = run_one(GpuBurnCheck(), burn_context(python=python))
    assert result.status is Status.SKIP, result
    assert result.summary == f"torch is not installed for {sys.executable}"


def test_burn_worker_printing_garbage_is_error(tmp_path: Path) -> None:
    python = executable(tmp_path / "python", "#!/bin/sh\necho 'Segmentation fault (core dumped)?'\n")
    result = run_one(GpuBurnCheck(), burn_context(python=python))
    assert result.status is Status.ERROR, result
    assert result.summary.startswith("gpu_burn: burn_worker printed no JSON document"), result


def test_burn_worker_past_its_timeout_is_error(tmp_path: Path) -> None:
    python = executable(tmp_path / "python", "#!/bin/sh\nexec sleep 60\n")
    result = run_one(GpuBurnCheck(), burn_context(python=python, timeout_seconds=0.2))
    assert (result.status, result.summary) == (Status.ERROR, "burn_worker did not finish within 0.2s (killed)")


def test_burn_params_are_what_the_worker_accepts() -> None:
    """The check's dtype default is one the worker knows, and the worker's options parse."""
    assert GpuBurnCheck.params["dtype"] in burn_worker.DTYPES
    opts = burn_worker.parse_args(["--device", "cpu", "--inject-corruption", "2:1e-6"])
    assert (opts.device, opts.inject_corruption) == ("cpu", (2, 1e-6))
