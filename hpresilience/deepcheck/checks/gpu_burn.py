"""GPU burn with a correctness check (issue 10): silent data corruption, throttled or degraded GPUs.

The workload is burn_worker.py, run as a subprocess under run_tool's timeout (a hung
CUDA call is killed with it: ERROR, never a hung check). It needs torch in the
interpreter that runs it (`python`, default: the one running hpresilience); without
torch, or without a CUDA GPU visible to torch, the check is SKIP with the reason.

Thresholds, and why:
- `max_error` 1e-4: a float32 product of 2048x2048 normal inputs is within ~1e-6 of the
  float64 reference (relative to its largest element; measured 3e-7..9e-7 for n = 64..2048
  on CPU, cuBLAS is of the same order); 1e-4 is 100x that, and still catches any corruption
  of the exponent or the top ~13 mantissa bits of the largest elements. TF32 (error ~1e-3)
  is turned off in the worker, so it cannot pass for corruption.
- `max_disagreement` 0.0: GPUs must agree bit for bit. cuBLAS documents that its routines
  give bit-identical results at every run on GPUs of the same architecture and SM count;
  the worker runs one stream per GPU, no atomics. Smaller corruption than `max_error` sees
  (low mantissa bits) shows only here. A node mixing GPU models, or MIG instances of
  different sizes, sets a tolerance instead (e.g. 1e-5).
- a product that changes between burn batches on one GPU (same reason: determinism) fails.
- `min_relative` 0.8: a GPU under 80% of the node's fastest is throttled (power brake,
  thermal, a slow clock) even when every GPU is of one model; `min_tflops` and
  `min_mem_bw_gbs` (0 = off) are absolute floors sites set per partition or feature.
- a device on which the workload raised (a CUDA error, out of memory: another process holds
  the GPU on a node that should be idle) fails; when every device raised, the workload itself
  could not run (ERROR).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import burn_worker
from ..check import Check, Context, CouldNotRun, Skip, per_level
from ..result import Status, Verdict
from ..tool import ToolOutput, run_tool

WORKER = "burn_worker"


@dataclass(frozen=True)
class DeviceBurn:
    """One device's results, as the worker reported them (burn_worker.DeviceResult)."""
    label: str                         # "GPU 3"
    name: str
    tflops: float
    mem_bw_gbs: float
    max_error: Optional[float]         # None: the result was not finite
    max_disagreement: Optional[float]  # None: not finite
    agree: bool
    unstable_batches: int
    batches: int
    error: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceBurn:
        return cls(label=str(data["label"]), name=str(data["name"]), tflops=float(data["tflops"]),
                   mem_bw_gbs=float(data["mem_bw_gbs"]), max_error=_optional_float(data["max_error"]),
                   max_disagreement=_optional_float(data["max_disagreement"]), agree=bool(data["agree"]),
                   unstable_batches=int(data["unstable_batches"]), batches=int(data["batches"]),
                   error=None if data.get("error") is None else str(data["error"]))


@dataclass(frozen=True)
class BurnObservation:
    dtype: str
    matrix_size: int
    seconds: float
    devices: Tuple[DeviceBurn, ...]


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def parse_worker_output(out: ToolOutput) -> BurnObservation:
    """The worker's JSON document; Skip when it says why it cannot apply; CouldNotRun naming
    the worker when it failed or printed something else."""
    stderr = out.stderr.strip().splitlines()
    last = f": {stderr[-1]}" if stderr else ""
    if out.returncode != 0:
        raise CouldNotRun(f"gpu_burn: {WORKER} exited with status {out.returncode}{last}")
    try:
        doc = json.loads(out.stdout)
    except ValueError as e:
        raise CouldNotRun(f"gpu_burn: {WORKER} printed no JSON document ({e}){last}") from None
    if not isinstance(doc, dict):
        raise CouldNotRun(f"gpu_burn: {WORKER} printed {type(doc).__name__}, not a JSON object")
    if doc.get("skip"):
        raise Skip(str(doc["skip"]))
    try:
        devices = tuple(DeviceBurn.from_dict(d) for d in doc["devices"])
        observation = BurnObservation(dtype=str(doc["dtype"]), matrix_size=int(doc["matrix_size"]),
                                      seconds=float(doc["seconds"]), devices=devices)
    except (KeyError, TypeError, ValueError) as e:
        raise CouldNotRun(f"gpu_burn: {WORKER}'s JSON is not as expected: {type(e).__name__}: {e}") from None
    if not devices:
        raise CouldNotRun(f"gpu_burn: {WORKER} reported no devices")
    return observation


class GpuBurnCheck(Check):
    name = "gpu_burn"
    params = {
        "device": "cuda",                 # "cpu": one CPU "device" (the tests; a node without GPUs)
        "seconds": {"quick": 10.0, "standard": 60.0, "full": 300.0},
        "timeout_seconds": {"quick": 180.0, "standard": 300.0, "full": 600.0},  # start-up of torch and CUDA too
        "matrix_size": 8192,              # burn product n x n
        "dtype": "bf16",                  # burn: bf16 | fp16 | fp32
        "verify_size": 2048,              # float32 verification product: 256 tiles, every SM of an H100/H200
        "mem_mb": 1024,                   # device-to-device copy buffer
        "max_error": 1e-4,                # vs the float64 reference, relative to its largest element
        "max_disagreement": 0.0,          # between devices, same scale; 0 = bit-identical
        "min_tflops": 0.0,                # 0 = off; per partition/feature
        "min_relative": 0.8,              # of the node's fastest device
        "min_mem_bw_gbs": 0.0,            # 0 = off (read + written bytes per second)
        "python": "",                     # interpreter with torch; "" = the one running hpresilience
    }

    def collect(self, ctx: Context) -> BurnObservation:
        p = ctx.params
        seconds = float(per_level(p["seconds"], ctx.level))
        argv = [p["python"] or sys.executable, burn_worker.__file__, "--device", str(p["device"]),
                "--seconds", f"{seconds:g}", "--matrix-size", str(p["matrix_size"]), "--dtype", str(p["dtype"]),
                "--verify-size", str(p["verify_size"]), "--mem-mb", str(p["mem_mb"]),
                "--mem-seconds", f"{seconds / 10:g}"]
        env = {"NVIDIA_TF32_OVERRIDE": "0", **ctx.env}
        out = run_tool(argv, float(per_level(p["timeout_seconds"], ctx.level)), env=env, tool=WORKER)
        return parse_worker_output(out)

    def evaluate(self, observed: BurnObservation, params: Mapping[str, Any]) -> Verdict:
        devices = observed.devices
        evidence: Dict[str, Any] = {"dtype": observed.dtype, "matrix_size": observed.matrix_size,
                                    "seconds": observed.seconds, "devices": {d.label: _evidence(d) for d in devices}}
        working = [d for d in devices if d.error is None]
        if not working:
            return Verdict(Status.ERROR, f"the burn could not run on any device: {devices[0].error}", evidence)
        fastest = max(working, key=lambda d: d.tflops)
        problems = [f"{d.label}: {d.error}" for d in devices if d.error is not None]
        for d in working:
            problems.extend(f"{d.label} {why}" for why in _device_problems(d, fastest, len(working), params))
        if problems:
            return Verdict(Status.FAIL, "; ".join(problems), evidence)
        slowest = min(working, key=lambda d: d.tflops)
        return Verdict(Status.PASS, f"{len(working)} device(s) agree with the reference and each other; slowest "
                                    f"{slowest.label}: {slowest.tflops:.1f} TFLOPS {observed.dtype}, "
                                    f"{min(d.mem_bw_gbs for d in working):.0f} GB/s lowest copy bandwidth", evidence)


def _device_problems(d: DeviceBurn, fastest: DeviceBurn, working: int, params: Mapping[str, Any]) -> List[str]:
    out: List[str] = []
    if d.max_error is None:
        out.append("computed NaN/Inf where the reference is finite")
    else:
        if d.max_error > params["max_error"]:
            out.append(f"result differs from the float64 reference by {d.max_error:.2e} (> {params['max_error']:g})")
        if d.max_disagreement is None or d.max_disagreement > params["max_disagreement"]:
            shown = "NaN/Inf" if d.max_disagreement is None else f"{d.max_disagreement:.2e}"
            out.append(f"disagrees with the other devices by {shown} (> {params['max_disagreement']:g})")
    if d.unstable_batches:
        out.append(f"product changed under load in {d.unstable_batches} of {d.batches} batches")
    if params["min_tflops"] and d.tflops < params["min_tflops"]:
        out.append(f"{d.tflops:.1f} TFLOPS < {params['min_tflops']:g}")
    if working > 1 and d.tflops < params["min_relative"] * fastest.tflops:
        out.append(f"{d.tflops:.1f} TFLOPS < {params['min_relative']:g} x {fastest.label}'s {fastest.tflops:.1f} "
                   "(throttled?)")
    if params["min_mem_bw_gbs"] and d.mem_bw_gbs < params["min_mem_bw_gbs"]:
        out.append(f"copy bandwidth {d.mem_bw_gbs:.0f} GB/s < {params['min_mem_bw_gbs']:g}")
    return out


def _evidence(d: DeviceBurn) -> Dict[str, Any]:
    if d.error is not None:
        return {"name": d.name, "error": d.error}
    return {"name": d.name, "tflops": round(d.tflops, 2), "mem_bw_gbs": round(d.mem_bw_gbs, 1),
            "max_error": d.max_error, "max_disagreement": d.max_disagreement, "agree": d.agree,
            "unstable_batches": d.unstable_batches, "batches": d.batches}
