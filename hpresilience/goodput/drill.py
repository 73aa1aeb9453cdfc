"""The measured times a drill report gives the goodput projection (issue 13).

The report is `hpresilience drill`'s report.json, read (and checked) by the drill's own reader
(hpresilience.drill.result.load_result): one parser for one format. Only scenarios that passed
count: a failed scenario's times describe a failure, not the set-up.

Detect and resume are taken (seconds from the fault; the median over the scenarios that measured
each, so one slow scenario, no spare capacity, does not set it). Repair is not: it is the site's
provider and hardware (days for a real replacement), and a drill on the test cluster emulates it in
seconds, which would project a 16,384-GPU run needing no spares (issue 13 review); give --repair to
use a measured one.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping

from ..drill.result import DrillResult, ReportError, load_result
from .sim import DRILLED_REMEDIES, RemedyTimes

TIMES = ("detect", "resume")             # taken from a drill report
OVERRIDABLE = ("detect", "resume", "repair")   # --detect/--resume/--repair


class DrillReportError(ValueError):
    """A drill report that cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class DrillMedian:
    seconds: float
    scenarios: int     # how many passed scenarios measured it


def medians(result: DrillResult) -> Dict[str, DrillMedian]:
    """{"detect"|"resume": median} over the passed scenarios that measured each."""
    measured: Dict[str, List[float]] = {name: [] for name in TIMES}
    for scenario in result.scenarios:
        if not scenario.passed:
            continue
        for name in TIMES:
            value = getattr(scenario.times, f"{name}_seconds")
            if value is not None:
                measured[name].append(value)
    return {name: DrillMedian(statistics.median(values), len(values)) for name, values in measured.items() if values}


def load_drill(path: Path) -> Dict[str, DrillMedian]:
    try:
        return medians(load_result(Path(path)))
    except ReportError as e:
        raise DrillReportError(str(e)) from None


def with_measured(remedies: Mapping[str, RemedyTimes], measured: Mapping[str, float]) -> Dict[str, RemedyTimes]:
    """`remedies` with the measured seconds in place for the remedies a drill measures (node faults
    the agent flags: replace, reboot); ValueError when they contradict."""
    out = dict(remedies)
    for name in DRILLED_REMEDIES:
        out[name] = dataclasses.replace(out[name], **{k: v for k, v in measured.items() if k in OVERRIDABLE})
    for name, times in out.items():
        if times.resume < times.detect:
            raise ValueError(f"{name}: resume ({times.resume:g} s) is counted from the fault, so it cannot be "
                             f"shorter than detect ({times.detect:g} s)")
    return out
