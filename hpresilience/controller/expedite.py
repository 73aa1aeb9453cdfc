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

import datetime as dt
import math
import time
from typing import Optional

import structlog

from ..slurm import SlurmError, SlurmGateway
from ..slurm.gateway import without_expedite_mark
from ..slurm.reason import AUTO_RESUME_MARK, EXPEDITE_MARK

log = structlog.get_logger(__name__)

# Measured on 22.05 (issue 11): a requeued job started again within the second in which its node
# revoked its credential (slurmd does at the requeue's kill) is killed at launch, "Killing
# non-startable batch JobId=N: Job credential revoked", and ends FAILED: 4 of 6 requeued jobs
# made eligible at once onto their own node on the test cluster. Slurm compares whole seconds
# (a credential created no later than the revocation is refused), so the job may start from the
# second whole second after its requeue (SubmitTime, which the requeue resets): 8 of 8 started.
CREDENTIAL_MARGIN_SECONDS = 2


def earliest_start(requeued_at: Optional[dt.datetime], now: float) -> Optional[float]:
    """When a requeued job may start without meeting its revoked credential, as epoch seconds;
    None when that is now already (an unknown requeue time: now).

    >>> earliest_start(dt.datetime.fromtimestamp(1000.7, dt.timezone.utc), now=1001.0)
    1002.0
    >>> earliest_start(dt.datetime.fromtimestamp(1000.7, dt.timezone.utc), now=1002.0) is None
    True
    """
    if requeued_at is None:
        return None
    requeued = requeued_at.timestamp()
    earliest = float(math.floor(requeued) + CREDENTIAL_MARGIN_SECONDS)
    return earliest if earliest > now else None


def expedite_requeued(gateway: SlurmGateway, now: Optional[float] = None) -> int:
    """Expedite every marked requeued job; returns how many were."""
    now = time.time() if now is None else now
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
        if earliest_start(job.requeued_at, now) is not None:
            # Not StartTime=<that second>: 22.05 started a job with a future StartTime only at its
            # next periodic scheduling, 12-30 s later on the test cluster. A later pass does it.
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
