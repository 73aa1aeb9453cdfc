"""Hang detection in the auto-resume runner (issue 11, deliverable 5): the real Runner and
SlurmGateway over the in-memory Slurm model; srun is a stand-in script that either plays a
training step (heartbeats up to a step, then hangs) or, called with --output, the quick node
check (one deepcheck report per node file, the verdicts the test gives)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from hpresilience.autoresume.runner import Runner
from hpresilience.autoresume.settings import AutoResumeSettings
from hpresilience.autoresume.srun_args import parse
from hpresilience.slurm import SlurmGateway
from tests.slurm_model import SlurmModel

FAKE_SRUN = """\
#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
output = [a[len("--output="):] for a in args if a.startswith("--output=")]
if output:                                 # the quick node check: each node's report to its own file
    from hpresilience.deepcheck.result import CheckResult, Level, Status, SuiteReport
    from hpresilience.slurm.hostlist import expand
    verdicts = json.loads(os.environ["FAKE_VERDICTS"])
    for node in expand(args[args.index("-w") + 1]):
        status = Status[verdicts.get(node, "PASS")]
        report = SuiteReport(node, Level.QUICK, (CheckResult("gpu_count", status, "2 GPUs lost"),), 0.0, 1.0)
        with open(output[0].replace("%N", node), "w") as f:
            f.write(json.dumps(report.to_dict()) + "\\n")
    sys.exit(0)
# The training step: attempt k beats up to PLAN[k-1] (a step number) and then hangs, or exits 0 at "done";
# "N!" hangs at N and exits 0 at SIGTERM (a handler that saves and leaves quietly).
plan = os.environ["FAKE_PLAN"].split(",")
todo = plan[int(os.environ["HPR_ATTEMPT"]) - 1]
if todo == "done":
    sys.exit(0)
if todo.endswith("!"):
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    todo = todo[:-1]
for step in range(1, int(todo) + 1):
    with open(os.environ["HPR_PROGRESS_FILE"] + ".tmp", "w") as f:
        json.dump({{"step": step}}, f)
    os.replace(os.environ["HPR_PROGRESS_FILE"] + ".tmp", os.environ["HPR_PROGRESS_FILE"])
time.sleep(60)                             # hung (a collective that never returns)
"""


def run(tmp_path: Path, plan: str, verdicts: Dict[str, str], argv: Tuple[str, ...] = ("-N2", "train.sh"),
        nodes: str = "n[1-3]", **settings: object) -> Tuple[int, str, List[dict], SlurmModel, int]:
    model = SlurmModel("n[1-4]")
    job_id = model.submit(nodes, requeue=True)
    fake = tmp_path / "srun"
    fake.write_text(FAKE_SRUN.format(python=sys.executable))
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "SLURM_RESTART_COUNT": "0",
           "FAKE_LOG": str(tmp_path / "srun.log"), "FAKE_PLAN": plan, "FAKE_VERDICTS": json.dumps(verdicts),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    options = {"hang_seconds": 0.6, "hang_startup_seconds": 3.0, **settings}
    config = AutoResumeSettings(state_dir=str(tmp_path / "state"), poll_seconds=0.05, failure_wait_seconds=0,
                                stop_grace_seconds=2, **options)
    err = io.StringIO()
    code = Runner(parse(["--auto-resume", *argv]), config, str(fake), gateway=SlurmGateway(model), env=env,
                  err=err, sleep=model.sleep).run()
    events = [json.loads(line) for line in
              (tmp_path / "state" / f"auto-resume-{job_id}.events.jsonl").read_text().splitlines()]
    return code, err.getvalue(), events, model, job_id


def of(events: List[dict], kind: str) -> List[dict]:
    return [e for e in events if e["event"] == kind]


def test_a_stalled_step_is_stopped_checked_and_resumed_without_the_node_that_failed_the_check(tmp_path):
    code, err, events, model, job = run(tmp_path, "5,done", {"n2": "FAIL"})
    assert code == 0, err
    (stalled,) = of(events, "stalled")
    assert "heartbeat step 5" in stalled["why"] and stalled["progress"]["heartbeat_step"] == 5
    (check,) = of(events, "node_check")
    assert list(check["failed"]) == ["n2"] and check["passed"] == ["n1"]
    assert of(events, "nodes_released")[0]["dropped"] == "n2"
    assert [e["nodes"] for e in of(events, "attempt_started")] == ["n[1-2]", "n[1,3]"]
    assert "n2" not in model.job(job).nodes


def test_a_stall_where_every_node_passes_the_check_retries_on_the_same_nodes(tmp_path):
    code, err, events, model, job = run(tmp_path, "3,done", {})
    assert code == 0, err
    assert of(events, "node_check")[0]["failed"] == {}
    assert not of(events, "nodes_released")
    assert [e["nodes"] for e in of(events, "attempt_started")] == ["n[1-2]", "n[1-2]"]
    assert "retrying on the same nodes" in err


def test_a_node_the_check_cannot_judge_is_kept(tmp_path):
    code, err, events, _, _ = run(tmp_path, "3,done", {"n1": "ERROR"})
    assert code == 0, err
    assert list(of(events, "node_check")[0]["unknown"]) == ["n1"]
    assert [e["nodes"] for e in of(events, "attempt_started")] == ["n[1-2]", "n[1-2]"]
    assert "n1: no verdict from the node check, kept" in err


def test_stalling_again_with_no_progress_since_the_last_stall_ends_the_job(tmp_path):
    code, err, events, _, _ = run(tmp_path, "4,4,done", {}, max_attempts=5)
    assert code != 0
    assert len(of(events, "attempt_started")) == 2 and len(of(events, "stalled")) == 2
    assert of(events, "gave_up")[-1]["reason"] == "stalled again without progress"
    assert "stalled again with no progress since the last stall" in err


def test_a_stall_after_progress_since_the_last_one_is_retried(tmp_path):
    code, err, events, _, _ = run(tmp_path, "4,7,done", {}, max_attempts=5)
    assert code == 0, err
    assert [e["progress"]["heartbeat_step"] for e in of(events, "stalled")] == [4, 7]


def test_a_step_that_never_beats_is_stopped_after_the_startup_allowance(tmp_path):
    code, err, events, _, _ = run(tmp_path, "0,done", {}, hang_startup_seconds=0.5)
    assert code == 0, err
    assert "no progress since the attempt started" in of(events, "stalled")[0]["why"]


def test_without_hang_seconds_a_slow_step_is_left_alone(tmp_path):
    code, err, events, _, _ = run(tmp_path, "done", {}, hang_seconds=None)
    assert code == 0 and of(events, "attempt_started") and not of(events, "stalled")


def test_a_stalled_step_that_exits_0_at_sigterm_is_not_taken_for_done(tmp_path):
    """Issue 11 review: a program that saves and exits 0 at our SIGTERM had "succeeded"."""
    code, err, events, _, _ = run(tmp_path, "5!,done", {})
    assert code == 0, err
    assert [e["attempt"] for e in of(events, "attempt_started")] == [1, 2]
    assert [e["attempt"] for e in of(events, "step_succeeded")] == [2] and len(of(events, "stalled")) == 1


def test_a_stall_on_the_last_attempt_ends_without_a_node_check(tmp_path):
    """Issue 11 review: the check could change nothing, and cost up to node_check_timeout_seconds."""
    code, err, events, _, _ = run(tmp_path, "5,done", {"n2": "FAIL"}, max_attempts=1)
    assert code != 0 and of(events, "stalled")
    assert not of(events, "node_check") and of(events, "gave_up")[-1]["reason"] == "attempts used up"
