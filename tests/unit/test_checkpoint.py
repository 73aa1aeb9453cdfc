"""hpresilience.checkpoint on real files: atomic saves, what latest() trusts, crashes mid-write, the CLI."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from hpresilience.checkpoint import (
    MARKER,
    PROGRESS_FILE_ENV,
    Checkpoint,
    CheckpointDir,
    CheckpointError,
    Heartbeat,
    heartbeat,
)
from hpresilience.cli import main

REPO = Path(__file__).resolve().parents[2]


def names(path: Path):
    return sorted(p.name for p in path.iterdir())


def skipped(logs):
    return {Path(e["path"]).name: e["reason"] for e in logs if e["event"] == "checkpoint.skipped"}


# ---------------------------------------------------------------- saving and finding
def test_save_then_latest_round_trip(tmp_path):
    d = CheckpointDir(tmp_path / "ckpt")
    assert d.latest() is None and d.list() == []          # the directory does not exist yet
    before = time.time()
    with d.save(100) as tmp:
        assert tmp.parent == d.path and tmp.name.startswith(f".tmp-step-000000100-{os.getpid()}-")
        assert list(tmp.iterdir()) == []
        (tmp / "model.pt").write_bytes(b"weights" * 100)
        (tmp / "shards").mkdir()
        (tmp / "shards" / "0.bin").write_bytes(b"")
    found = d.latest()
    assert found == Checkpoint(step=100, path=d.path / "step-000000100", time=found.time)
    assert before <= found.time <= time.time()
    assert (found.path / "model.pt").read_bytes() == b"weights" * 100
    assert names(d.path) == ["step-000000100"]                # no temporary left
    marker = json.loads((found.path / MARKER).read_text())
    assert marker["format"] == 1 and marker["step"] == 100 and marker["time"] == found.time
    assert marker["files"] == {"model.pt": 700, "shards/0.bin": 0}


def test_save_file_and_list_oldest_first(tmp_path):
    d = CheckpointDir(tmp_path, keep=None)
    for step in (30, 2, 1000000000):                          # beyond 9 digits still works
        assert d.save_file(step, "state.bin", str(step).encode()).step == step
    assert [c.step for c in d.list()] == [2, 30, 1000000000]
    assert d.latest().path.name == "step-1000000000"


def test_keep_prunes_to_the_newest_complete(tmp_path):
    d = CheckpointDir(tmp_path, keep=2)
    (tmp_path / "step-000000001").mkdir()                     # no marker: not ours, never pruned
    for step in range(2, 7):
        d.save_file(step, "m", b"x")
    assert [c.step for c in d.list()] == [5, 6]
    assert names(tmp_path) == ["step-000000001", "step-000000005", "step-000000006"]


def test_custom_prefix_and_shared_directory(tmp_path):
    a, b = CheckpointDir(tmp_path, prefix="actor-", keep=1), CheckpointDir(tmp_path, prefix="critic-", keep=1)
    a.save_file(1, "m", b"a1")
    b.save_file(5, "m", b"b5")
    a.save_file(2, "m", b"a2")
    assert a.latest().path.name == "actor-000000002" and b.latest().path.name == "critic-000000005"
    assert names(tmp_path) == ["actor-000000002", "critic-000000005"]
    (tmp_path / ".tmp-actor-000000003-77-x").mkdir()           # another run's crashed save...
    (tmp_path / ".tmp-000000003-77-x").mkdir()                 # ...and one of a run without prefix
    assert CheckpointDir(tmp_path, prefix="").cleanup_partial(0) == [tmp_path / ".tmp-000000003-77-x"]
    assert CheckpointDir(tmp_path, prefix="act").cleanup_partial(0) == []
    assert ".tmp-actor-000000003-77-x" in names(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        CheckpointDir(tmp_path, keep=0)
    with pytest.raises(ValueError):
        CheckpointDir(tmp_path, prefix="a/b")
    d = CheckpointDir(tmp_path)
    for step in (-1, 1.5, "3", True):
        with pytest.raises(CheckpointError):
            d.save_file(step, "m", b"")
    with pytest.raises(CheckpointError, match="reserved"):
        d.save_file(1, MARKER, b"mine")
    with pytest.raises(CheckpointError, match="symlinks"):
        with d.save(2) as tmp:
            (tmp / "link").symlink_to("/etc/hostname")
    assert names(tmp_path) == []


# ---------------------------------------------------------------- what latest() does not trust
def test_partial_temp_dir_and_unmarked_dir_ignored(tmp_path):
    d = CheckpointDir(tmp_path)
    d.save_file(1, "m", b"one")
    (tmp_path / ".tmp-step-000000003-999-abc").mkdir()            # a save in progress
    (tmp_path / ".tmp-step-000000003-999-abc" / "m").write_bytes(b"half")
    (tmp_path / "step-000000002").mkdir()                           # renamed by something else, no marker
    (tmp_path / "step-000000002" / "m").write_bytes(b"two")
    (tmp_path / "step-2").mkdir()                                   # not the canonical name
    (tmp_path / "notes.txt").write_text("hi")
    with capture_logs() as logs:
        assert d.latest().step == 1
    assert "no COMPLETE marker" in skipped(logs)["step-000000002"]
    assert [c.step for c in d.list()] == [1]


@pytest.mark.parametrize("content, reason", [
    (b'{"format": 1, "step": 2, "time": 1', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"format": 99, "step": 2, "time": 1, "files": {}}', "format 99"),
    (b'{"format": 1, "step": 3, "time": 1, "files": {}}', "says step 3"),
    (b'{"format": 1, "step": 2, "files": {}}', "lacks a time"),
    (b'{"format": 1, "step": 2, "time": 1, "files": {"../../etc/passwd": 1}}', "bad entry"),
])
def test_corrupt_marker_ignored(tmp_path, content, reason):
    d = CheckpointDir(tmp_path)
    d.save_file(1, "m", b"one")
    d.save_file(2, "m", b"two")
    (tmp_path / "step-000000002" / MARKER).write_bytes(content)
    with capture_logs() as logs:
        assert d.latest().step == 1
    assert reason in skipped(logs)["step-000000002"]


def test_truncated_or_missing_file_ignored_previous_returned(tmp_path):
    d = CheckpointDir(tmp_path)
    d.save_file(1, "model.pt", b"a" * 4096)
    d.save_file(2, "model.pt", b"b" * 4096)
    d.save_file(3, "model.pt", b"c" * 4096)
    os.truncate(tmp_path / "step-000000003" / "model.pt", 1000)
    (tmp_path / "step-000000002" / "model.pt").unlink()
    with capture_logs() as logs:
        found = d.latest()
    assert found.step == 1 and (found.path / "model.pt").read_bytes() == b"a" * 4096
    reasons = skipped(logs)
    assert "1000 bytes, the marker says 4096" in reasons["step-000000003"]
    assert "missing" in reasons["step-000000002"]


def test_exception_inside_save_leaves_nothing(tmp_path):
    d = CheckpointDir(tmp_path)
    d.save_file(1, "m", b"one")
    with pytest.raises(RuntimeError, match="out of memory"):
        with d.save(2) as tmp:
            (tmp / "m").write_bytes(b"partial")
            raise RuntimeError("CUDA out of memory")
    with pytest.raises(KeyboardInterrupt):
        with d.save(3) as tmp:
            (tmp / "m").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert names(tmp_path) == ["step-000000001"]
    assert d.latest().step == 1


# ---------------------------------------------------------------- the same step again
def test_resaving_a_step_replaces_it(tmp_path):
    d = CheckpointDir(tmp_path, keep=2)
    d.save_file(1, "m", b"one")
    d.save_file(2, "m", b"first")
    d.save_file(2, "m", b"second, longer")          # a restarted job saving the step it resumed from
    assert [c.step for c in d.list()] == [1, 2]
    assert (d.latest().path / "m").read_bytes() == b"second, longer"
    assert names(tmp_path) == ["step-000000001", "step-000000002"]
    (tmp_path / "step-000000002" / MARKER).unlink()   # a broken copy is replaced as well
    d.save_file(2, "m", b"third")
    assert (d.latest().path / "m").read_bytes() == b"third"


def test_writer_killed_between_the_two_renames_of_a_resave(tmp_path):
    """The state a writer leaves when it dies after moving the old copy aside: that copy still counts."""
    d = CheckpointDir(tmp_path, keep=1)
    d.save_file(7, "m", b"old seven")
    aside = tmp_path / ".replaced-step-000000007-4242-0a0b0c0d"
    os.rename(tmp_path / "step-000000007", aside)
    (tmp_path / ".tmp-step-000000007-4242-zz").mkdir()
    assert d.latest() == Checkpoint(7, aside, d.latest().time)
    assert d.cleanup_partial(older_than_seconds=3600) == []       # young: a writer may be at work
    assert sorted(p.name for p in d.cleanup_partial(older_than_seconds=0)) == \
        [".replaced-step-000000007-4242-0a0b0c0d", ".tmp-step-000000007-4242-zz"]
    assert names(tmp_path) == ["step-000000007"]                 # renamed back, temp removed
    assert (d.latest().path / "m").read_bytes() == b"old seven"
    # when the new copy did land, the old one is just removed
    d.save_file(8, "m", b"eight")
    (tmp_path / ".replaced-step-000000008-1-ff").mkdir()
    d.cleanup_partial(older_than_seconds=0)
    assert names(tmp_path) == ["step-000000008"]


# ---------------------------------------------------------------- real crashes
def child(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "from hpresilience.log import configure; configure(level='warning')\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    proc = child("""
        import sys, time
        from hpresilience.checkpoint import CheckpointDir
        d = CheckpointDir(sys.argv[1])
        d.save_file(1, "model.pt", b"one" * 1000)
        with d.save(2) as tmp:
            with open(tmp / "model.pt", "wb") as f:
                f.write(b"two" * 100000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """, str(tmp_path))
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    d = CheckpointDir(tmp_path)
    found = d.latest()
    assert found.step == 1 and (found.path / "model.pt").read_bytes() == b"one" * 1000
    leftovers = [n for n in names(tmp_path) if n.startswith(f".tmp-step-000000002-{proc.pid}-")]
    assert len(leftovers) == 1
    assert d.cleanup_partial(older_than_seconds=3600) == []
    assert d.cleanup_partial(older_than_seconds=0) == [tmp_path / leftovers[0]]
    assert names(tmp_path) == ["step-000000001"]


def test_sigkill_at_random_moments_never_yields_a_bad_checkpoint(tmp_path):
    """A writer saving as fast as it can, killed at random points (mid-file, mid-marker, mid-rename,
    mid-prune): latest() is always a checkpoint whose content is exactly what was saved."""
    script = """
        import sys
        from hpresilience.checkpoint import CheckpointDir
        d = CheckpointDir(sys.argv[1], keep=2)
        d.cleanup_partial(0)
        last = d.latest()
        step = last.step + 1 if last else 1
        while True:
            with d.save(step) as tmp:
                (tmp / "model.pt").write_bytes(bytes([step % 256]) * (20000 + step * 37))
                (tmp / "meta.json").write_text('{"step": %d}' % step)
            print(step, flush=True)
            step += 1
    """
    rng = random.Random(5)
    d = CheckpointDir(tmp_path, keep=2)
    reported = 0
    for _ in range(8):
        proc = child(script, str(tmp_path))
        try:
            reported = int(proc.stdout.readline())                  # at least one save in this run
            time.sleep(rng.uniform(0, 0.03))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        found = d.latest()
        assert found is not None and found.step >= reported
        for c in d.list():
            assert (c.path / "model.pt").read_bytes() == bytes([c.step % 256]) * (20000 + c.step * 37)
            assert json.loads((c.path / "meta.json").read_text()) == {"step": c.step}
    assert d.latest().step > 8


# ---------------------------------------------------------------- the CLI
def run(*args):
    """stdout and stderr apart (click 8.2+ always keeps them apart; 8.1 needs mix_stderr=False)."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, ["checkpoint", *args])


def test_cli_latest_and_list(tmp_path):
    d = CheckpointDir(tmp_path, keep=None)
    for step in (10, 20):
        d.save_file(step, "m", b"x")
    (tmp_path / "step-000000030").mkdir()                      # unmarked: skipped, said on stderr

    result = run("latest", str(tmp_path))
    assert result.exit_code == 0 and result.stdout == f"{tmp_path}/step-000000020\n"
    assert "checkpoint.skipped" in result.stderr and "step-000000030" in result.stderr

    result = run("latest", str(tmp_path), "--json")
    out = json.loads(result.stdout)
    assert out["step"] == 20 and out["path"] == str(tmp_path / "step-000000020") and out["time"] > 0

    result = run("list", str(tmp_path))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [str(tmp_path / "step-000000010"), str(tmp_path / "step-000000020")]
    assert [c["step"] for c in json.loads(run("list", "--json", str(tmp_path)).stdout)] == [10, 20]


def test_cli_prefix_and_relative_path(tmp_path, monkeypatch):
    CheckpointDir(tmp_path / "ck", prefix="ep").save_file(3, "m", b"x")
    monkeypatch.chdir(tmp_path)
    result = run("latest", "ck", "--prefix", "ep")
    assert result.exit_code == 0 and result.stdout == f"{tmp_path}/ck/ep000000003\n"   # absolute, for scripts
    assert run("latest", "ck").exit_code == 1                   # default prefix step-: nothing


def test_cli_nothing_to_find(tmp_path):
    result = run("latest", str(tmp_path / "missing"))
    assert result.exit_code == 1 and result.stdout == "" and "does not exist" in result.stderr
    result = run("latest", str(tmp_path))
    assert result.exit_code == 1 and "holds no complete checkpoint" in result.stderr
    result = run("list", str(tmp_path))
    assert result.exit_code == 0 and result.stdout == ""
    assert run("list", "--json", str(tmp_path)).stdout == "[]\n"
    (tmp_path / "file").write_text("")
    result = run("latest", str(tmp_path / "file"))
    assert result.exit_code == 2 and "not a directory" in result.stderr


# ---------------------------------------------------------------- heartbeat (issue 11, hang detection)

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def beat_step(path: Path) -> int:
    return json.loads(path.read_text())["step"]


def test_heartbeat_writes_the_first_beat_then_at_most_once_per_interval(tmp_path):
    clock, path = FakeClock(), tmp_path / "hb.json"
    beats = Heartbeat(path, min_interval=1.0, clock=clock)
    assert beats.beat(1) is True
    data = json.loads(path.read_text())
    assert data["step"] == 1 and data["pid"] == os.getpid() and data["host"] and data["at"] > 0
    clock.now += 0.5
    assert beats.beat(2) is False and beat_step(path) == 1    # within the interval: no write
    clock.now += 0.5
    assert beats.beat(3) is True and beat_step(path) == 3
    assert names(tmp_path) == ["hb.json"]                     # the temporary file was renamed over it


def test_heartbeat_follows_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "hb.json"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    heartbeat(7)
    assert beat_step(path) == 7
    monkeypatch.delenv(PROGRESS_FILE_ENV)
    path.unlink()
    with pytest.raises(ValueError):       # it ran (it checked the step) ...
        heartbeat(-1)
    heartbeat(8)
    assert names(tmp_path) == []          # ... and wrote nothing without the variable


@pytest.mark.parametrize("step, error", [(1.5, TypeError), ("3", TypeError), (True, TypeError), (None, TypeError),
                                         (-1, ValueError)])
def test_heartbeat_refuses_a_bad_step(tmp_path, step, error):
    with pytest.raises(error, match="non-negative integer"):
        Heartbeat(tmp_path / "hb.json").beat(step)
    assert names(tmp_path) == []


def test_heartbeat_never_raises_on_an_unwritable_file_and_warns_once(tmp_path):
    clock = FakeClock()
    beats = Heartbeat(tmp_path / "gone" / "hb.json", clock=clock)
    with capture_logs() as logs:
        assert beats.beat(1) is False
        clock.now += 5
        assert beats.beat(2) is False
    assert [e["event"] for e in logs] == ["checkpoint.heartbeat_failed"]
