"""`SlurmGateway.submit_batch` never submits a job twice (issue 13's known limit, fixed in the issue 14
session): an sbatch that timed out may have submitted the job all the same, so before a retry the job is
looked for by its unique name. The real gateway, backend and runner run fake `sbatch` and `squeue`
executables (the boundary: Slurm's commands), which keep their jobs in a file."""
import stat
from pathlib import Path
from typing import List

import pytest

from hpresilience.slurm import SlurmGateway, SlurmUnavailable
from hpresilience.slurm.backend import ScontrolBackend
from hpresilience.slurm.runner import CommandRunner

# Each call of sbatch takes the next behaviour from `plan` (one word a line): `submit` (print the id),
# `submit-hang` (submit, then hang past the client's timeout), `submit-hang-late` (the same, but the job
# is still in slurmctld's backlog at the next squeue), `refuse` (slurmctld unreachable, nothing
# submitted). squeue prints the ids of the jobs with the asked --name, as the parts of a heterogeneous
# job when the file `het` exists; scancel records what it cancels.
SBATCH = """#!/bin/bash
d=$(dirname "$0")
what=$(head -1 "$d/plan"); sed -i 1d "$d/plan"
echo "$what $*" >> "$d/calls"
name=""; for a in "$@"; do case "$a" in --job-name=*) name=${a#--job-name=} ;; esac; done
if [ "$what" = refuse ]; then
    echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)" >&2
    exit 1
fi
id=$((4000 + $(wc -l < "$d/jobs")))
if [ "$what" = submit-hang-late ]; then echo "$id $name late" >> "$d/jobs"; else echo "$id $name" >> "$d/jobs"; fi
case "$what" in submit-hang*) exec sleep 30 ;; esac
echo "$id"
"""
SQUEUE = """#!/bin/bash
d=$(dirname "$0")
echo "$*" >> "$d/squeues"
for a in "$@"; do case "$a" in --name=*) name=${a#--name=} ;; esac; done
if [ -e "$d/het" ]; then
    awk -v n="$name" '$2 == n && $3 != "late" { print $1 "+0"; print $1 "+1" }' "$d/jobs"
else
    awk -v n="$name" '$2 == n && $3 != "late" { print $1 }' "$d/jobs"
fi
sed -i 's/ late$//' "$d/jobs"   # out of the backlog by the next look
"""
SCANCEL = """#!/bin/bash
echo "$*" >> "$(dirname "$0")/cancelled"
"""


def fake_slurm(tmp_path: Path, plan: List[str]) -> SlurmGateway:
    for name, text in (("sbatch", SBATCH), ("squeue", SQUEUE), ("scancel", SCANCEL)):
        exe = tmp_path / name
        exe.write_text(text)
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "plan").write_text("".join(f"{p}\n" for p in plan))
    (tmp_path / "jobs").write_text("")
    for empty in ("calls", "squeues", "cancelled"):
        (tmp_path / empty).write_text("")
    runner = CommandRunner(timeout=1.0, attempts=3, max_delay=30, env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
                           sleep=lambda _: None)
    return SlurmGateway(ScontrolBackend(runner))


def jobs(tmp_path: Path) -> List[str]:
    return (tmp_path / "jobs").read_text().splitlines()


def calls(tmp_path: Path) -> List[str]:
    return [line.split()[0] for line in (tmp_path / "calls").read_text().splitlines()]


def test_an_sbatch_that_timed_out_after_submitting_is_not_submitted_again(tmp_path):
    gw = fake_slurm(tmp_path, ["submit-hang", "submit"])
    assert gw.submit_batch(["-N1", "job.sh"], name="hpr-drill-1-a") == 4000
    assert jobs(tmp_path) == ["4000 hpr-drill-1-a"]      # one job
    assert calls(tmp_path) == ["submit-hang"]             # sbatch ran once; the retry found it


def test_an_sbatch_that_submitted_nothing_is_tried_again(tmp_path):
    gw = fake_slurm(tmp_path, ["refuse", "submit"])
    assert gw.submit_batch(["-N1", "job.sh"], name="hpr-drill-2-a") == 4000
    assert jobs(tmp_path) == ["4000 hpr-drill-2-a"]
    assert calls(tmp_path) == ["refuse", "submit"]


def test_another_jobs_name_is_not_taken_for_ours(tmp_path):
    gw = fake_slurm(tmp_path, ["submit", "refuse", "submit"])
    assert gw.submit_batch(["job.sh"], name="someone-else") == 4000
    assert gw.submit_batch(["job.sh"], name="hpr-drill-3-a") == 4001
    assert calls(tmp_path) == ["submit", "refuse", "submit"]


def test_slurmctld_away_for_good_is_an_error_with_nothing_submitted(tmp_path):
    gw = fake_slurm(tmp_path, ["refuse", "refuse", "refuse"])
    with pytest.raises(SlurmUnavailable):
        gw.submit_batch(["job.sh"], name="hpr-drill-4-a")
    assert jobs(tmp_path) == [] and calls(tmp_path) == ["refuse", "refuse", "refuse"]


def test_the_name_goes_to_sbatch_before_the_script(tmp_path):
    gw = fake_slurm(tmp_path, ["submit"])
    gw.submit_batch(["-N2", "--exclusive", "job.sh", "--steps", "5"], name="hpr-drill-5-a")
    [call] = (tmp_path / "calls").read_text().splitlines()
    assert call == "submit --parsable --job-name=hpr-drill-5-a -N2 --exclusive job.sh --steps 5"


def test_a_heterogeneous_jobs_parts_are_found_as_its_one_id(tmp_path):
    """squeue's %i gives "4000+0", "4000+1" for the parts of a heterogeneous job (an admin's own canary
    script may be one): the job is found, not submitted again."""
    gw = fake_slurm(tmp_path, ["submit-hang", "submit"])
    (tmp_path / "het").touch()
    assert gw.submit_batch(["job.sh"], name="hpr-drill-6-a") == 4000
    assert calls(tmp_path) == ["submit-hang"]


def test_a_submission_still_in_the_backlog_leaves_one_job_not_two(tmp_path):
    """The first sbatch timed out with its job still in slurmctld's backlog: the look before the retry
    finds nothing, the retry submits a second job; the count after it cancels the newer."""
    gw = fake_slurm(tmp_path, ["submit-hang-late", "submit"])
    assert gw.submit_batch(["job.sh"], name="hpr-drill-7-a") == 4000
    assert calls(tmp_path) == ["submit-hang-late", "submit"]
    assert (tmp_path / "cancelled").read_text().split() == ["4001"]


def test_the_look_ups_see_every_partition_and_state(tmp_path):
    gw = fake_slurm(tmp_path, ["refuse", "submit"])
    gw.submit_batch(["job.sh"], name="hpr-drill-8-a")
    looks = (tmp_path / "squeues").read_text().splitlines()
    assert looks and all("--all" in look.split() and "--states=all" in look.split() for look in looks)
