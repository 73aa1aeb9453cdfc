"""CPU and memory: stress-ng with --verify --metrics for a bounded time (issue 10).

    stress-ng --cpu N --vm M --vm-bytes X --verify --metrics --timeout Ts --temp-path DIR

Verdicts, each taught by a capture in tests/fixtures/deep-checks/ (README.md there):

- FAIL on any verification failure: `fail:` lines ("vm: detected 5 bit errors while
  stressing memory"), a non-zero `failed:` count, an `error:` line saying a stressor
  "terminated with an error ... (stressor failed)", or exit status 2 ("one or more
  stressors failed", stress-ng(1)); all four show in stress-ng-verify-fail-memory.txt.
  Other `error:` lines are the harness's ("cache allocate: failed to mmap", exit 1), not
  the node's verdict.
- FAIL when a stressor's rate falls below `min_cpu_bogo_ops_per_s` / `min_vm_bogo_ops_per_s`
  (0 = not judged). The rate is the "bogo ops/s (real time)" column: all instances together
  per wall-clock second, so a node slowed by a cgroup cpu.max or thermal throttling shows;
  the usr+sys column would hide a cgroup throttle. It depends on the worker counts and the
  CPU model, so sites set it per partition (stress-ng-verify-metrics.txt: 95.85 cpu,
  2033.93 vm with one worker each on a 2-vCPU VM).
- Skipped stressors: an instance that could not get its resources is skipped
  (`skipped: 2: vm (2)` with exit status 3 in stress-ng-verify-vm-skipped.txt), and 0.15.06
  prints no skip at all but a metrics row of 0 bogo ops (seen in this sandbox with the vm
  stressor under `ulimit -v`; the unit tests reproduce it with a real run). A skip is not
  evidence of a bad node: PASS with the skipped/idle stressors in the evidence, as long as
  some stressor did work; when none did, ERROR (the check could not run).
- Exit status 0, 3 (out of resources) and 4 (not implemented) are read through the output
  as above; 1 (harness error), 5 (killed by a signal), 6 (unexpected exit) and 7 (metrics
  untrustworthy) with no verification failure are ERROR: no verdict either way.
- Output the parser cannot read is ERROR naming stress-ng, its exit status and first line.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..check import Check, Context, CouldNotRun, per_level
from ..parsers import ParseError
from ..parsers.stress_ng import StressMetric, StressReport, parse_stress_ng
from ..result import Status, Verdict
from ..tool import run_tool

# stress-ng(1), EXIT STATUS (0.15.06).
EXIT_MEANINGS = {1: "harness error (bad option or out of memory)", 2: "a stressor failed",
                 3: "out of resources", 4: "stressor not implemented here", 5: "stressor killed by a signal",
                 6: "stressor exited unexpectedly", 7: "metrics untrustworthy"}
_EXIT_READ_THROUGH_OUTPUT = frozenset({0, 3, 4})
_EXIT_STRESSOR_FAILED = 2
_STRESSOR_FAILED = "(stressor failed)"
_MAX_LINES = 10                                  # of fail/error lines kept in the evidence
THRESHOLDS = (("cpu", "min_cpu_bogo_ops_per_s"), ("vm", "min_vm_bogo_ops_per_s"))


@dataclass(frozen=True)
class StressObservation:
    report: StressReport
    exit_status: int
    seconds: int            # the requested --timeout


class CpuMemoryCheck(Check):
    name = "cpu_memory"
    params = {
        "seconds": {"quick": 10, "standard": 60, "full": 300},   # stress-ng --timeout
        "cpu_workers": 0,                    # --cpu; 0 = one per online CPU (stress-ng's meaning)
        "vm_workers": 1,                     # --vm; 0 = one per online CPU
        "vm_bytes": "10%",                   # --vm-bytes, per vm worker: "10%" of memory, or "512M"
        "min_cpu_bogo_ops_per_s": 0.0,       # cpu stressor, real-time rate of all instances; 0 = off
        "min_vm_bogo_ops_per_s": 0.0,        # vm stressor, likewise; 0 = off
        "timeout_slack_seconds": 60.0,       # beyond `seconds` before stress-ng counts as hung
    }

    def collect(self, ctx: Context) -> StressObservation:
        seconds = int(per_level(ctx.params["seconds"], ctx.level))
        with tempfile.TemporaryDirectory(prefix="deepcheck-stress-ng-", dir=_temp_parent(ctx.state_dir)) as tmp:
            argv = ["stress-ng", "--cpu", str(ctx.params["cpu_workers"]), "--vm", str(ctx.params["vm_workers"]),
                    "--vm-bytes", str(ctx.params["vm_bytes"]), "--verify", "--metrics",
                    "--timeout", f"{seconds}s", "--temp-path", tmp]
            out = run_tool(argv, seconds + float(ctx.params["timeout_slack_seconds"]), ctx.env, "stress-ng")
        # 0.15.06 writes everything to stderr; the failure lines of issue #546's build went
        # to stdout (stress-ng-verify-fail-memory.txt): both are read.
        try:
            report = parse_stress_ng(f"{out.stdout}\n{out.stderr}")
        except ParseError as e:
            raise CouldNotRun(f"{e} (exit status {out.returncode}: {out.first_line()})") from e
        return StressObservation(report, out.returncode, seconds)

    def evaluate(self, observed: StressObservation, params: Mapping[str, Any]) -> Verdict:
        report = observed.report
        idle = idle_stressors(report)
        evidence: Dict[str, Any] = {
            "exit_status": observed.exit_status, "seconds": observed.seconds,
            "stressors": {m.stressor: {"bogo_ops": m.bogo_ops, "real_time_s": m.real_time,
                                       "bogo_ops_per_s": m.bogo_ops_per_s_real} for m in report.metrics},
            "passed": dict(report.passed), "failed": dict(report.failed), "skipped": idle,
            "fail_lines": _first_distinct(report.fail_lines), "error_lines": _first_distinct(report.error_lines),
        }
        failures = verification_failures(observed)
        if failures:
            return Verdict(Status.FAIL, "stress-ng --verify: " + "; ".join(failures), evidence)
        if not worked_stressors(report):
            return Verdict(Status.ERROR, f"stress-ng: no stressor did any work ({_skip_note(idle)})", evidence)
        if observed.exit_status not in _EXIT_READ_THROUGH_OUTPUT:
            meaning = EXIT_MEANINGS.get(observed.exit_status, "unknown exit status")
            return Verdict(Status.ERROR, f"stress-ng exited {observed.exit_status} ({meaning})", evidence)
        slow, not_judged = _rates(report, params)
        if not_judged:
            evidence["rates_not_judged"] = not_judged
        if slow:
            return Verdict(Status.FAIL, "stress-ng: " + "; ".join(slow), evidence)
        rates = ", ".join(f"{m.stressor} {m.bogo_ops_per_s_real:.0f} bogo ops/s" for m in report.metrics)
        summary = f"stress-ng {observed.seconds}s verified: {rates or 'no metrics'}"
        return Verdict(Status.PASS, summary + (f"; {_skip_note(idle)}" if idle else ""), evidence)


def verification_failures(observed: StressObservation) -> List[str]:
    """What says a stressor found wrong results or bad memory."""
    report = observed.report
    failures = list(dict.fromkeys(report.fail_lines))
    failures += [f"failed: {name} ({n})" for name, n in report.failed.items() if n]
    failures += [line for line in dict.fromkeys(report.error_lines) if _STRESSOR_FAILED in line]
    if observed.exit_status == _EXIT_STRESSOR_FAILED and not failures:
        failures.append(f"exit status 2 ({EXIT_MEANINGS[2]})")
    return failures


def worked_stressors(report: StressReport) -> List[str]:
    """Stressors with instances that passed or a metrics row with bogo ops done."""
    return sorted({m.stressor for m in report.metrics if m.bogo_ops > 0} | {s for s, n in report.passed.items() if n})


def idle_stressors(report: StressReport) -> Dict[str, Any]:
    """Skipped instances per stressor, and stressors whose metrics show no work (0.15.06's skip)."""
    idle: Dict[str, Any] = {name: n for name, n in report.skipped.items() if n}
    idle.update({m.stressor: "no work done" for m in report.metrics if m.bogo_ops <= 0})
    return idle


def _rates(report: StressReport, params: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
    """(rates below their threshold, thresholds with no row to judge)."""
    rows: Dict[str, StressMetric] = {m.stressor: m for m in report.metrics if m.bogo_ops > 0}
    slow: List[str] = []
    not_judged: List[str] = []
    for stressor, key in THRESHOLDS:
        minimum = float(params[key])
        if minimum <= 0:
            continue
        row = rows.get(stressor)
        if row is None:
            not_judged.append(f"{key}: no {stressor} metrics")
        elif row.bogo_ops_per_s_real < minimum:
            slow.append(f"{stressor} {row.bogo_ops_per_s_real:.1f} bogo ops/s < {key} {minimum:g}")
    return slow, not_judged


def _skip_note(idle: Mapping[str, Any]) -> str:
    return "skipped: " + (", ".join(f"{name} ({why})" for name, why in idle.items()) or "none reported")


def _first_distinct(lines: Tuple[str, ...]) -> List[str]:
    return list(dict.fromkeys(lines))[:_MAX_LINES]


def _temp_parent(state_dir: str) -> Optional[str]:
    """The state directory when it is writable (stays on the node's own disk), else the system's temp."""
    return state_dir if os.path.isdir(state_dir) and os.access(state_dir, os.W_OK) else None
