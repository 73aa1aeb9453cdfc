"""Hang detection's progress watch and settings (issue 11): real files in tmp_path, a fake clock."""
import os
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from hpresilience.autoresume.progress import CHECKPOINT_RECHECK_SECONDS, Progress, ProgressWatch, attempt_heartbeat_file
from hpresilience.autoresume.settings import load_settings
from hpresilience.checkpoint import CheckpointDir, Heartbeat
from hpresilience.config import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def beat(path: Path, step: int) -> None:
    Heartbeat(path, min_interval=0).beat(step)


def settle(directory: Path) -> None:
    """Backdate the directory's mtime: a change within one kernel clock tick of the last one
    leaves mtime as it was (the watch's periodic re-read covers that; a test must not wait for it)."""
    os.utime(directory, (1, 1))


def watch(clock, heartbeat=None, checkpoints=None, **kw) -> ProgressWatch:
    return ProgressWatch(heartbeat, checkpoints, stall_seconds=60, startup_seconds=300, clock=clock, **kw)


def test_startup_allowance_before_the_first_signal(tmp_path, clock):
    """Startup plus one stall interval: the first signal may be a whole interval after startup
    (checkpoints as the only signal: issue 11 review)."""
    w = watch(clock, heartbeat=tmp_path / "hb.json")
    clock.now += 360
    assert w.poll() is None
    clock.now += 1
    why = w.poll()
    assert why is not None and "since the attempt started 361s ago" in why and "no heartbeat yet" in why
    assert w.progress == Progress(None, None)


def test_heartbeat_steps_keep_the_step_alive_then_a_stall_names_the_last_step(tmp_path, clock):
    hb = tmp_path / "hb.json"
    w = watch(clock, heartbeat=hb)
    clock.now += 250                       # long startup, within the allowance
    beat(hb, 4000)
    assert w.poll() is None
    for step in (4001, 4002):
        clock.now += 59
        beat(hb, step)
        assert w.poll() is None
    clock.now += 60
    beat(hb, 4002)                         # the same step again is not progress
    assert w.poll() is None
    clock.now += 1
    why = w.poll()
    assert why is not None and "no progress for 61s (limit 60s)" in why and "heartbeat step 4002, 61s ago" in why
    assert w.progress == Progress(heartbeat_step=4002)


def test_each_attempt_gets_a_fresh_heartbeat_file(tmp_path, clock):
    first = attempt_heartbeat_file(tmp_path, 7, "abc.0", 1)
    beat(first, 900)
    second = attempt_heartbeat_file(tmp_path, 7, "abc.0", 2)
    assert second != first and not second.exists()
    w = watch(clock, heartbeat=second)
    clock.now += 361
    assert "no heartbeat yet" in w.poll()           # attempt 1's beats are not attempt 2's progress
    # A step run again from attempt 1 (its count started over) finds no leftover either.
    assert attempt_heartbeat_file(tmp_path, 7, "abc.0", 1) == first and not first.exists()


def test_a_newer_checkpoint_is_progress_the_one_resumed_from_is_not(tmp_path, clock):
    ckpts = CheckpointDir(tmp_path / "ck")
    ckpts.save_file(100, "m", b"x")
    settle(ckpts.path)
    w = watch(clock, checkpoints=ckpts.path)
    assert w.progress == Progress(checkpoint_step=100)
    clock.now += 361
    why = w.poll()
    assert why is not None and "checkpoint step 100 (from before this attempt)" in why
    w = watch(clock, checkpoints=ckpts.path)
    clock.now += 200
    ckpts.save_file(200, "m", b"x")
    assert w.poll() is None
    clock.now += 61
    assert "checkpoint step 200, 61s ago" in w.poll()
    assert w.progress == Progress(checkpoint_step=200)


def test_the_checkpoint_directory_is_reread_only_when_it_changes(tmp_path, clock):
    ckpts = CheckpointDir(tmp_path / "ck")
    ckpts.save_file(100, "m", b"x")
    (ckpts.path / "step-000000300").mkdir()        # no marker: latest() logs it as skipped each read
    settle(ckpts.path)
    with capture_logs() as logs:
        w = watch(clock, checkpoints=ckpts.path)
        for _ in range(5):
            clock.now += 1
            w.poll()
        reads = sum(e["event"] == "checkpoint.skipped" for e in logs)
        clock.now += CHECKPOINT_RECHECK_SECONDS
        w.poll()                                   # the safety re-read (NFS attribute cache, coarse mtime)
        after_recheck = sum(e["event"] == "checkpoint.skipped" for e in logs)
        ckpts.save_file(200, "m", b"x")            # a rename into the directory: read at the next poll
        clock.now += 1
        w.poll()
    assert (reads, after_recheck) == (1, 2)
    assert w.progress == Progress(checkpoint_step=200)


def test_a_checkpoint_directory_that_disappears_is_said_once_and_the_heartbeat_goes_on(tmp_path, clock):
    ckpts, hb = CheckpointDir(tmp_path / "ck"), tmp_path / "hb.json"
    ckpts.save_file(100, "m", b"x")
    w = watch(clock, heartbeat=hb, checkpoints=ckpts.path)
    beat(hb, 101)
    assert w.poll() is None and w.warnings() == []
    shutil.rmtree(ckpts.path)
    for step in (102, 103):
        clock.now += 30
        beat(hb, step)
        assert w.poll() is None
    warnings = w.warnings()
    assert len(warnings) == 1 and "checkpoint directory" in warnings[0] and "heartbeat only" in warnings[0]
    clock.now += 61
    why = w.poll()
    assert why is not None and "heartbeat step 103, 61s ago" in why and w.warnings() == []
    assert w.progress == Progress(heartbeat_step=103, checkpoint_step=100)


def test_a_checkpoint_directory_not_created_yet_is_no_warning(tmp_path, clock):
    w = watch(clock, checkpoints=tmp_path / "later")
    clock.now += 1
    assert w.poll() is None and w.warnings() == []
    CheckpointDir(tmp_path / "later").save_file(5, "m", b"x")
    clock.now += 1
    assert w.poll() is None and w.progress == Progress(checkpoint_step=5)


@pytest.mark.parametrize("content", [b"{not json", b'{"step": -3}', b'{"step": "12"}', b"[1, 2]"])
def test_an_unreadable_heartbeat_is_not_progress_and_said_once(tmp_path, clock, content):
    hb = tmp_path / "hb.json"
    hb.write_bytes(content)
    w = watch(clock, heartbeat=hb)
    for _ in range(2):
        clock.now += 200
        w.poll()
    warnings = w.warnings()
    assert len(warnings) == 1 and str(hb) in warnings[0]
    assert w.progress == Progress(None, None)


def test_progress_beyond_an_earlier_stall():
    assert Progress(1250, 1100).beyond(Progress(1200, 1100))
    assert Progress(None, 1200).beyond(Progress(1200, 1100))
    assert Progress(5, None).beyond(Progress())
    assert not Progress(1150, 1100).beyond(Progress(1200, 1100))   # resumed at 1100, stalled before 1200
    assert not Progress(None, 1100).beyond(Progress(1200, 1100))
    assert not Progress().beyond(Progress())


def test_a_watch_needs_a_signal():
    with pytest.raises(ValueError, match="heartbeat file or a checkpoint directory"):
        ProgressWatch(None, None)


# ---------------------------------------------------------------- settings

def test_hang_settings_default_off_and_from_the_environment():
    settings = load_settings({})
    assert settings.hang_seconds is None and settings.node_check_argv() is None
    settings = load_settings({"HPR_AUTO_RESUME_HANG_SECONDS": "900", "HPR_AUTO_RESUME_HANG_STARTUP_SECONDS": "120",
                              "HPR_AUTO_RESUME_NODE_CHECK_TIMEOUT_SECONDS": "30",
                              "HPR_AUTO_RESUME_NODE_CHECK_COMMAND": "hpresilience deepcheck --only 'gpu mem'"})
    assert (settings.hang_seconds, settings.hang_startup_seconds, settings.node_check_timeout_seconds) == (900, 120, 30)
    assert settings.node_check_argv() == ["hpresilience", "deepcheck", "--only", "gpu mem"]


def test_hang_settings_from_the_file(tmp_path):
    path = tmp_path / "ar.toml"
    path.write_text('[auto_resume]\nhang_seconds = 600\nnode_check_command = "check --quick"\n')
    settings = load_settings({"HPR_AUTO_RESUME_CONFIG": str(path)})
    assert settings.hang_seconds == 600 and settings.node_check_argv() == ["check", "--quick"]


@pytest.mark.parametrize("var, value, message", [
    ("HPR_AUTO_RESUME_HANG_SECONDS", "0", "hang_seconds must be > 0"),
    ("HPR_AUTO_RESUME_HANG_SECONDS", "nan", "hang_seconds must be > 0"),
    ("HPR_AUTO_RESUME_HANG_SECONDS", "ten", "expected float"),
    ("HPR_AUTO_RESUME_HANG_STARTUP_SECONDS", "-1", "hang_startup_seconds"),
    ("HPR_AUTO_RESUME_NODE_CHECK_TIMEOUT_SECONDS", "0", "node_check_timeout_seconds"),
    ("HPR_AUTO_RESUME_NODE_CHECK_COMMAND", "check 'unclosed", "No closing quotation"),
    ("HPR_AUTO_RESUME_NODE_CHECK_COMMAND", "  ", "node_check_command is empty"),
])
def test_bad_hang_settings_are_clear_errors(var, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({var: value})

