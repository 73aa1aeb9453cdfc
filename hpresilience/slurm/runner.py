"""Runs Slurm's command-line tools: argv only, a timeout on every call,
retries with backoff for transient controller errors, typed errors otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import structlog
import tenacity

from .errors import (
    JobNotFound,
    NodeNotFound,
    PermissionDenied,
    SlurmCommandError,
    SlurmNotInstalled,
    SlurmUnavailable,
    StepNodeUnreachable,
)

log = structlog.get_logger(__name__)

# Messages meaning "slurmctld did not answer": worth retrying. Collected from
# Slurm 22.05-25.11 error strings (slurm_errno.c) and seen on the test cluster.
TRANSIENT_MARKERS = (
    "unable to contact slurm controller",
    "socket timed out",
    "connection refused",
    "connection reset",
    "zero bytes were transmitted",
    "communication connection failure",
    "transport endpoint is not connected",
    "backup controller in standby mode",
    "resource temporarily unavailable",
    "slurmctld is busy",
    "try again",
    "timed out",
)
NODE_NOT_FOUND_MARKERS = ("invalid node name specified", "not found")
JOB_NOT_FOUND_MARKERS = ("invalid job id specified",)
PERMISSION_MARKERS = ("access/permission denied", "permission denied", "invalid user id", "not authorized")


@dataclass(frozen=True)
class Target:
    """What a command is about, so an error can name it."""
    node: Optional[str] = None
    job: Optional[str] = None


# slurmctld answered, but could not reach a node of the step it was to signal (a dead node):
# "scancel: error: Kill job error on job step id 9: Communication connection failure". Not
# transient: retrying cost 6-7 s per call while the step's other nodes waited (issue 11, a
# --no-kill job whose node died). slurmctld itself down reads "Unable to contact slurm controller".
STEP_NODE_UNREACHABLE = "kill job error on job step"


def classify(argv: Sequence[str], returncode: Optional[int], output: str, target: Target) -> SlurmCommandError:
    text = output.lower()
    if STEP_NODE_UNREACHABLE in text and "communication connection failure" in text:
        return StepNodeUnreachable(argv, returncode, output, what="a node of the step did not answer")
    if any(m in text for m in TRANSIENT_MARKERS):
        return SlurmUnavailable(argv, returncode, output, what="slurmctld unreachable")
    if any(m in text for m in PERMISSION_MARKERS):
        return PermissionDenied(argv, returncode, output, what="permission denied")
    if target.job is not None and any(m in text for m in JOB_NOT_FOUND_MARKERS):
        return JobNotFound(target.job, argv, output)
    if target.node is not None and any(m in text for m in NODE_NOT_FOUND_MARKERS):
        return NodeNotFound(target.node, argv, output)
    return SlurmCommandError(argv, returncode, output)


@dataclass
class CommandRunner:
    """Runs one Slurm tool invocation with a timeout and bounded retries.

    `timeout` bounds each attempt; `attempts` and `max_delay` bound the whole
    call, so a dead controller costs at most about max_delay + timeout."""
    timeout: float = 20.0
    attempts: int = 4
    max_delay: float = 30.0
    env: Optional[Dict[str, str]] = None
    cwd: Optional[str] = None   # scontrol writes files there (a job resize leaves slurm_job_<id>_resize.sh)
    sleep: Callable[[float], None] = field(default=tenacity.nap.sleep, repr=False)

    def run(self, argv: Sequence[str], target: Optional[Target] = None) -> str:
        return self.retrying(argv)(self.once, list(argv), target or Target())

    def retrying(self, argv: Sequence[str]) -> tenacity.Retrying:
        """The retry policy: again while slurmctld is unreachable, bounded in attempts and time."""
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(SlurmUnavailable),
            stop=tenacity.stop_after_attempt(self.attempts) | tenacity.stop_after_delay(self.max_delay),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8) + tenacity.wait_random(0, 0.5),
            sleep=self.sleep,
            reraise=True,
            before_sleep=lambda rs: log.warning(
                "slurm.retry", argv=list(argv), attempt=rs.attempt_number,
                error=str(rs.outcome.exception()) if rs.outcome else None),
        )

    def once(self, argv: Sequence[str], target: Target) -> str:
        """One attempt, no retry (for a call that must not be repeated blindly, as sbatch)."""
        exe = shutil.which(argv[0], path=(self.env or os.environ).get("PATH"))
        if exe is None:
            raise SlurmNotInstalled(argv[0])
        try:
            proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace",
                                  timeout=self.timeout, env=self.env, stdin=subprocess.DEVNULL, cwd=self.cwd)
        except subprocess.TimeoutExpired as e:
            raise SlurmUnavailable(argv, None, f"timed out after {self.timeout:g}s",
                                   what="slurmctld unreachable") from e
        except FileNotFoundError as e:
            raise SlurmNotInstalled(argv[0]) from e
        if proc.returncode != 0:
            # scontrol prints some errors ("Node x not found") on stdout.
            raise classify(argv, proc.returncode, (proc.stderr + "\n" + proc.stdout).strip(), target)
        return proc.stdout
