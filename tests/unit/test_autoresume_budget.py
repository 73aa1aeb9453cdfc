"""Attempt budgets of `srun --auto-resume` (issue 11, deliverable 2): one budget per step, requeues
counted, steps that can never run refused. The real Runner and SlurmGateway over the in-memory Slurm
model (tests/slurm_model.py); srun is a stand-in program that logs its argv and exits 0."""
from __future__ import annotations

import io
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import pytest

from hpresilience.autoresume.runner import AutoResumeError, Runner
from hpresilience.autoresume.settings import AutoResumeSettings
from hpresilience.autoresume.srun_args import parse
from hpresilience.autoresume.state import AttemptState, JobRun, claim_step
from hpresilience.checkpoint import CheckpointDir
from hpresilience.slurm import NodeState, SlurmGateway
from tests.slurm_model import SlurmModel


@dataclass
class BatchJob:
    """One batch job on the model; `srun` is one `srun --auto-resume ...` line of its script."""
    model: SlurmModel
    job_id: int
    tmp: Path

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def srun(self, *argv: str) -> Tuple[int, str]:
        fake = self.tmp / "srun"
        if not fake.exists():
            fake.write_text(f'#!/bin/sh\necho "$@" >> {self.tmp / "srun.log"}\nexit 0\n')
            fake.chmod(0o755)
        job = self.model.job(self.job_id)
        env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(self.job_id),
               "SLURM_RESTART_COUNT": str(job.restart_count)}
        settings = AutoResumeSettings(state_dir=str(self.state_dir), poll_seconds=0.05, failure_wait_seconds=0)
        err = io.StringIO()
        runner = Runner(parse(["--auto-resume", *argv]), settings, str(fake), gateway=SlurmGateway(self.model),
                        env=env, err=err, sleep=self.model.sleep)
        return runner.run(), err.getvalue()

    def events(self, kind: str) -> List[dict]:
        path = self.state_dir / f"auto-resume-{self.job_id}.events.jsonl"
        return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]

    def requeues(self) -> int:
        return sum(1 for w in self.model.writes if w.op == "requeue" and w.target == str(self.job_id))

    def restart(self) -> None:
        """After a requeue: the job is made eligible (as the controller does) and starts again."""
        SlurmGateway(self.model).update_job(self.job_id, now=True)
        self.model.tick()
        assert self.model.job(self.job_id).is_running


def batch_job(tmp_path: Path, nodes: str = "n[1-2]", cluster: str = "n[1-4]") -> BatchJob:
    model = SlurmModel(cluster)
    return BatchJob(model, model.submit(nodes, requeue=True), tmp_path)


# --------------------------------------------------------------- defect 1: one budget per step
def test_a_fourth_successful_step_of_one_job_runs(tmp_path):
    job = batch_job(tmp_path)
    # The same command four times (a loop in the script): the old job-wide budget refused the fourth.
    assert [job.srun("-N1", "true")[0] for _ in range(4)] == [0, 0, 0, 0]
    started = job.events("attempt_started")
    assert len(started) == 4 and len({e["step"] for e in started}) == 4
    assert {e["attempt"] for e in started} == {1}


def test_a_step_keeps_its_budget_across_a_requeue_even_when_the_script_skips_a_stage(tmp_path):
    job = batch_job(tmp_path)
    assert job.srun("-N1", "prepare.sh")[0] == 0
    SlurmGateway(job.model).set_state("n1", NodeState.FAIL, "Action: Replace; XID 79")
    job.srun("-N2", "train.sh")               # too few healthy nodes: requeued, its first attempt
    job.restart()
    # The re-run script skips the finished stage: train.sh is still the same step, at its second attempt.
    assert job.srun("-N2", "train.sh")[0] == 0
    (requeue,), (started,) = job.events("requeue"), job.events("attempt_started")[1:]
    assert started["step"] == requeue["step"] and started["attempt"] == 2


def test_a_finished_step_run_again_after_a_requeue_gets_a_fresh_budget(tmp_path):
    job = batch_job(tmp_path)
    runs = AutoResumeSettings().max_attempts + 1
    for _ in range(runs):
        assert job.srun("-N1", "prepare.sh")[0] == 0
        SlurmGateway(job.model).requeue(job.job_id)   # a later step of the script needed a requeue
        job.restart()
    started = job.events("attempt_started")
    assert len(started) == runs and {e["attempt"] for e in started} == {1}


def test_concurrent_steps_of_one_job_get_distinct_identities(tmp_path):
    run = JobRun(7, restart_count=0, submit_time=1.0)
    start = threading.Barrier(8)
    found: List[str] = []

    def claim(argv: List[str]) -> None:
        start.wait()
        found.append(claim_step(tmp_path, run, argv))

    threads = [threading.Thread(target=claim, args=(["-N1", "train.sh", str(i % 2)],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 8
    assert sorted(s.split(".")[1] for s in found) == ["0", "0", "1", "1", "2", "2", "3", "3"]
    # The next run of the script (a requeue) hands out the same identities again.
    again = JobRun(7, restart_count=1, submit_time=2.0)
    assert claim_step(tmp_path, again, ["-N1", "train.sh", "0"]) in found


def test_attempt_state_is_per_step(tmp_path):
    one = AttemptState.load(tmp_path, 42, "abc.0")
    one.attempts = 3
    one.save(tmp_path)
    assert AttemptState.load(tmp_path, 42, "abc.1").attempts == 0
    assert AttemptState.load(tmp_path, 42, "abc.0").attempts == 3


# --------------------------------------------------------------- defect 2: requeues are attempts
def test_requeues_for_lack_of_healthy_nodes_use_up_the_budget(tmp_path):
    job = batch_job(tmp_path, nodes="n[1-4]", cluster="n[1-12]")
    for _ in range(6):
        # Each run of the script finds one of its nodes failed before the step starts.
        victim = job.model.job(job.job_id).nodes[0]
        SlurmGateway(job.model).set_state(victim, NodeState.FAIL, "Action: Replace; XID 79")
        code, err = job.srun("-N4", "train.sh")
        if job.model.job(job.job_id).state != "PENDING":
            break
        job.restart()
    assert job.requeues() == 2          # max_attempts 3: two requeues, then none would be left to run
    assert code == 1 and job.model.job(job.job_id).is_running
    assert "would use the last of 3 attempts" in err
    assert job.events("gave_up")[-1]["reason"] == "attempts used up"


def test_a_step_whose_argv_changes_every_run_still_stops_requeueing(tmp_path):
    """Review of issue 11: `--resume=ckpt$SLURM_RESTART_COUNT` makes a new step identity (a fresh
    budget) on every run; the job-wide max_requeues (6) still ends the requeues."""
    job = batch_job(tmp_path, nodes="n[1-4]", cluster="n[1-30]")
    for _ in range(12):
        victim = job.model.job(job.job_id).nodes[0]
        SlurmGateway(job.model).set_state(victim, NodeState.FAIL, "Action: Replace; XID 79")
        code, err = job.srun("-N4", "train.sh", f"--resume=ckpt{job.model.job(job.job_id).restart_count}")
        if job.model.job(job.job_id).state != "PENDING":
            break
        job.restart()
    assert job.requeues() == 6 and code == 1
    assert "requeued 6 times already (max_requeues 6)" in err
    assert job.events("gave_up")[-1]["reason"] == "requeues used up"


# --------------------------------------------------------------- defect 3: steps that can never run
@pytest.mark.parametrize("argv, message", [
    (["-N4", "train.sh"], "asks for 4 nodes (-N) but job 1000 holds 2"),
    (["-N1", "-w", "n9", "train.sh"], "-w names n9, unknown to Slurm"),
    (["-N1", "--nodelist=n3", "train.sh"], "-w names n3, not in job 1000's allocation (n[1-2])"),
])
def test_a_step_that_can_never_run_is_refused_without_a_requeue(tmp_path, argv, message):
    job = batch_job(tmp_path)
    with pytest.raises(AutoResumeError, match=re.escape(message)):
        job.srun(*argv)
    assert message in job.events("refused")[0]["why"]
    assert job.requeues() == 0 and not (tmp_path / "srun.log").exists()


def test_a_nodelist_inside_the_job_picks_the_nodes(tmp_path):
    job = batch_job(tmp_path)
    assert job.srun("-N1", "-w", "n2", "train.sh")[0] == 0
    assert "--nodelist=n2" in (tmp_path / "srun.log").read_text()


# --------------------------------------------------------------- bad input (issue 11)
def test_no_program_is_refused_before_anything_runs(tmp_path):
    job = batch_job(tmp_path)
    with pytest.raises(AutoResumeError, match="no program to run"):
        job.srun("-N1")
    assert not (tmp_path / "srun.log").exists() and job.requeues() == 0


def test_a_checkpoint_directory_that_disappears_is_not_taken_for_no_progress(tmp_path):
    """Attempt 1 starts from a checkpoint and loses a node; attempt 2 finds its checkpoint directory gone and
    loses another node, and so does attempt 3: the runner says it cannot judge progress and goes on
    within the budget (before, a missing directory read as "no progress" and ended the job)."""
    model = SlurmModel("n[1-6]")
    job_id = model.submit("n[1-5]", requeue=True)
    ckpt = tmp_path / "ckpt"
    fake = tmp_path / "srun"
    fake.write_text(f"""#!/bin/sh
case "$HPR_ATTEMPT" in
1) ;;
2) rm -rf {ckpt} ;;
3) ;;
*) exit 0 ;;
esac
touch {tmp_path}/started-$HPR_ATTEMPT
exec sleep 30
""")
    fake.chmod(0o755)
    CheckpointDir(ckpt).save_file(2, "state.json", b"{}")
    gateway = SlurmGateway(model)

    def fail_a_node_per_attempt() -> None:
        for attempt, victim in ((1, "n2"), (2, "n3"), (3, "n4")):
            while not (tmp_path / f"started-{attempt}").exists():
                threading.Event().wait(0.02)
            gateway.set_state(victim, NodeState.FAIL, "Action: Replace; XID 79")

    failer = threading.Thread(target=fail_a_node_per_attempt, daemon=True)
    failer.start()
    err = io.StringIO()
    settings = AutoResumeSettings(state_dir=str(tmp_path / "state"), poll_seconds=0.05, failure_wait_seconds=0,
                                  checkpoint_dir=str(ckpt), max_attempts=4)
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": "0"}
    code = Runner(parse(["--auto-resume", "-N2", "train.sh"]), settings, str(fake), gateway=gateway, env=env,
                  err=err, sleep=model.sleep).run()
    failer.join(timeout=5)
    assert code == 0, err.getvalue()
    events = [json.loads(line) for line in
              (tmp_path / "state" / f"auto-resume-{job_id}.events.jsonl").read_text().splitlines()]
    # Attempts 2 and 3 both failed with the directory gone (issue 11 review: the second was "no progress").
    assert [e["attempt"] for e in events if e["event"] == "attempt_started"] == [1, 2, 3, 4]
    assert [e["event"] for e in events].count("checkpoints_gone") == 2
    assert "progress cannot be judged" in err.getvalue() and "no progress:" not in err.getvalue()


def _cut_short(job: BatchJob) -> None:
    """The step's runner was killed mid-attempt (its job requeued under it): its state file ends
    at the attempt, with no outcome after it."""
    (path,) = job.state_dir.glob(f"auto-resume-{job.job_id}-*.json")
    state = json.loads(path.read_text())
    assert state["history"][-1]["event"] == "succeeded"
    state["history"].pop()
    path.write_text(json.dumps(state))


def test_an_attempt_cut_short_by_another_steps_requeue_is_given_back(tmp_path):
    job = batch_job(tmp_path, nodes="n[1-3]", cluster="n[1-4]")
    assert job.srun("-N1", "monitor.sh")[0] == 0
    _cut_short(job)                                      # monitor.sh was running when ...
    SlurmGateway(job.model).set_state("n3", NodeState.FAIL, "Action: Replace; XID 79")
    job.srun("-N3", "train.sh")                          # ... train.sh requeued the job
    job.restart()
    assert job.srun("-N1", "monitor.sh")[0] == 0
    assert [e["attempt"] for e in job.events("attempt_started")] == [1, 1]   # before: [1, 2]
    (interrupted,) = job.events("interrupted")
    assert interrupted["attempt"] == 1 and interrupted["by"] == job.events("requeue")[0]["step"]


def test_an_attempt_cut_short_by_slurms_own_requeue_still_counts(tmp_path):
    job = batch_job(tmp_path, nodes="n[1-3]", cluster="n[1-4]")
    assert job.srun("-N1", "monitor.sh")[0] == 0
    _cut_short(job)
    SlurmGateway(job.model).requeue(job.job_id)         # the batch host died: Slurm requeued the job
    job.restart()
    assert job.srun("-N1", "monitor.sh")[0] == 0
    assert [e["attempt"] for e in job.events("attempt_started")] == [1, 2] and not job.events("interrupted")


def test_a_given_back_attempt_does_not_bring_back_the_first_attempt_refusal_of_w(tmp_path):
    """Issue 11 review: with its attempt given back, `-w n1` outside the new allocation was refused as
    if the step had never run; it runs on other healthy nodes instead."""
    job = batch_job(tmp_path, nodes="n[1-3]", cluster="n[1-6]")
    assert job.srun("-w", "n1", "-N1", "monitor.sh")[0] == 0
    _cut_short(job)
    gateway = SlurmGateway(job.model)
    gateway.set_state("n1", NodeState.FAIL, "Action: Replace; XID 79")
    job.srun("-N3", "train.sh")                          # requeues: n1 failed
    job.restart()
    assert "n1" not in job.model.job(job.job_id).nodes
    code, err = job.srun("-w", "n1", "-N1", "monitor.sh")
    assert code == 0, err
    assert job.events("interrupted") and not job.events("refused")


def test_a_concurrent_step_of_the_job_is_never_signalled(tmp_path):
    """Issue 11 review: a step started after ours (another srun of the script, its own pid) was taken for
    ours and signalled when ours was stopped."""
    model = SlurmModel("n[1-4]")
    job_id = model.submit("n[1-4]", requeue=True)
    fake = tmp_path / "srun"
    fake.write_text(f"#!/bin/sh\n[ \"$HPR_ATTEMPT\" = 1 ] || exit 0\ntouch {tmp_path}/started\nexec sleep 30\n")
    fake.chmod(0o755)
    gateway = SlurmGateway(model)
    other: List[str] = []

    def another_step_then_a_fault() -> None:
        while not (tmp_path / "started").exists():
            threading.Event().wait(0.02)
        other.append(model.start_step(job_id, "n[3-4]", srun_pid=1))   # not our srun
        gateway.set_state("n2", NodeState.FAIL, "Action: Replace; XID 79")

    threading.Thread(target=another_step_then_a_fault, daemon=True).start()
    settings = AutoResumeSettings(state_dir=str(tmp_path / "state"), poll_seconds=0.05, failure_wait_seconds=0,
                                  stop_grace_seconds=0.5)
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": "0"}
    err = io.StringIO()
    code = Runner(parse(["--auto-resume", "-N2", "train.sh"]), settings, str(fake), gateway=gateway, env=env,
                  err=err, sleep=model.sleep).run()
    assert code == 0, err.getvalue()
    assert "step_stopping" in [json.loads(line)["event"] for line in
                               (tmp_path / "state" / f"auto-resume-{job_id}.events.jsonl").read_text().splitlines()]
    assert other and not [w for w in model.writes if w.op == "signal_step" and w.target == other[0]]
    assert other[0] in [s.step_id for s in gateway.steps(job_id)]
