"""slurm_plugins/job_submit.lua in the real slurmctld (JobSubmitPlugins=lua, set up by
`testcluster up`), and the srun shim that `testcluster env` puts first on PATH.

Jobs whose script is only inspected are submitted held (-H): the plugin runs at
submission, and nothing of auto-resume itself needs to run here."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from .conftest import REPO, LiveCluster, private_cluster, wait_until

PORT_BASE = 26000
MARK = "hpr-auto-resume"
FIX = "add `#SBATCH --exclusive`"


@pytest.fixture(scope="module")
def jc(tmp_path_factory):
    """A small cluster of this module's own (its dir and ports)."""
    with private_cluster(tmp_path_factory, "jobsubmit", 2, PORT_BASE) as c:
        yield c


def cluster_env(c: LiveCluster) -> Dict[str, str]:
    """os.environ after `eval "$(testcluster env)"`."""
    env = dict(os.environ)
    for line in c.tc("env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0]
    return env


def submit(c: LiveCluster, script: str, *options: str) -> subprocess.CompletedProcess:
    """sbatch a held job with `script` as its batch script (on stdin)."""
    return subprocess.run(["sbatch", "--parsable", "-H", "-o", "/dev/null", *options], input=script,
                          capture_output=True, text=True, env=cluster_env(c), timeout=60)


def job_fields(c: LiveCluster, job: str) -> Dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True,
                         env=cluster_env(c), timeout=30).stdout
    fields = dict(re.findall(r"\b(Requeue|OverSubscribe|JobState|ExitCode)=(\S+)", out))
    comment = re.search(r"^\s*Comment=(.*)$", out, re.M)
    fields["Comment"] = comment.group(1).strip() if comment else ""
    return fields


def accepted(c: LiveCluster, script: str, *options: str) -> Dict[str, str]:
    proc = submit(c, script, *options)
    assert proc.returncode == 0, proc.stderr
    return job_fields(c, proc.stdout.strip().split(";")[0])


def test_plugin_is_configured(jc):
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True,
                         env=cluster_env(jc), timeout=30).stdout
    assert re.search(r"^JobSubmitPlugins\s*=\s*lua$", out, re.M)
    lua = jc.dir / "etc" / "job_submit.lua"
    assert lua.resolve() == REPO / "slurm_plugins" / "job_submit.lua"
    assert "error" not in "\n".join(line for line in (jc.dir / "ctld" / "slurmctld.log").read_text().splitlines()
                                    if "lua" in line.lower())


@pytest.mark.parametrize("line", [
    "srun --auto-resume=1 python train.py",
    "srun --auto-resume python train.py",
    "srun -N 2 --ntasks-per-node 1 --auto-resume=3 python train.py --steps 10",
    "srun -N2 \\\n    --auto-resume=1 \\\n    python train.py",
    "exec /usr/local/bin/srun --auto-resume=1 train.sh",
    "if true; then srun --auto-resume=1 train.sh; fi",
])
def test_exclusive_auto_resume_job_is_made_requeueable_and_marked(jc, line):
    # --no-requeue shows that the plugin turned requeue on (the cluster default is on anyway).
    fields = accepted(jc, f"#!/bin/sh\n#SBATCH --exclusive\n#SBATCH -N 2\n{line}\n", "--no-requeue")
    assert fields["Requeue"] == "1" and fields["OverSubscribe"] == "NO"
    assert fields["Comment"] == MARK


def test_user_comment_is_kept(jc):
    fields = accepted(jc, "#!/bin/sh\nsrun --auto-resume=1 train.sh\n", "--exclusive", "--comment", "run 7 of sweep")
    assert fields["Comment"] == f"run 7 of sweep {MARK}"


def test_no_requeue_is_overridden_with_a_note(jc):
    proc = submit(jc, "#!/bin/sh\nsrun --auto-resume train.sh\n", "--exclusive", "--no-requeue")
    assert proc.returncode == 0 and "requeue turned on" in proc.stderr


@pytest.mark.parametrize("options, why", [
    ((), ""),
    (("--oversubscribe",), "--oversubscribe"),
    (("--exclusive=user",), "--exclusive=user"),
])
def test_non_exclusive_auto_resume_job_is_rejected_with_the_fix(jc, options, why):
    proc = submit(jc, "#!/bin/sh\n#SBATCH -N 2\nsrun --auto-resume=1 python train.py\n", *options)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "srun --auto-resume needs the job's nodes to itself" in proc.stderr
    assert FIX in proc.stderr and why in proc.stderr
    print(proc.stderr)


def test_bad_auto_resume_value_is_rejected(jc):
    proc = submit(jc, "#!/bin/sh\nsrun --auto-resume=abc train.sh\n", "--exclusive")
    assert proc.returncode != 0
    assert "--auto-resume=abc: expected --auto-resume, --auto-resume=1 or --auto-resume=0" in proc.stderr


@pytest.mark.parametrize("script", [
    "#!/bin/sh\nsrun --auto-resume=0 python train.py\n",
    "#!/bin/sh\n# srun --auto-resume python train.py\nsrun python train.py\n",
    "#!/bin/sh\n    #srun --auto-resume=1 python train.py\n",
    "#!/bin/sh\nsrun python train.py  # try --auto-resume later\n",
    "#!/bin/sh\nsrun -N2 train.sh --auto-resume\n",  # the program's flag, not srun's
    "#!/bin/sh\necho 'srun --auto-resume=1 train.sh'\n",
    "#!/bin/sh\nsrun hostname\n",
])
def test_jobs_without_auto_resume_pass_unchanged(jc, script):
    """Not exclusive, --no-requeue and a comment of its own: all left as they are."""
    fields = accepted(jc, script, "--no-requeue", "--comment", "mine")
    assert fields["Requeue"] == "0" and fields["OverSubscribe"] == "OK" and fields["Comment"] == "mine"


def test_jobs_without_a_script_pass(jc):
    """salloc and srun jobs have no batch script: the plugin lets them through."""
    env = cluster_env(jc)
    proc = subprocess.run(["/usr/bin/srun", "-N1", "hostname"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() in jc.nodes
    proc = subprocess.run(["salloc", "-N1", "true"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_batch_job_runs_the_shim_as_srun(jc):
    """After `eval "$(testcluster env)"`, sbatch exports PATH to the job: `srun` in the batch
    script is the shim, `hpresilience` is found, and plain srun still runs a step."""
    out = jc.dir / "shim-job.out"
    script = ('#!/bin/sh\ns=$(command -v srun)\necho "srun=$s"\nsed -n 2p "$s"\n'
              'echo "hpresilience=$(command -v hpresilience)"\nsrun -N1 hostname\n')
    proc = subprocess.run(["sbatch", "--parsable", "-N1", "-o", str(out)], input=script, capture_output=True,
                          text=True, env=cluster_env(jc), timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    wait_until(lambda: job_fields(jc, job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 60, "job done")
    assert job_fields(jc, job)["JobState"] == "COMPLETED", out.read_text()
    lines = out.read_text().splitlines()
    srun = Path(lines[0].removeprefix("srun="))
    assert srun.parent == jc.dir / "path" and srun.resolve() == REPO / "scripts" / "srun"
    assert "hpresilience-srun-shim" in lines[1]
    assert lines[2].removeprefix("hpresilience=") == str(jc.dir / "path" / "hpresilience")
    assert lines[3] in jc.nodes


def test_partition_settings(jc):
    """A partition with OverSubscribe=EXCLUSIVE gives whole nodes without --exclusive;
    in one with OverSubscribe=FORCE, --exclusive has no effect: rejected, saying so.
    (Last in this module: it adds two partitions to the cluster's slurm.conf.)"""
    conf = jc.dir / "etc" / "slurm.conf"
    conf.write_text(conf.read_text() + "PartitionName=whole Nodes=ALL OverSubscribe=EXCLUSIVE State=UP\n"
                    "PartitionName=shared Nodes=ALL OverSubscribe=FORCE:4 State=UP\n")
    env = cluster_env(jc)
    subprocess.run(["scontrol", "reconfigure"], check=True, env=env, timeout=30)
    wait_until(lambda: "PartitionName=shared" in subprocess.run(
        ["scontrol", "show", "partition", "shared"], capture_output=True, text=True, env=env).stdout, 30,
        "the new partitions")
    script = "#!/bin/sh\nsrun --auto-resume=1 train.sh\n"
    fields = accepted(jc, script, "-p", "whole")
    assert fields["Requeue"] == "1" and fields["Comment"] == MARK and fields["OverSubscribe"] == "NO"
    proc = submit(jc, script, "-p", "shared", "--exclusive")
    assert proc.returncode != 0 and "partition shared has OverSubscribe=FORCE" in proc.stderr
    proc = submit(jc, script, "-p", "whole,train")  # may land in train, where it would share nodes
    assert proc.returncode != 0 and FIX in proc.stderr


def test_a_script_that_does_not_load(jc):
    """A broken job_submit.lua: while slurmctld runs, the previous script stays in use;
    at start-up it is fatal, and `testcluster slurmctld start` (as `up`) says so.
    (Last in this module: it restarts slurmctld.)"""
    lua = jc.dir / "etc" / "job_submit.lua"
    good = lua.resolve()
    try:
        lua.unlink()
        lua.write_text(good.read_text() + "\nthis is not lua(\n")
        proc = submit(jc, "#!/bin/sh\nsrun --auto-resume=1 train.sh\n")
        assert proc.returncode != 0 and FIX in proc.stderr  # the previous script still checks
        assert "using previous script" in (jc.dir / "ctld" / "slurmctld.log").read_text()
        jc.tc("slurmctld", "stop")
        proc = jc.tc("slurmctld", "start", check=False)
        assert proc.returncode == 1 and "slurmctld exited right after starting" in proc.stderr
        assert "failed to initialize job_submit plugin" in proc.stderr
    finally:
        lua.unlink()
        lua.symlink_to(good)
    jc.tc("slurmctld", "start")
    wait_until(lambda: set(subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                          env=cluster_env(jc)).stdout.split()) == {"idle"}, 30, "nodes idle")
