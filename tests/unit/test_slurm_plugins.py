"""The prolog/epilog pair and the health-check program in slurm_plugins/ (issue 10): what they pass
to `hpresilience` and how its exit status becomes theirs. `hpresilience` here is a stand-in on PATH
that records its arguments and exits as told (the real command is tested in test_deepcheck_*.py;
the real prolog through slurmd is measured in docs/deep-checks.md)."""
import os
import subprocess
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "slurm_plugins"


def run(script: str, tmp_path: Path, exit_status: int, **env: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "hpresilience"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "a report"\nexit {exit_status}\n')
    fake.chmod(0o755)
    log = tmp_path / "out.log"
    proc = subprocess.run([str(PLUGINS / script)], env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                                                          "HPR_DEEPCHECK_LOG": str(log), **env},
                          capture_output=True, text=True, timeout=30)
    return proc.returncode, (tmp_path / "args").read_text().split(), log


@pytest.mark.parametrize("check,prolog,epilog", [(0, 0, 0), (1, 1, 0), (2, 0, 0), (127, 0, 0)])
def test_only_an_applied_failure_fails_the_prolog_and_never_the_epilog(tmp_path, check, prolog, epilog):
    rc, args, log = run("hpresilience-prolog", tmp_path, check)
    assert rc == prolog and args[:4] == ["deepcheck", "--apply", "--level", "quick"]
    assert "a report" in log.read_text()                       # the output goes to the log
    rc, _, _ = run("hpresilience-epilog", tmp_path, check)
    assert rc == epilog


def test_the_config_is_passed_only_when_given(tmp_path):
    """An explicit --config must exist; without HPR_AGENT_CONFIG the default file applies if it exists
    (passing /etc/hpresilience/agent.toml explicitly made every run fail "file not found")."""
    for script in ("hpresilience-prolog", "hpresilience-epilog", "hpresilience-healthcheck"):
        _, args, _ = run(script, tmp_path, 0)
        assert "--config" not in args, script
        _, args, _ = run(script, tmp_path, 0, HPR_AGENT_CONFIG="/site/agent.toml")
        assert args[-2:] == ["--config", "/site/agent.toml"], script


def test_level_and_arguments_come_from_the_environment(tmp_path):
    _, args, _ = run("hpresilience-prolog", tmp_path, 0, HPR_DEEPCHECK_LEVEL="standard",
                     HPR_DEEPCHECK_ARGS="--only gpu_count --only dcgm")
    assert args == ["deepcheck", "--apply", "--level", "standard", "--only", "gpu_count", "--only", "dcgm"]
    assert os.access(PLUGINS / "hpresilience-epilog", os.X_OK)
