"""srun command-line handling of the auto-resume shim, settings and attempt state."""
from __future__ import annotations

import pytest

from hpresilience.autoresume.allocation import why_bad
from hpresilience.autoresume.settings import load_settings
from hpresilience.autoresume.shim import find_real_srun
from hpresilience.autoresume.srun_args import UsageError, parse
from hpresilience.autoresume.state import AttemptState
from hpresilience.config import ConfigError
from hpresilience.slurm import Node


@pytest.mark.parametrize("argv, flag, program", [
    (["--auto-resume=1", "-N2", "python", "t.py"], True, ["python", "t.py"]),
    (["--auto-resume", "python", "t.py"], True, ["python", "t.py"]),
    (["--auto-resume=0", "python"], False, ["python"]),
    (["-N", "2", "train.sh", "--auto-resume=1"], None, ["train.sh", "--auto-resume=1"]),
    (["--nodes", "2", "--auto-resume=1", "--", "-weird-name"], True, ["-weird-name"]),
    (["-lK", "-w", "n[1-2]", "--auto-resume=7", "hostname"], True, ["hostname"]),
])
def test_flag_only_before_the_program_is_ours(argv, flag, program):
    cmd = parse(argv)
    assert cmd.auto_resume is flag
    assert cmd.program == program


@pytest.mark.parametrize("bad", ["--auto-resume=abc", "--auto-resume=", "--auto-resume=-1"])
def test_bad_auto_resume_values_are_usage_errors(bad):
    with pytest.raises(UsageError, match="--auto-resume"):
        parse([bad, "hostname"])


def test_retry_replaces_node_selection_and_keeps_everything_else():
    cmd = parse(["--auto-resume=1", "-N", "3", "-w", "n[1-3]", "--exclude=n9", "-l", "--ntasks-per-node=1",
                 "-J", "train", "python", "t.py", "-N", "5"])
    assert cmd.nodes == 3
    assert cmd.argv(["n1", "n4"]) == ["-l", "--ntasks-per-node=1", "-Jtrain", "--nodes=2", "--nodelist=n[1,4]",
                                      "python", "t.py", "-N", "5"]
    assert cmd.argv() == ["-N3", "-wn[1-3]", "--exclude=n9", "-l", "--ntasks-per-node=1", "-Jtrain", "python",
                          "t.py", "-N", "5"]


def test_missing_option_value_is_an_error():
    with pytest.raises(UsageError, match="-N needs a value"):
        parse(["--auto-resume", "-N"])


def test_settings_from_environment_and_bad_values(tmp_path):
    s = load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "5", "HPR_CHECKPOINT_DIR": "/ck"})
    assert (s.max_attempts, s.checkpoint_dir) == (5, "/ck")
    with pytest.raises(ConfigError, match="HPR_AUTO_RESUME_MAX_ATTEMPTS"):
        load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match="max_attempts"):
        load_settings({"HPR_AUTO_RESUME_MAX_ATTEMPTS": "0"})
    conf = tmp_path / "ar.toml"
    conf.write_text("[auto_resume]\nmax_attempts = 4\npoll_seconds = 0.5\n")
    assert load_settings({"HPR_AUTO_RESUME_CONFIG": str(conf)}).max_attempts == 4
    conf.write_text("[auto_resume]\nmax_atempts = 4\n")
    with pytest.raises(ConfigError, match="max_atempts"):
        load_settings({"HPR_AUTO_RESUME_CONFIG": str(conf)})


def test_attempt_state_survives_a_reload_and_rejects_garbage(tmp_path):
    state = AttemptState.load(tmp_path, 42)
    assert state.attempts == 0
    state.attempts = 2
    state.note("requeue", why="batch host failed")
    state.save(tmp_path)
    again = AttemptState.load(tmp_path, 42)
    assert again.attempts == 2 and again.history[0]["event"] == "requeue"
    AttemptState.path(tmp_path, 43).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable auto-resume state"):
        AttemptState.load(tmp_path, 43)


@pytest.mark.parametrize("node, bad", [
    (Node("n1", "IDLE"), False),
    (Node("n1", "ALLOCATED", frozenset({"FAIL"}), reason="Action: Replace"), True),
    (Node("n1", "ALLOCATED", reason="Action: Reboot"), True),   # reason first, state not yet
    (Node("n1", "MIXED", frozenset({"DRAIN"}), reason="admin"), True),
    (Node("n1", "ALLOCATED", frozenset({"NOT_RESPONDING"})), True),
    (Node("n1", "DOWN", reason="Not responding"), True),
    (Node("n1", "ALLOCATED", frozenset({"COMPLETING"})), False),
])
def test_which_nodes_are_bad_for_a_step(node, bad):
    assert (why_bad(node) is not None) is bad


def test_the_shim_never_finds_itself(tmp_path):
    shim_dir, real_dir = tmp_path / "shim", tmp_path / "real"
    shim_dir.mkdir()
    real_dir.mkdir()
    (shim_dir / "srun").write_text("#!/bin/sh\n# hpresilience-srun-shim\n")
    (real_dir / "srun").write_text("#!/bin/sh\necho real\n")
    for p in (shim_dir / "srun", real_dir / "srun"):
        p.chmod(0o755)
    assert find_real_srun({"PATH": f"{shim_dir}:{real_dir}"}) == str(real_dir / "srun")
    assert find_real_srun({"PATH": str(shim_dir)}) is None


SHIM = __import__("pathlib").Path(__file__).resolve().parents[2] / "scripts" / "srun"


def test_shell_shim_hands_over_argv_stdin_and_exit_status(tmp_path):
    import subprocess
    real = tmp_path / "bin" / "srun"
    real.parent.mkdir()
    real.write_text('#!/bin/sh\nprintf "%s|" "$@"; /bin/cat; exit 7\n')
    real.chmod(0o755)
    env = {"PATH": f"{SHIM.parent}:{real.parent}"}
    proc = subprocess.run([str(SHIM), "-N2", "a b", "--label"], input=b"from stdin", capture_output=True, env=env,
                          timeout=10)
    assert (proc.returncode, proc.stdout) == (7, b"-N2|a b|--label|from stdin")
    alone = subprocess.run([str(SHIM), "x"], capture_output=True, env={"PATH": f"{SHIM.parent}:{tmp_path}"}, timeout=10)
    assert alone.returncode == 127 and b"no srun found" in alone.stderr
