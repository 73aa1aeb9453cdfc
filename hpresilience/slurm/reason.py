"""The `Action:` reason codec: the marker that says a node's state is ours.

A Slurm node reason we write reads ``Action: Reboot`` or ``Action: Replace``,
optionally followed by ``; `` and a short human detail::

    >>> format_reason(Action.REPLACE, "XID 74 NVLink error on GPU 3")
    'Action: Replace; XID 74 NVLink error on GPU 3'
    >>> parse_reason("action:replace")
    ActionReason(action=<Action.REPLACE: 'Replace'>, detail='')
    >>> parse_reason("bad fan, ticket 123") is None
    True

Parsing is lenient in what it accepts (any case, HyperPod's ``Action:Replace``
without a space, Slurm's trailing ``[user@time]``); anything without the prefix
belongs to someone else (an admin, NHC, Slurm itself) and must be left alone.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

MAX_REASON_LEN = 256

_ACTION_RE = re.compile(
    r"^\s*action\s*:\s*(?P<action>reboot|replace)(?![a-z0-9_])\s*[;:,\-]?\s*(?P<detail>.*)$",
    re.IGNORECASE | re.DOTALL,
)
# Slurm appends "[user@YYYY-MM-DDTHH:MM:SS]" when showing a reason.
_SLURM_STAMP_RE = re.compile(r"\s*\[[^\[\]@\s]+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\]\s*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class Action(str, enum.Enum):
    REBOOT = "Reboot"
    REPLACE = "Replace"

    @classmethod
    def parse(cls, text: str) -> Action:
        for action in cls:
            if action.value.lower() == text.strip().lower():
                return action
        raise ValueError(f"unknown action {text!r}: expected one of {', '.join(a.value for a in cls)}")


@dataclass(frozen=True)
class ActionReason:
    action: Action
    detail: str = ""

    def __str__(self) -> str:
        return format_reason(self.action, self.detail)


def sanitize_reason(text: str, max_len: int = MAX_REASON_LEN) -> str:
    """One line, no control characters, at most `max_len` characters.

    Reasons travel through scontrol's argv, sinfo tables and log lines; a
    newline would split a record and an unbounded detail would flood them."""
    text = _CONTROL_RE.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > max_len:
        text = text[: max_len - 3].rstrip() + "..."
    return text


def format_reason(action: Action, detail: str = "") -> str:
    detail = sanitize_reason(detail)
    return sanitize_reason(f"Action: {action.value}; {detail}" if detail else f"Action: {action.value}")


def strip_slurm_stamp(reason: str) -> str:
    return _SLURM_STAMP_RE.sub("", reason)


def parse_reason(reason: Optional[str]) -> Optional[ActionReason]:
    """The ActionReason in `reason`, or None when the reason is not ours."""
    if not reason:
        return None
    match = _ACTION_RE.match(strip_slurm_stamp(reason))
    if not match:
        return None
    return ActionReason(Action.parse(match.group("action")), sanitize_reason(match.group("detail")))


def is_ours(reason: Optional[str]) -> bool:
    return parse_reason(reason) is not None


# Our markers in a job's Comment. EXPEDITE_MARK: auto-resume requeued the job and asks
# `hpresilience controller` to make it eligible at once (before 25.11 a requeued job
# waits ~121 s). AUTO_RESUME_MARK: set by slurm_plugins/job_submit.lua on jobs that use
# `srun --auto-resume`; when such a job was requeued by Slurm itself (its batch host
# died), the controller expedites it too.
EXPEDITE_MARK = "hpr-expedite"
AUTO_RESUME_MARK = "hpr-auto-resume"
