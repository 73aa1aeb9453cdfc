"""GPU and NVLink count: are all the GPUs and their links there (issue 10)?

One reading through the agent's NVML monitor (agent/monitors/nvml.py), so the
NVML code, its call timeouts and its hung-driver handling exist once: a hung
driver is ERROR (MonitorError -> CouldNotRun), never a verdict.

Expected GPUs: the context's count (the agent's `nvml.expected_gpus`, else
Slurm's Gres), else the `expected_gpus` parameter; 0 means not known, and the
count is then reported, not judged.

MIG: nvmlDeviceGetCount counts physical GPUs whether or not they are split into
MIG instances, and Node.gpu_count gives no count for a MIG Gres (it counts
instances; issue 9, defect 6), so the comparison is always in physical GPUs.
MIG mode has no GPU-to-GPU NVLink traffic: partitions of MIG nodes leave
`nvlinks_per_gpu` at 0.

Verdicts:
- NVML not usable (no library, driver not loaded) or no GPU, with none expected:
  SKIP (not a GPU node); with GPUs expected: FAIL (a GPU node without a working
  driver cannot run GPU jobs).
- fewer GPUs than expected: FAIL naming the counts; a GPU NVML calls lost: FAIL naming it.
- `nvlinks_per_gpu` > 0 and a GPU with fewer active links: FAIL naming the GPU and the
  links that are down (H100/H200 SXM: 18).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ...agent.monitor import MonitorError
from ...agent.monitors.nvml import GpuStatus, NvmlConfig, NvmlMonitor, NvmlSnapshot
from ..check import Check, Context, CouldNotRun, in_job_script
from ..result import Status, Verdict

# Where the expected count came from, as the summary says it.
FROM_NODE = "agent config or Slurm Gres"
FROM_PARAMETER = "parameter expected_gpus"


@dataclass(frozen=True)
class GpuCountObservation:
    snapshot: Optional[NvmlSnapshot]       # None: NVML gave no reading (see nvml_error)
    nvml_error: Optional[str]              # why NVML is not usable or reports no GPU; None when it read GPUs
    expected_gpus: int = 0                 # 0: not known
    expected_from: str = ""                # FROM_NODE, FROM_PARAMETER, or "" when not known
    step_without_gpus: bool = False        # run in a Slurm job step that was allocated no GPU


# Slurm sets one of these in a step that was allocated GPUs (gres/gpu; CUDA_VISIBLE_DEVICES also
# when a site's tooling sets it). Without them, a device cgroup (ConstrainDevices) hides the GPUs.
_GPU_ALLOCATION_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")


def in_step_without_gpus(env: Mapping[str, str]) -> bool:
    """A Slurm job step that was not allocated GPUs: fewer GPUs seen there say nothing of the node
    (issue 10 review: the gate's one-task step failed healthy nodes where ConstrainDevices is on).

    A prolog or epilog runs in slurmd's context, outside the job's cgroup: it sees every device.

    >>> in_step_without_gpus({"SLURM_JOB_ID": "7"}), in_step_without_gpus({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0"})
    (True, False)
    >>> in_step_without_gpus({"SLURM_JOB_ID": "7", "SLURM_SCRIPT_CONTEXT": "prolog_slurmd"})
    False
    """
    if in_job_script(env):
        return False
    return "SLURM_JOB_ID" in env and not any(env.get(v) for v in _GPU_ALLOCATION_VARS)


def read_gpus(call_timeout_seconds: float) -> Tuple[Optional[NvmlSnapshot], Optional[str]]:
    """One NVML reading: (snapshot, why NVML is not usable or sees no GPU)."""
    # No startup grace: the check runs on a node that finished booting; the monitor
    # then reports 0 GPUs at once (disabled, with why) instead of waiting for a driver.
    monitor = NvmlMonitor(NvmlConfig(startup_grace_seconds=0.0, call_timeout_seconds=call_timeout_seconds))
    try:
        monitor.check()
    except MonitorError as e:
        raise CouldNotRun(f"gpu_count: NVML did not answer: {e}") from e
    finally:
        monitor.close()
    snapshot = monitor.last_snapshot
    if snapshot is None:  # the monitor disabled itself: no library, driver not loaded, or no GPU
        return None, monitor.disabled_reason or "NVML gave no reading"
    return snapshot, snapshot.init_error


class GpuCountCheck(Check):
    name = "gpu_count"
    params = {
        "expected_gpus": 0,              # used when neither the agent config nor Slurm says; 0 = not known
        "nvlinks_per_gpu": 0,            # active NVLinks each GPU must have; 0 = not checked (H100/H200 SXM: 18)
        "call_timeout_seconds": 10.0,    # one NVML call longer than this = hung driver: ERROR
    }

    def collect(self, ctx: Context) -> GpuCountObservation:
        snapshot, error = read_gpus(float(ctx.params["call_timeout_seconds"]))
        confined = in_step_without_gpus({**os.environ, **ctx.env})
        if ctx.gpu_count:
            return GpuCountObservation(snapshot, error, ctx.gpu_count, FROM_NODE, confined)
        if ctx.params["expected_gpus"]:
            return GpuCountObservation(snapshot, error, int(ctx.params["expected_gpus"]), FROM_PARAMETER, confined)
        return GpuCountObservation(snapshot, error, step_without_gpus=confined)

    def evaluate(self, observed: GpuCountObservation, params: Mapping[str, Any]) -> Verdict:
        expected = observed.expected_gpus
        snapshot = observed.snapshot
        count = snapshot.gpu_count if snapshot is not None else 0
        evidence: Dict[str, Any] = {"gpu_count": count, "expected_gpus": expected or None,
                                    "expected_from": observed.expected_from or None}
        if observed.step_without_gpus and count < expected:
            return Verdict(Status.ERROR, f"{count} of {expected} GPU(s) visible, but this runs in a Slurm step "
                                         "allocated no GPU: run it with the node's GRES (or outside a job)", evidence)
        if observed.nvml_error is not None or count == 0:
            why = observed.nvml_error or "NVML reports 0 GPUs"
            evidence["nvml_error"] = why
            if not expected:
                return Verdict(Status.SKIP, f"no NVIDIA driver or GPU: {why}", evidence)
            return Verdict(Status.FAIL, f"{expected} GPU(s) expected, NVML sees none: {why}", evidence)
        links_wanted = int(params["nvlinks_per_gpu"])
        evidence["gpus"] = {g.entity: _gpu_evidence(g) for g in snapshot.gpus}
        problems: List[str] = []
        if count < expected:
            problems.append(f"{count} GPU(s) visible, {expected} expected ({observed.expected_from})")
        for gpu in snapshot.gpus:
            problem = _gpu_problem(gpu, links_wanted)
            if problem:
                problems.append(problem)
        if problems:
            return Verdict(Status.FAIL, "; ".join(problems), evidence)
        links = f", {links_wanted} active NVLinks each" if links_wanted else ""
        against = f", {expected} expected ({observed.expected_from})" if expected else ", none expected: not compared"
        return Verdict(Status.PASS, f"{count} GPU(s){links}{against}", evidence)


def _active_links(gpu: GpuStatus) -> List[int]:
    return [link.link for link in gpu.nvlinks if link.active]


def _gpu_evidence(gpu: GpuStatus) -> Dict[str, Any]:
    if gpu.lost:
        return {"lost": True, "error": gpu.lost_error}
    return {"uuid": gpu.uuid, "nvlinks": len(gpu.nvlinks), "nvlinks_active": len(_active_links(gpu))}


def _gpu_problem(gpu: GpuStatus, links_wanted: int) -> Optional[str]:
    if gpu.lost:
        return f"{gpu.entity} lost ({gpu.lost_error})"
    active = _active_links(gpu)
    if links_wanted and len(active) < links_wanted:
        down = [link.link for link in gpu.nvlinks if not link.active]
        which = f" (down: link {','.join(map(str, down))})" if down else ""
        return f"{gpu.entity} {len(active)} of {links_wanted} NVLinks active{which}"
    return None
