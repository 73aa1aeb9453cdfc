import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpresilience.action import NodeAction
from hpresilience.slurm.reason import (
    MAX_REASON_LEN,
    SLURM_OWN_REASONS,
    ActionReason,
    Fault,
    ReasonOwner,
    format_reason,
    parse_reason,
    reason_owner,
    sanitize_reason,
)


@pytest.mark.parametrize("text, action, detail", [
    ("Action: Reboot", NodeAction.REBOOT, ""),
    ("Action: Replace", NodeAction.REPLACE, ""),
    ("Action:Replace", NodeAction.REPLACE, ""),                       # HyperPod's spelling
    ("action:reboot", NodeAction.REBOOT, ""),
    ("ACTION :  REPLACE", NodeAction.REPLACE, ""),
    ("  Action: Replace; XID 74 NVLink error on GPU 3", NodeAction.REPLACE, "XID 74 NVLink error on GPU 3"),
    ("Action: Reboot;XID 73", NodeAction.REBOOT, "XID 73"),
    ("Action: Replace; detail [root@2026-11-22T11:12:36]", NodeAction.REPLACE, "detail"),  # Slurm's stamp
    ("Action: Reboot [slurm@2026-01-02T03:04:05]", NodeAction.REBOOT, ""),
    ("Action: Reboot; XID 73 : reboot issued", NodeAction.REBOOT, "XID 73"),
])
def test_parse_ours(text, action, detail):
    assert parse_reason(text) == ActionReason(action, detail)
    assert reason_owner(text, "root", "slurm") is ReasonOwner.ACTION


@pytest.mark.parametrize("text", [
    None, "", "admin: bad fan", "NHC: check_gpu failed", "Not responding", "Node unexpectedly rebooted",
    "Reboot ASAP", "Action: Rebooting soon", "Action: Repair", "My Action: Replace", "Action Replace",
    "Kill task failed",
    # Issue 9: the exact form, not a prefix: free text after the word is someone else's.
    "Action: Reboot - hung task", "Action: Reboot requested by bob, DO NOT REPLACE", "Action: Replace later",
])
def test_parse_not_ours(text):
    assert parse_reason(text) is None
    assert reason_owner(text, "root", "slurm") is not ReasonOwner.ACTION


def test_format_round_trip():
    for action in (NodeAction.REBOOT, NodeAction.REPLACE):
        for detail in ("", "XID 79 GPU fell off the bus (0000:b9:00)"):
            assert parse_reason(format_reason(action, detail)) == ActionReason(action, detail)


def test_format_exact_shape():
    assert format_reason(NodeAction.REPLACE, "XID 74 on GPU 3") == "Action: Replace; XID 74 on GPU 3"
    assert format_reason(NodeAction.REBOOT) == "Action: Reboot"
    assert str(ActionReason(NodeAction.REBOOT, "hung task")) == "Action: Reboot; hung task"


def test_sanitize_newlines_and_controls():
    assert sanitize_reason("a\nb\r\nc\td\x00e\x7f") == "a b c d e"
    assert "\n" not in format_reason(NodeAction.REBOOT, "line1\nline2")


def test_sanitize_bounds_length():
    long = format_reason(NodeAction.REPLACE, "x" * 1000)
    assert len(long) == MAX_REASON_LEN
    assert long.endswith("...")
    assert parse_reason(long).action is NodeAction.REPLACE


def test_action_parse_names_bad_input():
    with pytest.raises(ValueError, match="'fix'"):
        NodeAction.parse("fix")


def test_no_reason_names_none_or_power_cycle():
    for action in (NodeAction.NONE, NodeAction.POWER_CYCLE):
        with pytest.raises(ValueError):
            format_reason(action)


@pytest.mark.parametrize("fault", [Fault("XID_79", "GPU 3 (0000:b9:00.0)"), Fault("HUNG_TASK", "pid 4242"),
                                   Fault("OOM_SYSTEM")])
def test_fault_round_trip(fault):
    text = format_reason(NodeAction.REBOOT, "some detail", fault)
    assert parse_reason(text) == ActionReason(NodeAction.REBOOT, "some detail", fault)


def test_fault_tag_survives_a_long_detail():
    """The tag leads: truncation cuts the human text, never the fault the controller compares."""
    text = format_reason(NodeAction.REBOOT, "x" * 1000, Fault("XID_79", "GPU 3 (0000:b9:00.0)"))
    assert parse_reason(text).fault == Fault("XID_79", "GPU 3 (0000:b9:00.0)")


def test_entity_brackets_cannot_forge_a_tag():
    text = format_reason(NodeAction.REBOOT, "d", Fault("FS_ERROR", "/mnt/a] [XID_74@x"))
    assert parse_reason(text).fault.code == "FS_ERROR"


# Issue 9, defect 2: whose a reason is, by exact form and writer.
@pytest.mark.parametrize("reason, writer, owner", [
    (None, None, ReasonOwner.NONE),
    ("Action: Replace", "alice", ReasonOwner.ACTION),               # an admin's request: acted on
    ("Not responding", "slurm", ReasonOwner.SLURM),
    ("Node unexpectedly rebooted", "slurm", ReasonOwner.SLURM),
    ("reboot timed out", "slurm", ReasonOwner.SLURM),
    ("Not responding", "alice", ReasonOwner.FOREIGN),               # typed by a person
    ("Not responding - DO NOT POWER CYCLE, BIOS flash", "slurm", ReasonOwner.FOREIGN),
    ("Powered down for PSU swap", "slurm", ReasonOwner.FOREIGN),
    ("reboot requested by alice", "slurm", ReasonOwner.FOREIGN),
    ("hpresilience: check failed (workflow 3; was: Action: Reboot)", "root", ReasonOwner.GAVE_UP),
    ("hpresilience: please resume", "root", ReasonOwner.FOREIGN),
    ("NHC: check_gpu failed", "root", ReasonOwner.FOREIGN),
    # Slurm appends a reboot's progress to the reason it was issued with (22.05, measured).
    ("Action: Reboot : reboot issued", "root", ReasonOwner.ACTION),
    ("Action: Reboot : reboot issued : reboot complete", "root", ReasonOwner.ACTION),
    ("Action: Reboot; [XID_79] x : reboot issued", "root", ReasonOwner.ACTION),
    ("Reboot ASAP : reboot issued : reboot timed out", "alice", ReasonOwner.FOREIGN),   # an admin's reboot
])
def test_reason_owner(reason, writer, owner):
    assert reason_owner(reason, writer, "slurm") is owner


def test_unknown_slurm_user_never_makes_a_reason_slurms():
    assert reason_owner("Not responding", "slurm", None) is ReasonOwner.FOREIGN


@given(st.sampled_from(sorted(SLURM_OWN_REASONS)), st.text(min_size=1))
def test_slurm_reason_with_anything_appended_is_foreign(base, tail):
    text = base + " " + tail
    if " ".join(text.split()).lower() in SLURM_OWN_REASONS or parse_reason(text) is not None:
        return
    assert reason_owner(text, "slurm", "slurm") in (ReasonOwner.FOREIGN, ReasonOwner.NONE, ReasonOwner.GAVE_UP)
