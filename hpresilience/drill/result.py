"""What a drill found (issue 13), and report.json read back with every field checked.

The drill's orchestrator builds a `DrillResult`; `hpresilience goodput` and the tests read
report.json back. A malformed file is refused with a `ReportError` that names the field
("scenarios[2].events[0].at: expected a number or null, got 'soon'"), never a KeyError deep
in a renderer. Whether the drill passed is computed from its parts, so a report cannot say
"passed" over a failed scenario.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

# The event every scenario's times count from (the timeline's zero).
FAULT_EVENT = "fault_injected"

# Scenario names become file names, anchors and CLI arguments: an identifier, not free text.
_SCENARIO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ReportError(ValueError):
    """A drill report that does not have the expected shape; the message names the field."""


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields(data: Any, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> Mapping[str, Any]:
    """`data` as an object with all of `required`, and nothing but those and `optional`
    (an unknown key is most often a misspelt one, whose value would be lost silently)."""
    if not isinstance(data, Mapping):
        raise ReportError(f"{where or 'report'}: expected an object, got {_shown(data)}")
    for key in required:
        if key not in data:
            raise ReportError(f"{_at(where, key)}: missing")
    unknown = sorted(str(k) for k in data if k not in required and k not in optional)
    if unknown:
        known = ", ".join([*required, *optional])
        raise ReportError(f"{_at(where, unknown[0])}: unknown field (known: {known})")
    return data


def _absent(data: Mapping[str, Any], key: str, default: Any) -> Any:
    """An optional field's value; null counts as absent (an orchestrator writes None for "none")."""
    value = data.get(key)
    return default if value is None else value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ReportError(f"{where}: expected a string, got {_shown(value)}")
    return value


def _optional_text(value: Any, where: str) -> Optional[str]:
    return None if value is None else _text(value, where)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ReportError(f"{where}: expected true or false, got {_shown(value)}")
    return value


def _number(value: Any, where: str, *, minimum: Optional[float] = None, nullable: bool = False) -> Optional[float]:
    if value is None and nullable:
        return None
    # bool is an int to Python, never a time to us; NaN and infinities are not measurements.
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        wanted = "a number" + ("" if minimum is None else f" >= {minimum:g}") + (" or null" if nullable else "")
        raise ReportError(f"{where}: expected {wanted}, got {_shown(value)}")
    return float(value)


def _count(value: Any, where: str, *, nullable: bool = False) -> Optional[int]:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReportError(f"{where}: expected a whole number >= 0{' or null' if nullable else ''}, got {_shown(value)}")
    return value


def _list(value: Any, where: str) -> List[Any]:
    if not isinstance(value, list):
        raise ReportError(f"{where}: expected a list, got {_shown(value)}")
    return value


@dataclass(frozen=True)
class Event:
    """Something the drill observed, at an epoch time; `at` None: expected but not observed."""
    name: str
    at: Optional[float]

    def to_dict(self) -> dict:
        return {"name": self.name, "at": self.at}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Event:
        data = _fields(data, where, ("name", "at"))
        name = _text(data["name"], _at(where, "name"))
        if not name:
            raise ReportError(f"{_at(where, 'name')}: empty")
        return cls(name=name, at=_number(data["at"], _at(where, "at"), minimum=0, nullable=True))


@dataclass(frozen=True)
class Check:
    """One thing the drill verified (a scenario's check, or a drill-wide invariant)."""
    name: str
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Check:
        data = _fields(data, where, ("name", "passed"), ("detail",))
        return cls(name=_text(data["name"], _at(where, "name")), passed=_flag(data["passed"], _at(where, "passed")),
                   detail=_text(_absent(data, "detail", ""), _at(where, "detail")))


@dataclass(frozen=True)
class Times:
    """Seconds from the fault; None where the drill did not measure it."""
    detect_seconds: Optional[float] = None   # → the node flagged
    stop_seconds: Optional[float] = None     # → the training step stopped
    resume_seconds: Optional[float] = None   # → the first training step after the resume
    repair_seconds: Optional[float] = None   # → the node back in service

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Times:
        names = [f.name for f in fields(cls)]
        data = _fields(data, where, (), names)
        return cls(**{n: _number(data.get(n), _at(where, n), minimum=0, nullable=True) for n in names})


@dataclass(frozen=True)
class ScenarioResult:
    name: str                  # an identifier: xid74_replace
    title: str                 # for people: "XID 74 (NVLink error) → Action: Replace"
    passed: bool
    node: Optional[str] = None  # the node the fault hit; None for cluster-wide faults
    events: Tuple[Event, ...] = ()
    times: Times = field(default_factory=Times)
    steps_redone: Optional[int] = None
    checks: Tuple[Check, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        # Here, not in from_dict: the orchestrator builds results directly, and a report it
        # wrote must be one load_result reads back.
        failed = [c.name for c in self.checks if not c.passed]
        if self.passed and failed:
            raise ReportError(f"passed: true, but check {failed[0]!r} failed")

    @property
    def fault_at(self) -> Optional[float]:
        return next((e.at for e in self.events if e.name == FAULT_EVENT), None)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "node": self.node, "passed": self.passed,
                "events": [e.to_dict() for e in self.events], "times": self.times.to_dict(),
                "steps_redone": self.steps_redone, "checks": [c.to_dict() for c in self.checks],
                "notes": self.notes}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> ScenarioResult:
        data = _fields(data, where, ("name", "passed"),
                       ("title", "node", "events", "times", "steps_redone", "checks", "notes"))
        name = _text(data["name"], _at(where, "name"))
        if not _SCENARIO_NAME.fullmatch(name):
            raise ReportError(f"{_at(where, 'name')}: expected an identifier (letters, digits, _ . -), "
                              f"got {_shown(name)}")
        events = _list(_absent(data, "events", []), _at(where, "events"))
        checks = _list(_absent(data, "checks", []), _at(where, "checks"))
        values = dict(
            name=name, title=_text(_absent(data, "title", name), _at(where, "title")),
            passed=_flag(data["passed"], _at(where, "passed")),
            node=_optional_text(data.get("node"), _at(where, "node")),
            events=tuple(Event.from_dict(e, f"{_at(where, 'events')}[{i}]") for i, e in enumerate(events)),
            times=Times.from_dict(_absent(data, "times", {}), _at(where, "times")),
            steps_redone=_count(data.get("steps_redone"), _at(where, "steps_redone"), nullable=True),
            checks=tuple(Check.from_dict(c, f"{_at(where, 'checks')}[{i}]") for i, c in enumerate(checks)),
            notes=_text(_absent(data, "notes", ""), _at(where, "notes")))
        try:
            return cls(**values)
        except ReportError as e:   # __post_init__ names the field; this says whose
            raise ReportError(_at(where, str(e))) from None


@dataclass(frozen=True)
class Canary:
    """The `srun --auto-resume` job the scenarios disturb; it must end at the expected step."""
    job_id: Optional[int]      # None: it never started
    nodes: str
    command: str
    final_step_expected: int
    final_step_seen: Optional[int] = None   # None: it did not finish

    @property
    def finished_right(self) -> bool:
        return self.final_step_seen == self.final_step_expected

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "nodes": self.nodes, "command": self.command,
                "final_step_expected": self.final_step_expected, "final_step_seen": self.final_step_seen}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Canary:
        data = _fields(data, where, ("nodes", "command", "final_step_expected"), ("job_id", "final_step_seen"))
        expected = _count(data["final_step_expected"], _at(where, "final_step_expected"))
        return cls(job_id=_count(data.get("job_id"), _at(where, "job_id"), nullable=True),
                   nodes=_text(data["nodes"], _at(where, "nodes")),
                   command=_text(data["command"], _at(where, "command")), final_step_expected=expected,
                   final_step_seen=_count(data.get("final_step_seen"), _at(where, "final_step_seen"), nullable=True))


@dataclass(frozen=True)
class DrillResult:
    drill: str
    started_at: float
    finished_at: float
    cluster: str
    canary: Canary
    scenarios: Tuple[ScenarioResult, ...]
    invariants: Tuple[Check, ...] = ()

    def __post_init__(self) -> None:
        # Names key the report's sections (and the page's charts): one scenario each.
        for i, scenario in enumerate(self.scenarios):
            if scenario.name in (s.name for s in self.scenarios[:i]):
                raise ReportError(f"scenarios[{i}].name: {scenario.name!r} again (names are unique)")

    def failures(self) -> List[str]:
        """Why the drill did not pass, one line each; empty when it passed."""
        out = [] if self.scenarios else ["no scenario ran"]
        out += [f"scenario {s.name} failed" for s in self.scenarios if not s.passed]
        out += [f"invariant {c.name!r} failed" for c in self.invariants if not c.passed]
        if not self.canary.finished_right:
            seen = "did not finish" if self.canary.final_step_seen is None else \
                f"finished at step {self.canary.final_step_seen}"
            out.append(f"the canary {seen}, expected step {self.canary.final_step_expected}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        return {"drill": self.drill, "started_at": self.started_at, "finished_at": self.finished_at,
                "cluster": self.cluster, "canary": self.canary.to_dict(),
                "scenarios": [s.to_dict() for s in self.scenarios],
                "invariants": [c.to_dict() for c in self.invariants], "passed": self.passed}

    @classmethod
    def from_dict(cls, data: Any) -> DrillResult:
        data = _fields(data, "", ("drill", "started_at", "finished_at", "cluster", "canary", "scenarios"),
                       ("invariants", "passed"))
        started = _number(data["started_at"], "started_at", minimum=0)
        finished = _number(data["finished_at"], "finished_at", minimum=0)
        if finished < started:
            raise ReportError(f"finished_at: {finished!r} is before started_at {started!r}")
        scenarios = tuple(ScenarioResult.from_dict(s, f"scenarios[{i}]")
                          for i, s in enumerate(_list(data["scenarios"], "scenarios")))
        result = cls(drill=_text(data["drill"], "drill"), started_at=started, finished_at=finished,
                     cluster=_text(data["cluster"], "cluster"), canary=Canary.from_dict(data["canary"], "canary"),
                     scenarios=scenarios,
                     invariants=tuple(Check.from_dict(c, f"invariants[{i}]")
                                      for i, c in enumerate(_list(_absent(data, "invariants", []), "invariants"))))
        if "passed" in data and _flag(data["passed"], "passed") != result.passed:
            why = "; ".join(result.failures()) or "nothing failed"
            raise ReportError(f"passed: {str(data['passed']).lower()}, but {why}")
        return result


def load_result(path: Path) -> DrillResult:
    """A report.json read back; a `ReportError` naming the file and the field if it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from e
    except ValueError as e:
        raise ReportError(f"{path}: not JSON: {e}") from e
    try:
        return DrillResult.from_dict(data)
    except ReportError as e:
        raise ReportError(f"{path}: {e}") from None
