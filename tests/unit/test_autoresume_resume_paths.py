"""GRES and --no-kill jobs under `srun --auto-resume` (issue 11, deliverables 4 and 7): a node of a `--gpus-per-node`
job fails mid-step. Slurm 22.05 shrinks such a job (verified on the test cluster, where the next
step still gets its GPUs), so the step resumes in the allocation; a Slurm that refuses to shrink
it gets the job requeued. The real Runner and SlurmGateway over the in-memory Slurm model."""
from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pytest

from hpresilience.autoresume.runner import Runner
from hpresilience.autoresume.settings import AutoResumeSettings
from hpresilience.autoresume.srun_args import parse
from hpresilience.controller.autoresume_events import AutoResumeEvents
from hpresilience.controller.metrics import ControllerMetrics
from hpresilience.slurm import NodeState, SlurmGateway
from tests.slurm_model import SlurmModel


@pytest.mark.parametrize("shrinks", [True, False])
def test_a_gres_job_resumes_in_its_allocation_where_slurm_shrinks_it_else_by_requeue(tmp_path: Path, shrinks):
    model = SlurmModel("n[1-4]")
    model.shrinks_gres_jobs = shrinks
    job_id = model.submit("n[1-3]", requeue=True, gres=("gpu:2",))
    fake = tmp_path / "srun"
    fake.write_text(f'#!/bin/sh\n[ "$HPR_ATTEMPT" = 1 ] || exit 0\ntouch {tmp_path}/started\nexec sleep 30\n')
    fake.chmod(0o755)
    gateway = SlurmGateway(model)

    def fail_n2() -> None:
        while not (tmp_path / "started").exists():
            threading.Event().wait(0.02)
        gateway.set_state("n2", NodeState.FAIL, "Action: Replace; XID 79")

    threading.Thread(target=fail_n2, daemon=True).start()
    settings = AutoResumeSettings(state_dir=str(tmp_path / "state"), poll_seconds=0.05, failure_wait_seconds=0)
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": "0"}
    err = io.StringIO()
    counter = AutoResumeEvents(tmp_path / "state", ControllerMetrics())
    code = Runner(parse(["--auto-resume", "-N2", "--gpus-per-node=2", "train.sh"]), settings, str(fake),
                  gateway=gateway, env=env, err=err, sleep=model.sleep).run()
    log = tmp_path / "state" / f"auto-resume-{job_id}.events.jsonl"
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    if shrinks:
        assert code == 0, err.getvalue()
        assert "nodes_released" in events and "requeue" not in events
        assert model.job(job_id).nodes == ("n1", "n3")
    else:
        assert "requeue" in events and "nodes_released" not in events
        assert "Slurm would not release n2 from the job" in err.getvalue()
        assert model.job(job_id).state == "PENDING"
        # The batch script runs again after the requeue: a new runner process, attempt 2.
        model.advance(130)    # the requeued job's BeginTime (no controller here to expedite it)
        assert model.job(job_id).is_running
        env["SLURM_RESTART_COUNT"] = "1"
        assert Runner(parse(["--auto-resume", "-N2", "--gpus-per-node=2", "train.sh"]), settings, str(fake),
                      gateway=gateway, env=env, err=err, sleep=model.sleep).run() == 0, err.getvalue()
    # What the controller counts (issue 12): one recovery, by its path, timed from the fault.
    (resumed,) = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "resumed"]
    assert (resumed["path"], resumed["attempt"]) == ("in_allocation" if shrinks else "requeue", 2)
    assert 0 <= resumed["seconds"] < 60
    # ...and the controller reading the shared state directory counts it so.
    counter.scan()
    registry = counter.metrics.registry
    assert registry.get_sample_value("hpr_autoresume_recoveries_total", {"path": resumed["path"]}) == 1
    assert registry.get_sample_value("hpr_autoresume_recovery_seconds_sum", {"path": resumed["path"]}) == \
        pytest.approx(resumed["seconds"])


def test_a_no_kill_jobs_ghost_step_on_its_dead_node_gets_the_job_requeued(tmp_path: Path):
    """Issue 11, deliverable 7: when a --no-kill job's node goes DOWN, Slurm 22.05 drops the node
    from the job but keeps the step that had it RUNNING for good, so the job's other nodes stay
    busy and a new step would wait for ever. The runner kills srun, sees the step will not go, and
    requeues the job instead of starting an attempt that cannot start."""
    model = SlurmModel("n[1-4]")
    job_id = model.submit("n[1-3]", requeue=True, no_kill=True)
    fake = tmp_path / "srun"
    fake.write_text(f'#!/bin/sh\ntouch {tmp_path}/started\nexec sleep 30\n')
    fake.chmod(0o755)

    def n2_dies_under_the_step() -> None:
        while not (tmp_path / "started").exists():
            threading.Event().wait(0.02)
        model.lose_node("n2", step_of=job_id)

    threading.Thread(target=n2_dies_under_the_step, daemon=True).start()
    settings = AutoResumeSettings(state_dir=str(tmp_path / "state"), poll_seconds=0.05, failure_wait_seconds=0,
                                  stop_grace_seconds=0.5, stuck_step_seconds=0)
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": "0"}
    err = io.StringIO()
    Runner(parse(["--auto-resume", "-N2", "train.sh"]), settings, str(fake), gateway=SlurmGateway(model),
           env=env, err=err, sleep=model.sleep).run()
    events = [json.loads(line) for line in
              (tmp_path / "state" / f"auto-resume-{job_id}.events.jsonl").read_text().splitlines()]
    (requeue,) = [e for e in events if e["event"] == "requeue"]
    assert "still holds step(s)" in requeue["why"], err.getvalue()
    assert [e["attempt"] for e in events if e["event"] == "attempt_started"] == [1]
    assert "on a node that left the job" in err.getvalue()
    # 22.05 refused to mark the job's comment (it refuses any update of such a job); requeued anyway
    assert model.job(job_id).state == "PENDING" and model.job(job_id).restart_count == 1
