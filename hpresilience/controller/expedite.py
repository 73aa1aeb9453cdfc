"""Requeued auto-resume jobs made eligible at once (a requeued job waits for its credential to
expire, ~121 s, or Slurm 25.11's requeue_delay).

`srun --auto-resume` requeues a job with SlurmGateway.requeue(job, expedite=True), which marks
its Comment (or Slurm requeues an auto-resume job whose batch host died): the controller, which
runs as an admin, resets its StartTime. The runner cannot do it itself: the requeue kills it.

Slurm 25.11+ does this itself for a job submitted with --requeue=expedite (where
SlurmctldParameters=enable_expedited_requeue): it requeues with BeginTime 0 (batch_requeue_fini in
slurmctld/job_mgr.c), the job never waits for BeginTime, so this pass never sees it, and the
gateway does not mark it. Every other job still waits on 25.11, so the pass runs on every version
(issue 11, deliverable 6)."""
from __future__ import annotations

import structlog

from ..slurm import SlurmError, SlurmGateway
from ..slurm.gateway import without_expedite_mark
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
        try:
            # The user's own comment goes back exactly as it was, newlines included (issue 11).
            gateway.update_job(job.job_id, now=True, comment=without_expedite_mark(job.comment))
        except SlurmError as e:
            log.warning("controller.expedite_failed", job=job.job_id, error=str(e))
            continue
        done += 1
        log.info("controller.expedited", job=job.job_id, detail="requeued by auto-resume; eligible now")
    return done
