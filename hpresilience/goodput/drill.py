"""The measured times a drill report gives the goodput projection (issue 13).

The minimal JSON read from `hpresilience drill --json` (other keys are ignored):

    {"scenarios": [{"name": "xid74-replace",
                    "times": {"detect_seconds": 2.1, "stop_seconds": 2.9,
                              "resume_seconds": 41.0, "repair_seconds": 95.0}}]}

Every time is seconds from the injected fault; a missing or null time is a scenario that did not
measure it (a slurmctld restart flags no node). The projection uses the median over the scenarios
that measured each time, so one slow scenario (no spare capacity) does not set it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .sim import DRILLED_REMEDIES, RemedyTimes

TIMES = ("detect", "resume", "repair")


class DrillReportError(ValueError):
    """A drill report that cannot be read; the message names the file and the scenario."""


@dataclass(frozen=True)
class DrillMedian:
    seconds: float
    scenarios: int     # how many scenarios measured it


def _time(value: Any, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DrillReportError(f"{where}: expected seconds (a number, 0 or more), got {value!r}")
    return float(value)


def parse_drill(data: Any, source: str) -> Dict[str, DrillMedian]:
    """{"detect"|"resume"|"repair": median} for the times at least one scenario measured."""
    scenarios = data.get("scenarios") if isinstance(data, dict) else None
    if not isinstance(scenarios, list):
        raise DrillReportError(f"{source}: expected an object with a list of scenarios")
    measured: Dict[str, List[float]] = {name: [] for name in TIMES}
    for i, scenario in enumerate(scenarios):
        label = scenario.get("name", f"#{i}") if isinstance(scenario, dict) else f"#{i}"
        times = scenario.get("times") if isinstance(scenario, dict) else None
        if not isinstance(times, dict):
            raise DrillReportError(f"{source}: scenario {label}: expected a times object")
        for name in TIMES:
            value = _time(times.get(f"{name}_seconds"), f"{source}: scenario {label}: {name}_seconds")
            if value is not None:
                measured[name].append(value)
    return {name: DrillMedian(statistics.median(values), len(values)) for name, values in measured.items() if values}


def load_drill(path: Path) -> Dict[str, DrillMedian]:
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise DrillReportError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise DrillReportError(f"{path}: not valid JSON: {e}") from None
    return parse_drill(data, str(path))


def with_measured(remedies: Mapping[str, RemedyTimes], measured: Mapping[str, float]) -> Dict[str, RemedyTimes]:
    """`remedies` with the measured detect/resume/repair seconds in place for the remedies a drill
    measures (node faults the agent flags: replace, reboot); ValueError when they contradict."""
    out = dict(remedies)
    for name in DRILLED_REMEDIES:
        out[name] = dataclasses.replace(out[name], **{k: v for k, v in measured.items() if k in TIMES})
    for name, times in out.items():
        if times.resume < times.detect:
            raise ValueError(f"{name}: resume ({times.resume:g} s) is counted from the fault, so it cannot be "
                             f"shorter than detect ({times.detect:g} s)")
    return out
