import pytest

from hpresilience.slurm.reason import (
    MAX_REASON_LEN,
    Action,
    ActionReason,
    format_reason,
    is_ours,
    parse_reason,
    sanitize_reason,
)


@pytest.mark.parametrize("text, action, detail", [
    ("Action: Reboot", Action.REBOOT, ""),
    ("Action: Replace", Action.REPLACE, ""),
    ("Action:Replace", Action.REPLACE, ""),                       # HyperPod's spelling
    ("action:reboot", Action.REBOOT, ""),
    ("ACTION :  REPLACE", Action.REPLACE, ""),
    ("  Action: Replace; XID 74 NVLink error on GPU 3", Action.REPLACE, "XID 74 NVLink error on GPU 3"),
    ("Action: Reboot;XID 73", Action.REBOOT, "XID 73"),
    ("Action: Reboot - hung task", Action.REBOOT, "hung task"),
    ("Action: Replace; detail [root@2026-11-22T11:12:36]", Action.REPLACE, "detail"),  # Slurm's stamp
    ("Action: Reboot [slurm@2026-01-02T03:04:05]", Action.REBOOT, ""),
])
def test_parse_ours(text, action, detail):
    assert parse_reason(text) == ActionReason(action, detail)
    assert is_ours(text)


@pytest.mark.parametrize("text", [
    None, "", "admin: bad fan", "NHC: check_gpu failed", "Not responding", "Node unexpectedly rebooted",
    "Reboot ASAP", "Action: Rebooting soon", "Action: Repair", "My Action: Replace", "Action Replace",
    "Kill task failed",
])
def test_parse_not_ours(text):
    assert parse_reason(text) is None
    assert not is_ours(text)


def test_format_round_trip():
    for action in Action:
        for detail in ("", "XID 79 GPU fell off the bus (0000:b9:00)"):
            assert parse_reason(format_reason(action, detail)) == ActionReason(action, detail)


def test_format_exact_shape():
    assert format_reason(Action.REPLACE, "XID 74 on GPU 3") == "Action: Replace; XID 74 on GPU 3"
    assert format_reason(Action.REBOOT) == "Action: Reboot"
    assert str(ActionReason(Action.REBOOT, "hung task")) == "Action: Reboot; hung task"


def test_sanitize_newlines_and_controls():
    assert sanitize_reason("a\nb\r\nc\td\x00e\x7f") == "a b c d e"
    assert "\n" not in format_reason(Action.REBOOT, "line1\nline2")


def test_sanitize_bounds_length():
    long = format_reason(Action.REPLACE, "x" * 1000)
    assert len(long) == MAX_REASON_LEN
    assert long.endswith("...")
    assert parse_reason(long).action is Action.REPLACE


def test_action_parse_names_bad_input():
    with pytest.raises(ValueError, match="'fix'"):
        Action.parse("fix")
