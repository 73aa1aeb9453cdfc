"""SlurmGateway.requeue(job, expedite=...) on Slurm before 25.11 (our Comment mark, the controller's
StartTime=now) and on 25.11+ (--requeue=expedite, Slurm's own), through the in-memory model (issue 11,
deliverable 6). 25.11's behaviour is from its source (doc/man/man1/sbatch.1, slurmctld/job_mgr.c), not run."""
import pytest

from hpresilience.controller.expedite import CREDENTIAL_MARGIN_SECONDS, expedite_requeued
from hpresilience.slurm import SlurmGateway
from hpresilience.slurm.reason import EXPEDITE_MARK
from tests.slurm_model import REQUEUE_DELAY_SECONDS, SlurmModel

USER_TEXT = "run 7\nkeep  this: a=b"


@pytest.fixture(params=[(22, 5, 8), (25, 11, 0)], ids=["22.05", "25.11"])
def model(request) -> SlurmModel:
    return SlurmModel("n[1-2]", version=request.param)


def comment_writes(model: SlurmModel, job: int):
    return [w.fields["Comment"] for w in model.writes if w.op == "update_job" and w.target == str(job)]


def test_expedite_marks_the_users_comment_once_then_the_controller_restores_it(model):
    """Any version, a job not submitted --requeue=expedite: our mark in front, the user's text kept
    exactly (old code: the controller re-joined words, losing newlines and double spaces)."""
    job = model.submit("n1", requeue=True, comment=USER_TEXT)
    gw = SlurmGateway(model)
    gw.requeue(job, expedite=True)
    assert model.job(job).state == "PENDING" and model.job(job).extra["Comment"] == f"{EXPEDITE_MARK} {USER_TEXT}"
    model.advance(CREDENTIAL_MARGIN_SECONDS)        # see the credential test below
    assert expedite_requeued(gw, model.clock()) == 1
    assert model.job(job).extra["Comment"] == USER_TEXT
    model.tick()
    assert model.job(job).is_running   # eligible within 2 s, not after the requeue delay


def test_a_job_marked_already_is_not_marked_twice(model):
    job = model.submit("n1", requeue=True, comment=f"{EXPEDITE_MARK} mine")
    SlurmGateway(model).requeue(job, expedite=True)
    assert model.job(job).state == "PENDING" and comment_writes(model, job) == []


def test_without_expedite_the_comment_is_not_touched(model):
    job = model.submit("n1", requeue=True, comment=USER_TEXT)
    SlurmGateway(model).requeue(job)
    assert model.job(job).state == "PENDING" and model.job(job).reason == "BeginTime"
    assert comment_writes(model, job) == []
    model.advance(REQUEUE_DELAY_SECONDS)
    assert model.job(job).is_running


def test_on_25_11_slurm_expedites_an_expedite_job_itself():
    model = SlurmModel("n[1-2]", version=(25, 11, 0))
    job = model.submit("n1", requeue=True, expedite=True, comment=USER_TEXT)
    gw = SlurmGateway(model)
    gw.requeue(job, expedite=True)
    assert [w.op for w in model.writes if w.target == str(job)] == ["requeue"]   # no comment write
    assert model.job(job).extra["Comment"] == USER_TEXT
    assert expedite_requeued(gw) == 0 and gw.requeued_jobs() == []   # never waits for BeginTime
    model.tick()
    assert model.job(job).is_running


def test_before_25_11_there_is_no_expedite_submit():
    with pytest.raises(ValueError):
        SlurmModel("n1").submit("n1", requeue=True, expedite=True)


def test_a_requeued_job_is_never_made_eligible_within_the_second_its_credential_was_revoked():
    """Issue 11: on 22.05 a requeued job started again in the second its node revoked its credential
    (at the requeue) is killed at launch and ends FAILED; StartTime=now did that to 4 of 6 jobs on
    the test cluster. The controller makes it eligible from the second whole second after the
    requeue (a later pass: a future StartTime waited for Slurm's periodic scheduling, 12-30 s)."""
    model = SlurmModel("n[1-2]")
    model.advance(10.4)
    job = model.submit("n1", requeue=True)
    gw = SlurmGateway(model)
    gw.requeue(job, expedite=True)                  # at 10.4 s: the credential is revoked in second 10
    assert expedite_requeued(gw, model.clock()) == 0
    model.advance(1.5)                              # 11.9 s
    assert expedite_requeued(gw, model.clock()) == 0
    model.advance(0.1)                              # 12.0 s
    assert expedite_requeued(gw, model.clock()) == 1
    (update,) = [w for w in model.writes if w.op == "update_job" and "StartTime" in w.fields]
    assert update.fields["StartTime"] == "now" and update.time == model.now
