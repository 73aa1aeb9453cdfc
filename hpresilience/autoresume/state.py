"""The attempt count of one auto-resume step, kept in a file so it survives a requeue
(the batch script starts again from the top, on other nodes): with SLURM_RESTART_COUNT
it tells attempt k of N after any number of requeues.

Budgets are per step, not per job (issue 11, defect 1: a script's fourth successful
step was refused "attempts used up (3 of 3)"). A step's identity must be the same when
the batch script runs again from the top after a requeue, and differ between two steps
of one script. It is `<hash of srun's argv>.<k>`, k counting the earlier invocations of
the same argv in this run of the script:
- the argv (options and program, without `--auto-resume`) is what a re-run repeats
  and what tells two steps apart;
- k tells apart the same command run twice (a loop over `srun --auto-resume train.sh`);
- a global ordinal is not used: steps started in the background race for it, and a
  script that skips its finished stages after a requeue would shift it, either way
  handing one step's budget to another.
An argv that changes between runs (`$SLURM_RESTART_COUNT` or a date in it) gets a
fresh budget on each run; docs/auto-resume.md says to keep such values in the
environment. Two sruns of one job may start at once, so the per-run counter is
changed under an flock on a per-job lock file (they run on the batch host, so a
local lock suffices even on a shared state dir) and written atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from ..statefile import read_json, write_json


@dataclass(frozen=True)
class JobRun:
    """One run of the batch script: a requeue starts another (Slurm resets SubmitTime on a
    requeue and raises the restart count; an older job with a reused id differs in both)."""
    job_id: int
    restart_count: int
    submit_time: Optional[float]


@contextlib.contextmanager
def job_lock(directory: Path, job_id: int) -> Iterator[None]:
    # Read-only is enough for flock: a lock file left by another user (a reused job id in a
    # shared state directory) can still be locked (issue 11 review).
    fd = os.open(directory / f"auto-resume-{job_id}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def claim_step(directory: Path, run: JobRun, argv: Sequence[str]) -> str:
    """The identity of the step this srun invocation starts (see the module docstring)."""
    digest = hashlib.sha256("\0".join(argv).encode()).hexdigest()[:12]
    path = directory / f"auto-resume-{run.job_id}.steps.json"
    this_run = [run.restart_count, run.submit_time]
    with job_lock(directory, run.job_id):
        seen = read_json(path, {})
        counts = seen.get("counts", {}) if seen.get("run") == this_run else {}
        before = counts.get(digest, 0)
        counts[digest] = before + 1
        write_json(path, {"run": this_run, "counts": counts})
    return f"{digest}.{before}"


@dataclass
class AttemptState:
    job_id: int
    step: str                                # claim_step's identity: one budget per step (issue 11)
    submit_time: Optional[float] = None      # tells this job from an older one with the same id
    attempts: int = 0                        # attempts of this step so far, requeues included
    requeues: int = 0
    last_checkpoint_step: Optional[int] = None   # newest checkpoint when the last attempt started
    stall_progress: Optional[dict] = None        # Progress at the last stall (hang detection): a stall
                                                 # with none since ends the job, across requeues too
    fault: Optional[dict] = None                 # {"at", "requeues"}: the fault the next attempt resumes from
    history: List[dict] = field(default_factory=list)

    @staticmethod
    def path(directory: Path, job_id: int, step: str) -> Path:
        return directory / f"auto-resume-{job_id}-{step}.json"

    @classmethod
    def load(cls, directory: Path, job_id: int, step: str) -> AttemptState:
        path = cls.path(directory, job_id, step)
        try:
            data = json.loads(path.read_text())
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls(job_id, step)
        except (ValueError, TypeError) as e:
            raise ValueError(f"unreadable auto-resume state {path}: {e}") from None

    def save(self, directory: Path) -> None:
        write_json(self.path(directory, self.job_id, self.step), asdict(self))

    def note(self, event: str, **detail: object) -> None:
        self.history.append({"at": round(time.time(), 3), "event": event, **detail})
