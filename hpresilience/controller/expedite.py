"""Requeued auto-resume jobs made eligible at once (before Slurm 25.11 a requeued
job waits ~121 s for its credential to expire).

`srun --auto-resume` requeues a job and marks its Comment (or Slurm requeues an
auto-resume job whose batch host died): the controller, which runs as an admin,
resets its StartTime. The runner cannot do it itself: the requeue kills it."""
from __future__ import annotations

import structlog

from ..slurm import SlurmError, SlurmGateway
from ..slurm.reason import AUTO_RESUME_MARK, EXPEDITE_MARK

log = structlog.get_logger(__name__)


def expedite_requeued(gateway: SlurmGateway) -> int:
    """Expedite every marked requeued job; returns how many were."""
    try:
        pending = gateway.requeued_jobs()
    except SlurmError as e:
        log.warning("controller.expedite_failed", error=str(e))
        return 0
    done = 0
    for job in pending:
        marks = job.comment.split()
        if EXPEDITE_MARK not in marks and AUTO_RESUME_MARK not in marks:
            continue
        rest = " ".join(w for w in marks if w != EXPEDITE_MARK)
        try:
            gateway.update_job(job.job_id, now=True, comment=rest)
        except SlurmError as e:
            log.warning("controller.expedite_failed", job=job.job_id, error=str(e))
            continue
        done += 1
        log.info("controller.expedited", job=job.job_id, detail="requeued by auto-resume; eligible now")
    return done
