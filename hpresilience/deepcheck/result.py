"""What a deep check says, and what the suite of them says (issue 10).

A check that could not run (tool hung, output malformed) is ERROR, never FAIL:
only evidence that the node is bad drains it. A tool that is not installed is
SKIP with the reason; a check the configuration requires turns that into ERROR.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple


class Status(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"      # the node is bad: evidence says so
    SKIP = "skip"      # not applicable here (no such device, tool not installed), with why
    ERROR = "error"    # could not run: no verdict about the node


class Level(str, enum.Enum):
    QUICK = "quick"        # seconds: prolog/epilog, after a reboot
    STANDARD = "standard"  # minutes
    FULL = "full"          # tens of minutes: after a replacement, new nodes


# Exit codes of `hpresilience deepcheck`, like `hpresilience check`.
EXIT_PASS, EXIT_FAIL, EXIT_NOT_RUN = 0, 1, 2


@dataclass(frozen=True)
class Verdict:
    """What `evaluate` decides from what `collect` observed."""
    status: Status
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    duration_seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "summary": self.summary,
                "evidence": dict(self.evidence), "duration_seconds": round(self.duration_seconds, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(name=str(data["name"]), status=Status(data["status"]), summary=str(data.get("summary", "")),
                   evidence=dict(data.get("evidence") or {}), duration_seconds=float(data.get("duration_seconds", 0)))


@dataclass(frozen=True)
class SuiteReport:
    """Every check of one run on one node (or, with `nodes`, of a cluster run)."""
    node: str
    level: Level
    results: Tuple[CheckResult, ...]
    started_at: float
    duration_seconds: float
    nodes: Tuple[str, ...] = ()
    culprits: Tuple[str, ...] = ()     # cluster runs: the nodes found to be the cause
    notes: Tuple[str, ...] = ()

    @property
    def status(self) -> Status:
        """FAIL if any check failed; else ERROR if any could not run or none passed (every
        check skipped checks nothing: never a pass); else PASS."""
        statuses = {r.status for r in self.results}
        if Status.FAIL in statuses:
            return Status.FAIL
        if Status.ERROR in statuses or Status.PASS not in statuses:
            return Status.ERROR
        return Status.PASS

    @property
    def exit_code(self) -> int:
        return {Status.PASS: EXIT_PASS, Status.FAIL: EXIT_FAIL}.get(self.status, EXIT_NOT_RUN)

    def failed(self) -> List[CheckResult]:
        return [r for r in self.results if r.status is Status.FAIL]

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"node": self.node, "level": self.level.value, "status": self.status.value,
                               "exit_code": self.exit_code, "started_at": round(self.started_at, 3),
                               "duration_seconds": round(self.duration_seconds, 3),
                               "checks": [r.to_dict() for r in self.results]}
        if self.nodes:
            out["nodes"] = list(self.nodes)
            out["culprits"] = list(self.culprits)
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteReport:
        """A report printed by `hpresilience deepcheck --json` (the controller's gate reads it back)."""
        return cls(node=str(data["node"]), level=Level(data["level"]),
                   results=tuple(CheckResult.from_dict(r) for r in data.get("checks") or ()),
                   started_at=float(data.get("started_at", 0)), duration_seconds=float(data.get("duration_seconds", 0)),
                   nodes=tuple(data.get("nodes") or ()), culprits=tuple(data.get("culprits") or ()),
                   notes=tuple(data.get("notes") or ()))


def describe(result: CheckResult, width: Optional[int] = None) -> str:
    """One line a human (or a Slurm reason) can carry: "dcgm: memory failed on GPU 3"."""
    text = f"{result.name}: {result.summary}"
    return text if width is None or len(text) <= width else text[: width - 3] + "..."
