"""What the controller reads off a node and a check: pure decisions, no side effects.

- `check_verdict`: what the node's own check said (healthy, unhealthy, not run).
- `is_unresponsive`: a silent node nobody has claimed.
- `gate_report`: what the deep-check gate said (issue 10).
- `reason_change`: what happened to the node's reason since the workflow last
  looked (issue 9: remediation re-reads the node at every step boundary and
  honours the newest reason: an upgrade to Replace, a foreign reason, a fresh fault).
"""
from __future__ import annotations

import datetime as dt
import enum
import json
import re
from typing import Any, Dict, Mapping, Optional

from ..action import NodeAction
from ..deepcheck.result import SuiteReport, describe
from ..slurm import Node
from ..slurm.models import StepResult
from ..slurm.reason import Fault, ReasonOwner, reason_core, sanitize_reason


def summary(output: str) -> str:
    r"""The check's first finding line, short enough for a Slurm reason.

    >>> summary("REBOOT XID_79 [GPU 3]: fell off the bus\nsrun: error: n3: task 0: Exited with exit code 1\n")
    'REBOOT XID_79 [GPU 3]: fell off the bus'
    """
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("srun:")]
    return sanitize_reason(lines[0] if lines else output, 120)


def check_verdict(result: StepResult) -> str:
    """healthy | unhealthy | not_run. srun exits 1 for its own errors too (bad
    partition, node gone), so "unhealthy" needs srun's word that the task itself
    exited 1 (`hpresilience check`: 1 = findings, 2 = could not look).

    >>> check_verdict(StepResult(1, "XID 79\\nsrun: error: n3: task 0: Exited with exit code 1"))
    'unhealthy'
    >>> check_verdict(StepResult(1, "srun: error: Unable to allocate resources: Invalid partition name specified"))
    'not_run'
    """
    if result.returncode == 0:
        return "healthy"
    if result.returncode == 1 and re.search(r"task \d+: Exited with exit code 1\b", result.output):
        return "unhealthy"
    return "not_run"


def is_unresponsive(node: Node) -> bool:
    """A silent node nobody has claimed: no reason, or only Slurm's own (by writer and
    exact form: an admin's "Not responding - DO NOT POWER CYCLE" is the admin's; defect 2)."""
    if not node.flags & {"NOT_RESPONDING"} or node.flags & {"POWERED_DOWN", "POWERING_DOWN", "POWERING_UP"}:
        return False
    return node.reason_owner in (ReasonOwner.NONE, ReasonOwner.SLURM)


def ts(when: Optional[dt.datetime]) -> Optional[float]:
    return when.timestamp() if when is not None else None


class Change(str, enum.Enum):
    NONE = "none"            # the reason is the one the workflow knows, Slurm's own, or gone
    FOREIGN = "foreign"      # someone else's reason: the node is theirs now
    UPGRADE = "upgrade"      # a newer Action: Replace on a reboot/power-cycle workflow
    FRESH = "fresh"          # a newer Action: reason: a fault flagged after the workflow's own


def reason_change(facts: Mapping[str, object], action: str, node: Node) -> Change:
    """What the node's reason says now, against the reason the workflow last accepted
    (`facts["seen_reason"]`, `facts["seen_time"]`: the one it opened on or wrote itself).

    A reason of ours is new when its text or its time differs from the one accepted: an
    agent or an admin flagged the node again. Only a harsher action upgrades a workflow;
    a repeat of the same action is a fresh fault."""
    owner = node.reason_owner
    if owner is ReasonOwner.FOREIGN:
        return Change.FOREIGN
    if owner is not ReasonOwner.ACTION:
        return Change.NONE
    seen_time = facts.get("seen_time")
    now_time = ts(node.reason_time)
    # Slurm appending "reboot issued" to our reason is not a new flag.
    if reason_core(node.reason) == reason_core(facts.get("seen_reason")) and (seen_time is None or now_time is None
                                                    or now_time <= float(seen_time)):
        return Change.NONE
    flagged = node.action_reason
    if flagged is not None and flagged.action is NodeAction.REPLACE and action != NodeAction.REPLACE.value:
        return Change.UPGRADE
    return Change.FRESH


# The fault a failed deep check stands for: harsher than any reboot (the remedy did not
# make the node good), so it escalates a reboot and gives a replacement up (issue 10).
DEEPCHECK_FAULT = Fault("DEEPCHECK")


def gate_report(result: StepResult) -> Optional[SuiteReport]:
    """The report `hpresilience deepcheck --json` printed (the last JSON line that is one),
    or None when there is none (srun failed, the command crashed, output cut short).

    >>> out = '{"event": "deepcheck.result"}\\n{"node": "n1", "level": "quick", "checks": []}\\nsrun: error: x'
    >>> gate_report(StepResult(2, out)).node
    'n1'
    >>> gate_report(StepResult(1, "srun: error: Unable to allocate resources")) is None
    True
    """
    for line in reversed(result.output.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
            if isinstance(data, dict) and "checks" in data and "level" in data:
                return SuiteReport.from_dict(data)
        except (ValueError, KeyError, TypeError):
            continue
    return None


def gate_record(report: SuiteReport) -> Dict[str, Any]:
    """What the journal keeps of a gate run: enough for `status`/`history`, bounded in size."""
    return {"level": report.level.value, "status": report.status.value,
            "seconds": round(report.duration_seconds, 1),
            "checks": {r.name: r.status.value for r in report.results},
            "failed": [describe(r, 200) for r in report.failed()]}
