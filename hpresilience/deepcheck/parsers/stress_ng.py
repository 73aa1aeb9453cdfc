"""Parser for `stress-ng ... --metrics [--verify]` output (issue 10).

Lines look like `stress-ng: LEVEL: [PID] MESSAGE`. Quirks handled, each seen in a capture
in tests/fixtures/deep-checks/:

- The metrics table is on `metrc:` lines (stress-ng-metrics.txt, 0.15.06's
  stress-ng-verify-metrics.txt) or, in older releases, on `info:` lines printed after the
  completion line and without the RSS column (stress-ng-metrics-legacy-info.txt). A row is
  a stressor name followed by at least six numbers, read only below a `bogo ops` header.
- The summary `skipped: N[: name (n) ...]`, `passed:`, `failed:`, `metrics untrustworthy:`
  is printed by newer releases only; 0.15.06 prints none (stress-ng-verify-metrics.txt),
  so its absence leaves the dicts empty and `untrustworthy` None.
- `--verify` failures show as `fail:` lines ("vm: detected 5 bit errors while stressing
  memory") and `error:` lines, with `failed: 1: vm (1)` and "unsuccessful run completed"
  (stress-ng-verify-fail-memory.txt). Unprefixed lines ("info: 5 failures reached, ...")
  are ignored.
- Skipped instances (`skipped: 2: vm (2)`, stress-ng-verify-vm-skipped.txt) are reported,
  not judged: whether a skip fails a health check is the caller's decision.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import ParseError, finite_number

_TOOL = "stress-ng"
_LINE = re.compile(r"^stress-ng: (\w+):\s*\[\d+\]\s?(.*)$")
_SUMMARY = re.compile(r"^(skipped|passed|failed): ([0-9]+)(?::(.*))?$")
_PER_STRESSOR = re.compile(r"([\w-]+) \(([0-9]+)\)")
_UNTRUSTWORTHY = re.compile(r"^metrics untrustworthy: ([0-9]+)")
_COMPLETED = re.compile(r"^(successful|unsuccessful) run completed")
_METRIC_COLUMNS = 6  # bogo ops, real, usr, sys, bogo ops/s (real), bogo ops/s (usr+sys)


@dataclass(frozen=True)
class StressMetric:
    stressor: str
    bogo_ops: float
    real_time: float             # seconds
    bogo_ops_per_s_real: float
    bogo_ops_per_s_cpu: float    # per second of usr+sys time


@dataclass(frozen=True)
class StressReport:
    metrics: Tuple[StressMetric, ...]
    passed: Dict[str, int] = field(default_factory=dict)   # stressor -> instances
    failed: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    fail_lines: Tuple[str, ...] = ()   # the `fail:` messages, e.g. "vm: detected 5 bit errors ..."
    error_lines: Tuple[str, ...] = ()  # the `error:` messages, e.g. "vm: [8014] terminated with an error ..."
    completed: Optional[bool] = None   # successful (True) / unsuccessful (False) run completed; None: no such line
    untrustworthy: Optional[int] = None  # "metrics untrustworthy: N"; None when not printed (0.15.06)


def parse_stress_ng(text: str) -> StressReport:
    metrics: List[StressMetric] = []
    counts: Dict[str, Dict[str, int]] = {"passed": {}, "failed": {}, "skipped": {}}
    lines: Dict[str, List[str]] = {"fail": [], "error": []}
    completed: Optional[bool] = None
    untrustworthy: Optional[int] = None
    summary_seen = in_table = False
    for raw in text.splitlines():
        match = _LINE.match(raw.strip())
        if not match:
            continue
        level, message = match.group(1), match.group(2).strip()
        if level in lines:
            lines[level].append(message)
        metric = _metric(message) if in_table and level in ("metrc", "info") else None
        # The table starts at its "bogo ops" header and ends at the first line that is
        # neither a row nor the "(secs)" units line under the header.
        in_table = "bogo ops" in message or bool(metric) or (in_table and "(secs)" in message)
        if metric:
            metrics.append(metric)
        elif summary := _SUMMARY.match(message):
            summary_seen = True
            counts[summary.group(1)] = _per_stressor(summary)
        elif untrusted := _UNTRUSTWORTHY.match(message):
            summary_seen = True
            untrustworthy = int(untrusted.group(1))
        elif done := _COMPLETED.match(message):
            completed = done.group(1) == "successful"
    if not (metrics or summary_seen or completed is not None or lines["fail"]):
        raise ParseError(_TOOL, "no metrics, summary, failure or completion line in the output")
    return StressReport(tuple(metrics), counts["passed"], counts["failed"], counts["skipped"],
                        tuple(lines["fail"]), tuple(lines["error"]), completed, untrustworthy)


def _metric(message: str) -> Optional[StressMetric]:
    """A metrics row, or None for any other line (the "(secs)" units line, RAPL lines)."""
    fields = message.split()
    if len(fields) < 1 + _METRIC_COLUMNS:
        return None
    try:
        ops, real, _usr, _sys, rate_real, rate_cpu = (finite_number(f) for f in fields[1:1 + _METRIC_COLUMNS])
    except ValueError:
        return None
    return StressMetric(fields[0], ops, real, rate_real, rate_cpu)


def _per_stressor(summary: re.Match) -> Dict[str, int]:
    """"failed: 1: vm (1)" -> {"vm": 1}; "failed: 0" -> {}. A total that the per-stressor
    counts do not add up to is a ParseError: an unattributed failure must not be dropped."""
    per_stressor = {name: int(n) for name, n in _PER_STRESSOR.findall(summary.group(3) or "")}
    if sum(per_stressor.values()) != int(summary.group(2)):
        raise ParseError(_TOOL, f"summary line {summary.group(0)!r} does not add up")
    return per_stressor
