"""The runner's own behaviour with real processes (no Slurm needed): error
classification uses messages captured from real scontrol runs."""
import pytest

from hpresilience.slurm.errors import (
    JobNotFound,
    NodeNotFound,
    PermissionDenied,
    SlurmCommandError,
    SlurmNotInstalled,
    SlurmUnavailable,
    StepNodeUnreachable,
)
from hpresilience.slurm.runner import CommandRunner, Target, classify

ARGV = ["scontrol", "x"]


@pytest.mark.parametrize("message, target, kind", [
    ("slurm_load_node error: Unable to contact slurm controller (connect failure)", Target(node="n1"),
     SlurmUnavailable),
    ("slurm_update error: Socket timed out on send/recv operation", Target(node="n1"), SlurmUnavailable),
    ("Node nosuch not found", Target(node="nosuch"), NodeNotFound),
    ("slurm_update error: Invalid node name specified", Target(node="nosuch"), NodeNotFound),
    ("slurm_load_jobs error: Invalid job id specified", Target(job="99"), JobNotFound),
    ("Invalid job id specified for job 99", Target(job="99"), JobNotFound),
    ("slurm_update error: Access/permission denied", Target(node="n1"), PermissionDenied),
    ("slurm_update error: Invalid node state specified", Target(node="n1"), SlurmCommandError),
    # issue 11: slurmctld answered; a dead node of the step did not (seen on 22.05, --no-kill job)
    ("scancel: error: Kill job error on job step id 9: Communication connection failure", Target(job="9.0"),
     StepNodeUnreachable),
    # a step scancel has just signalled (seen on 22.05): not a dead node
    ("scancel: error: Kill job error on job step id 99: Invalid job id specified", Target(job="99"), JobNotFound),
    # scancel with slurmctld down (seen on 22.05)
    ("slurm_load_jobs error: Unable to contact slurm controller (connect failure)", Target(job="9.0"),
     SlurmUnavailable),
])
def test_classify(message, target, kind):
    err = classify(ARGV, 1, message, target)
    assert type(err) is kind
    if kind is NodeNotFound:
        assert err.node == target.node and target.node in str(err)
    if kind is JobNotFound:
        assert err.job_id == "99" and "99" in str(err)


def test_timeout_is_transient_and_retried():
    runner = CommandRunner(timeout=0.2, attempts=2, sleep=lambda s: None)
    with pytest.raises(SlurmUnavailable, match="timed out after 0.2s"):
        runner.run(["sleep", "5"])


def failing_scontrol(tmp_path, message):
    """A stand-in program that fails with `message` and counts its calls."""
    calls = tmp_path / "calls"
    script = tmp_path / "scontrol"
    script.write_text(f"#!/bin/sh\necho x >> {calls}\necho '{message}' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script), lambda: calls.read_text().count("x")


def test_permanent_error_not_retried(tmp_path):
    script, calls = failing_scontrol(tmp_path, "Invalid node name specified")
    with pytest.raises(NodeNotFound):
        CommandRunner(attempts=5, sleep=lambda s: None).run([script], Target(node="n9"))
    assert calls() == 1


def test_transient_error_retried_until_attempts_used(tmp_path):
    script, calls = failing_scontrol(tmp_path, "Unable to contact slurm controller")
    with pytest.raises(SlurmUnavailable):
        CommandRunner(attempts=3, sleep=lambda s: None).run([script])
    assert calls() == 3


def test_missing_program_says_what_to_install(tmp_path):
    runner = CommandRunner(env={"PATH": str(tmp_path)})
    with pytest.raises(SlurmNotInstalled, match="apt-get install slurm-client"):
        runner.run(["scontrol", "show", "node"])
