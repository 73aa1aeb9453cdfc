"""Slurm node reasons: the `Action:` codec, and the one decision of whose a reason is.

A reason we act on reads ``Action: Reboot`` or ``Action: Replace``, optionally
followed by ``; `` and a detail. The agent's detail starts with the fault it saw,
``[CODE]`` or ``[CODE@entity]``, so the controller can tell the same fault
returning from a new one, and agents can count how many nodes carry it::

    >>> format_reason(NodeAction.REPLACE, "XID 74 NVLink error", Fault("XID_74", "GPU 3"))
    'Action: Replace; [XID_74@GPU 3] XID 74 NVLink error'
    >>> parse_reason("action:replace")
    ActionReason(action=<NodeAction.REPLACE: 'replace'>, detail='', fault=None)
    >>> parse_reason("Action: Reboot requested by bob") is None   # not the exact form: someone else's
    True

Whose a reason is (`reason_owner`) is decided in one place, by exact form and,
for Slurm's own reasons, by writer (issue 9, defect 2: a prefix test took an
admin's ``Not responding - DO NOT POWER CYCLE`` for Slurm's and power-cycled the node).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

from ..action import NodeAction

MAX_REASON_LEN = 256

# The exact form: "Action:" (HyperPod's "Action:Replace" without a space too, any case),
# the word, then the end or "; detail". Anything else after the word ("Action: Reboot
# requested by bob", "Action: Rebooting") is someone else's free text.
_ACTION_RE = re.compile(r"^\s*action\s*:\s*(?P<action>reboot|replace)\s*(?:;\s*(?P<detail>.*))?$",
                        re.IGNORECASE | re.DOTALL)
_FAULT_RE = re.compile(r"^\[(?P<code>[A-Z][A-Z0-9_]{0,63})(?:@(?P<entity>[^\[\]]{1,128}))?\]\s*(?P<rest>.*)$",
                       re.DOTALL)
# Slurm appends what happened to a reboot to the reason it was issued with
# ("Action: Reboot : reboot issued : reboot complete", measured on 22.05, docs/testcluster.md).
_SLURM_SUFFIX_RE = re.compile(r"(?:\s+:\s+(?:reboot issued|reboot complete|reboot timed out))+\s*$", re.IGNORECASE)
# Slurm appends "[user@YYYY-MM-DDTHH:MM:SS]" when showing a reason.
_SLURM_STAMP_RE = re.compile(r"\s*\[[^\[\]@\s]+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\]\s*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")

# What the controller writes when it gives a node up to a human: ours, but never acted on.
GAVE_UP_PREFIX = "hpresilience:"
_GAVE_UP_RE = re.compile(r"^hpresilience: .* \(workflow \d+; was: .*\)$|^hpresilience: awaiting hardware repair, "
                         r"replaced by \S+ \(workflow \d+\)$", re.DOTALL)
# Reasons slurmctld itself writes (as SlurmUser) on a reboot or a silent node, exactly
# (Slurm 22.05-25.11; compared lower-case, whole). A workflow that owns a node expects
# them; an admin's text that merely starts the same way is the admin's.
SLURM_OWN_REASONS = frozenset({
    "not responding", "node unexpectedly rebooted", "reboot timed out", "reboot issued", "reboot requested",
    "reboot complete", "resumetimeout reached", "powered down", "power_down",
})


class ReasonOwner(str, enum.Enum):
    NONE = "none"          # no reason
    ACTION = "action"      # an Action: request (the agent's, or typed by an admin): the controller acts on it
    GAVE_UP = "gave_up"    # the controller gave the node up to a human: ours, never acted on again
    SLURM = "slurm"        # written by slurmctld itself, in one of its exact forms
    FOREIGN = "foreign"    # anyone else's: never changed, never cleared


@dataclass(frozen=True)
class Fault:
    """Which fault a reason is about: its finding code and device ("entity")."""
    code: str
    entity: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.code}@{self.entity}" if self.entity else self.code

    def matches(self, other: Optional[Fault]) -> bool:
        """The same fault on the same device. A device's name may or may not carry its address
        ("GPU 3 (0000:86:00.0)" while it answered, "GPU 3" once lost from boot on): the address
        in parentheses is left out of the comparison (found by ./scripts/demo, issue 10: a GPU
        lost before and after a reboot was taken for a new fault and given up, not replaced).

        >>> Fault("GPU_LOST", "GPU 3 (0000:86:00.0)").matches(Fault("GPU_LOST", "GPU 3"))
        True
        >>> Fault("GPU_LOST", "GPU 3").matches(Fault("GPU_LOST", "GPU 4")), Fault("XID_79").matches(None)
        (False, False)
        """
        return other is not None and self.code == other.code and _device(self.entity) == _device(other.entity)


_ADDRESS_RE = re.compile(r"\s*\([^()]*\)$")


def _device(entity: Optional[str]) -> Optional[str]:
    return _ADDRESS_RE.sub("", entity) if entity else entity


@dataclass(frozen=True)
class ActionReason:
    action: NodeAction
    detail: str = ""
    fault: Optional[Fault] = None

    def __str__(self) -> str:
        return format_reason(self.action, self.detail, self.fault)


def sanitize_reason(text: str, max_len: int = MAX_REASON_LEN) -> str:
    """One line, no control characters, at most `max_len` characters.

    Reasons travel through scontrol's argv, sinfo tables and log lines; a
    newline would split a record and an unbounded detail would flood them."""
    text = _CONTROL_RE.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > max_len:
        text = text[: max_len - 3].rstrip() + "..."
    return text


def format_reason(action: NodeAction, detail: str = "", fault: Optional[Fault] = None) -> str:
    word = NodeAction(action).reason_word
    if word is None:
        raise ValueError(f"no Action: reason names {action.value!r}")
    if fault is not None:
        entity = sanitize_reason(re.sub(r"[\[\]]", "", fault.entity or ""), 96)
        detail = f"[{fault.code}@{entity}] {detail}" if entity else f"[{fault.code}] {detail}"
    detail = sanitize_reason(detail)
    return sanitize_reason(f"Action: {word}; {detail}" if detail else f"Action: {word}")


def strip_slurm_stamp(reason: str) -> str:
    return _SLURM_STAMP_RE.sub("", reason)


def reason_core(reason: Optional[str]) -> str:
    """The reason as its writer set it: without Slurm's stamp and without the reboot
    progress Slurm appends to it.

    >>> reason_core("Action: Reboot : reboot issued : reboot complete")
    'Action: Reboot'
    """
    return _SLURM_SUFFIX_RE.sub("", strip_slurm_stamp(reason or "")).strip()


def parse_reason(reason: Optional[str]) -> Optional[ActionReason]:
    """The ActionReason in `reason`, or None when the reason is not an Action: reason."""
    if not reason:
        return None
    match = _ACTION_RE.match(reason_core(reason))
    if not match:
        return None
    detail = sanitize_reason(match.group("detail") or "")
    fault = None
    tagged = _FAULT_RE.match(detail)
    if tagged:
        fault = Fault(tagged.group("code"), tagged.group("entity") or None)
        detail = tagged.group("rest")
    return ActionReason(NodeAction.parse(match.group("action")), detail, fault)


def is_slurm_reason(reason: Optional[str], writer: Optional[str], slurm_user: Optional[str]) -> bool:
    """Slurm's own reason: one of its exact texts, written by SlurmUser.

    >>> is_slurm_reason("Not responding", "slurm", "slurm")
    True
    >>> is_slurm_reason("Not responding - DO NOT POWER CYCLE, BIOS flash", "slurm", "slurm")
    False
    >>> is_slurm_reason("Not responding", "alice", "slurm")
    False
    """
    if not reason or writer is None or slurm_user is None or writer != slurm_user:
        return False
    return " ".join(strip_slurm_stamp(reason).split()).lower() in SLURM_OWN_REASONS


def reason_owner(reason: Optional[str], writer: Optional[str], slurm_user: Optional[str]) -> ReasonOwner:
    """Whose `reason` is: the one decision every component takes it from (issue 9).

    >>> reason_owner("Action: Replace; [XID_74] NVLink", "root", "slurm").value
    'action'
    >>> reason_owner("Powered down for PSU swap", "slurm", "slurm").value
    'foreign'
    """
    if not reason or not reason.strip():
        return ReasonOwner.NONE
    if parse_reason(reason) is not None:
        return ReasonOwner.ACTION
    if _GAVE_UP_RE.match(reason_core(reason)):
        return ReasonOwner.GAVE_UP
    if is_slurm_reason(reason, writer, slurm_user):
        return ReasonOwner.SLURM
    return ReasonOwner.FOREIGN


# Our markers in a job's Comment. EXPEDITE_MARK: auto-resume requeued the job and asks
# `hpresilience controller` to make it eligible at once (before 25.11 a requeued job
# waits ~121 s). AUTO_RESUME_MARK: set by slurm_plugins/job_submit.lua on jobs that use
# `srun --auto-resume`; when such a job was requeued by Slurm itself (its batch host
# died), the controller expedites it too.
EXPEDITE_MARK = "hpr-expedite"
AUTO_RESUME_MARK = "hpr-auto-resume"
