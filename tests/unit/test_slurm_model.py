"""The in-memory Slurm model (tests/slurm_model.py, issue 9), driven through the real SlurmGateway: each
22.05 behaviour it claims (docs/testcluster.md, docs/controller.md, BRIEF §3-4), and its own invariants
under random operation sequences (Hypothesis)."""
import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpresilience.action import NodeAction
from hpresilience.slurm import (
    ActionReason,
    JobNotFound,
    NodeNotFound,
    NodeState,
    SlurmCommandError,
    SlurmGateway,
    SlurmUnavailable,
)
from hpresilience.slurm.models import StepResult
from tests.slurm_model import REQUEUE_DELAY_SECONDS, SlurmModel, Write

REBOOT = ActionReason(NodeAction.REBOOT, "XID 79")
REPLACE = ActionReason(NodeAction.REPLACE, "XID 74")


@pytest.fixture
def model() -> SlurmModel:
    return SlurmModel("n[1-4]")


@pytest.fixture
def gw(model: SlurmModel) -> SlurmGateway:
    return SlurmGateway(model)


def whole(t: dt.datetime) -> dt.datetime:
    return t.replace(microsecond=0)


# ------------------------------------------------------------------ FAIL, DRAIN, DOWN, RESUME
@pytest.mark.parametrize("state", [NodeState.FAIL, NodeState.DRAIN])
def test_fail_or_drain_on_a_busy_node_lets_the_job_run_then_leaves_it_out(model, gw, state):
    job = model.submit("n[1-2]")
    gw.mark_action("n1", REBOOT, state)
    node = gw.node("n1", with_jobs=True)
    assert (node.state, node.flags, node.jobs) == ("ALLOCATED", {state.value}, (job,))
    assert gw.job(job).state == "RUNNING"
    model.finish(job)
    model.tick()
    assert gw.node("n1").state_text == f"IDLE+{state.value}"
    assert gw.node("n2").state_text == "IDLE"


def test_reason_carries_its_writer_and_the_models_time_in_whole_seconds(model, gw):
    model.advance(10.7)
    with model.as_user("alice"):
        gw.mark_action("n1", REPLACE)
    node = gw.node("n1")
    assert (node.reason, node.reason_user, node.reason_time) == (str(REPLACE), "alice", whole(model.now))
    assert node.reason_time.tzinfo is not None
    assert model.writes == [Write(model.now, "alice", "update_node", "n1", {"state": "FAIL", "reason": str(REPLACE)})]


def test_fail_replaces_drain(model, gw):
    gw.set_state("n1", NodeState.DRAIN, "Action: Reboot")
    gw.set_state("n1", NodeState.FAIL, "Action: Replace")
    assert gw.node("n1").flags == {"FAIL"}


def test_down_kills_jobs_and_requeues_the_requeueable(model, gw):
    plain = model.submit("n1", requeue=False)
    requeueable = model.submit("n2", requeue=True, comment="hpr-auto-resume")
    gw.set_state("n[1-2]", NodeState.DOWN, "Action: Replace")
    assert gw.job(plain).state == "NODE_FAIL"
    job = gw.job(requeueable)
    assert (job.state, job.reason, job.restart_count, job.nodes) == ("PENDING", "BeginTime", 1, ())
    assert job.eligible_time == whole(model.now + dt.timedelta(seconds=REQUEUE_DELAY_SECONDS))
    assert [(p.job_id, p.comment) for p in gw.requeued_jobs()] == [(requeueable, "hpr-auto-resume")]
    assert {w.target: w.fields for w in model.writes if w.user == "slurm"} == {
        str(plain): {"job_state": "NODE_FAIL"}, str(requeueable): {"job_state": "PENDING"}}
    model.advance(REQUEUE_DELAY_SECONDS - 1)
    assert gw.job(requeueable).state == "PENDING"
    model.advance(1)
    assert gw.job(requeueable).nodes == ("n3",)   # not on the DOWN nodes


def test_requeue_waits_121s_unless_starttime_is_now(model, gw):
    job = model.submit("n1", requeue=True)
    gw.requeue(job)
    model.tick()
    assert gw.job(job).state == "PENDING"
    gw.update_job(job, now=True, comment="")
    model.tick()
    assert (gw.job(job).state, gw.job(job).restart_count) == ("RUNNING", 1)
    assert [w.op for w in model.writes] == ["requeue", "update_job"]


def test_requeue_refusals(model, gw):
    no_requeue = model.submit("n1")
    with pytest.raises(SlurmCommandError, match="presently disabled"):
        gw.requeue(no_requeue)
    with pytest.raises(JobNotFound):
        gw.requeue(99999)
    with pytest.raises(JobNotFound):
        gw.job(99999)


def test_update_job_shrinks_a_running_job_to_a_subset(model, gw):
    job = model.submit("n[1-3]")
    gw.update_job(job, nodelist=["n1", "n3"])
    assert (gw.job(job).nodes, gw.job(job).nodelist) == (("n1", "n3"), "n[1,3]")
    assert gw.node("n2").state == "IDLE"
    with pytest.raises(SlurmCommandError, match="not available"):
        gw.update_job(job, nodelist="n4")
    with pytest.raises(SlurmCommandError, match="no longer pending"):
        gw.update_job(job, now=True)


def test_a_reason_is_required_and_unknown_nodes_are_not_found(model, gw):
    with pytest.raises(SlurmCommandError, match="must specify a reason") as e:
        model.update_nodes("n1", "DRAIN", None)
    assert type(e.value) is SlurmCommandError
    with pytest.raises(NodeNotFound):
        gw.set_state("n[1,9]", NodeState.DRAIN, "x")
    with pytest.raises(NodeNotFound):
        gw.node("n9")
    assert gw.node("n1").reason is None and model.writes == []


def test_resume_clears_drain_fail_and_reason_but_not_an_idle_node(model, gw):
    gw.set_state("n1", NodeState.FAIL, "Action: Reboot")
    gw.set_state("n1", NodeState.RESUME)
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.reason_user, node.reason_time) == ("IDLE", None, None, None)
    with pytest.raises(SlurmCommandError, match="Invalid node state"):
        gw.set_state("n1", NodeState.RESUME)


def test_resume_of_a_down_node_shows_it_unregistered_until_slurmd_answers(model, gw):
    boot = gw.node("n1").boot_time
    gw.set_state("n1", NodeState.DOWN, "bad fan")
    gw.set_state("n1", NodeState.RESUME)
    node = gw.node("n1")
    assert (node.state_text, node.boot_time) == ("IDLE+NOT_RESPONDING", None)   # measured on 22.05
    model.advance(model.register_seconds)
    assert (gw.node("n1").state_text, gw.node("n1").boot_time) == ("IDLE", boot)


def test_resume_of_a_dead_node_goes_down_again(model, gw):
    model.kill("n1")
    model.advance(model.slurmd_timeout)
    gw.set_state("n1", NodeState.RESUME)
    model.advance(model.slurmd_timeout)
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.reason_user) == ("DOWN+NOT_RESPONDING", "Not responding", "slurm")


# ------------------------------------------------------------------ reboot
def test_reboot_asap_of_an_idle_node(model, gw):
    before = gw.node("n1").boot_time
    gw.reboot("n1", reason="Action: Reboot; XID 79")
    node = gw.node("n1")
    assert node.flags == {"DRAIN", "REBOOT_REQUESTED"} and node.next_state == "RESUME"
    model.tick()
    node = gw.node("n1")
    assert node.flags == {"DRAIN", "REBOOT_ISSUED"} and node.reason == "Action: Reboot; XID 79 : reboot issued"
    assert node.reason_user == "root"
    model.advance(model.reboot_seconds)
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.next_state) == ("IDLE", None, None)
    assert node.boot_time > before and node.boot_time > whole(model.now - dt.timedelta(seconds=model.reboot_seconds))


def test_reboot_waits_for_the_jobs(model, gw):
    job = model.submit("n1")
    gw.reboot("n1", reason="Action: Reboot")
    model.advance(600)
    assert gw.node("n1").flags == {"DRAIN", "REBOOT_REQUESTED"} and gw.job(job).is_running
    model.finish(job)
    model.advance(model.reboot_seconds)
    assert gw.node("n1").state_text == "IDLE"


@pytest.mark.parametrize("flag, next_state, after, reason", [
    ("FAIL", NodeState.RESUME, "IDLE+FAIL", "Action: Reboot : reboot issued"),
    ("DRAIN", NodeState.RESUME, "IDLE", None),
    ("DRAIN", None, "IDLE", None),
    ("FAIL", NodeState.DOWN, "DOWN+FAIL", "Action: Reboot : reboot issued : reboot complete"),
    ("DRAIN", NodeState.DOWN, "DOWN", "Action: Reboot : reboot issued : reboot complete"),
])
def test_reboot_of_a_flagged_node_as_measured(model, gw, flag, next_state, after, reason):
    """docs/testcluster.md, `scontrol reboot ASAP reason="Action: Reboot"` on a FAIL or DRAIN node."""
    gw.set_state("n1", NodeState(flag), "Action: Reboot")
    gw.reboot("n1", reason="Action: Reboot", next_state=next_state)
    model.advance(model.reboot_seconds)
    assert (gw.node("n1").state_text, gw.node("n1").reason) == (after, reason)


def test_a_reboot_that_never_comes_back_goes_down_after_resume_timeout(model, gw):
    model.hang_reboots.add("n1")
    gw.reboot("n1", reason="Action: Reboot")
    model.advance(model.resume_timeout - 1)
    assert "REBOOT_ISSUED" in gw.node("n1").flags
    model.advance(1)
    node = gw.node("n1")
    assert node.state_text == "DOWN+DRAIN+NOT_RESPONDING"
    assert (node.reason, node.reason_user) == ("Action: Reboot : reboot issued : reboot timed out", "slurm")
    model.power_on("n1")   # a late boot nobody asked for any more: the reason stays
    assert (gw.node("n1").state_text, gw.node("n1").reason_user) == ("DOWN+DRAIN", "slurm")


def test_reboot_refused_without_a_reboot_program(model, gw):
    model.reboot_program = False
    with pytest.raises(SlurmCommandError, match="RebootProgram"):
        gw.reboot("n1", reason="Action: Reboot")


# ------------------------------------------------------------------ silent and rebooted nodes
def test_a_dead_node_goes_down_after_slurmd_timeout_and_its_jobs_fail(model, gw):
    job = model.submit("n[1-2]")
    model.kill("n1")
    assert gw.node("n1").state_text == "ALLOCATED+NOT_RESPONDING" and gw.job(job).is_running
    model.advance(1000)   # the DOWN happens at SlurmdTimeout, not at the end of the advance
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.reason_user) == ("DOWN+NOT_RESPONDING", "Not responding", "slurm")
    assert node.reason_time == whole(model.now - dt.timedelta(seconds=1000 - model.slurmd_timeout))
    assert gw.job(job).state == "NODE_FAIL" and gw.node("n2").state == "IDLE"


def test_an_action_reason_survives_silence_and_an_unexpected_reboot(model, gw):
    gw.mark_action("n1", REBOOT)
    model.kill("n1")
    model.advance(model.slurmd_timeout)
    assert (gw.node("n1").state_text, gw.node("n1").reason) == ("DOWN+FAIL+NOT_RESPONDING", str(REBOOT))
    model.power_on("n1")
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.reason_user) == ("DOWN+FAIL", str(REBOOT), "root")


@pytest.mark.parametrize("dead_first", [True, False])
def test_an_unexpected_reboot_is_down_with_slurms_reason(model, gw, dead_first):
    before = gw.node("n1").boot_time
    if dead_first:
        model.kill("n1")
        model.advance(model.slurmd_timeout)
        model.power_on("n1")
    else:
        model.power_cycle("n1")
    node = gw.node("n1")
    assert (node.state_text, node.reason, node.reason_user) == ("DOWN", "Node unexpectedly rebooted", "slurm")
    assert node.boot_time > before


def test_a_node_down_only_for_silence_returns_when_it_answers(model, gw):
    model.kill("n1")
    model.kill("n2")
    gw.set_state("n2", NodeState.DOWN, "Not responding - DO NOT POWER CYCLE")   # an admin's
    model.advance(model.slurmd_timeout)
    model.revive("n1")
    model.revive("n2")
    assert (gw.node("n1").state_text, gw.node("n1").reason) == ("IDLE", None)
    assert (gw.node("n2").state_text, gw.node("n2").reason_user) == ("DOWN", "root")


# ------------------------------------------------------------------ power saving
def test_power_down_force_then_power_up_is_a_fresh_boot(model, gw):
    job = model.submit("n1")
    gw.mark_action("n1", REPLACE)
    before = gw.node("n1").boot_time
    gw.set_state("n1", NodeState.POWER_DOWN_FORCE, str(REPLACE))
    assert gw.job(job).state == "NODE_FAIL" and "POWERING_DOWN" in gw.node("n1").flags
    model.advance(model.suspend_timeout)
    assert gw.node("n1").state_text == "IDLE+FAIL+POWERED_DOWN"
    gw.set_state("n1", NodeState.POWER_UP)
    assert "POWERING_UP" in gw.node("n1").flags
    model.advance(model.reboot_seconds)
    node = gw.node("n1")
    assert (node.state_text, node.reason) == ("IDLE+FAIL", None) and node.boot_time > before   # measured


def test_a_power_up_that_never_comes_back(model, gw):
    model.hang_reboots.add("n1")
    gw.set_state("n1", NodeState.POWER_DOWN_FORCE)
    model.advance(model.suspend_timeout)
    gw.set_state("n1", NodeState.POWER_UP)
    model.advance(model.resume_timeout)
    assert (gw.node("n1").state, gw.node("n1").reason) == ("DOWN", "ResumeTimeout reached")


# ------------------------------------------------------------------ reservations, srun, steps
def test_maintenance_reservation(model, gw):
    gw.create_reservation("hpr_verify_n1", "n1", users=["root"], minutes=None)
    res = gw.reservation("hpr_verify_n1")
    assert (res.nodes, res.flags, res.users, res.state) == (("n1",), {"MAINT", "IGNORE_JOBS"}, ("root",), "ACTIVE")
    assert res.end_time - res.start_time == dt.timedelta(days=365)
    assert gw.node("n1").state_text == "IDLE+MAINTENANCE+RESERVED" and not gw.node("n1").available
    gw.set_reservation_nodes("hpr_verify_n1", "n[1-2]")
    assert gw.reservation("hpr_verify_n1").nodes == ("n1", "n2")
    with pytest.raises(SlurmCommandError, match="Duplicate"):
        gw.create_reservation("hpr_verify_n1", "n3", users=["root"], minutes=5)
    assert gw.delete_reservation("hpr_verify_n1") is True
    assert gw.delete_reservation("hpr_verify_n1") is False
    assert gw.node("n1").state_text == "IDLE"


def test_run_on_node_gives_the_check_with_sruns_own_words(model, gw):
    assert gw.run_on_node("n1", ["hpresilience", "check"], timeout=60) == StepResult(0, "healthy\n")
    model.check = lambda node: StepResult(1, "REBOOT XID_79 [GPU 3]\n") if node == "n2" else StepResult(0, "")
    result = gw.run_on_node("n2", ["hpresilience", "check"], timeout=60)
    assert result == StepResult(1, "REBOOT XID_79 [GPU 3]\nsrun: error: n2: task 0: Exited with exit code 1\n")
    assert [(r.node, r.reservation) for r in model.steps_run] == [("n1", None), ("n2", None)]


def test_srun_waits_for_a_node_it_may_not_use(model, gw):
    gw.create_reservation("hpr_verify_n1", "n1", users=["root"], minutes=None)
    start = model.now
    assert gw.run_on_node("n1", ["true"], timeout=300).returncode is None   # reserved for someone else
    assert model.now - start == dt.timedelta(seconds=300)
    assert gw.run_on_node("n1", ["true"], timeout=300, reservation="hpr_verify_n1").ok
    assert gw.run_on_node("n1", ["true"], timeout=300, reservation="nope").returncode == 1


def test_srun_after_resume_of_a_down_node_waits_for_its_registration(model, gw):
    gw.set_state("n1", NodeState.DOWN, "Action: Reboot")
    gw.set_state("n1", NodeState.RESUME)
    assert gw.run_on_node("n1", ["true"], timeout=300).ok


def test_steps_and_signals(model, gw):
    job = model.submit("n[1-2]")
    step = model.start_step(job)
    assert [(s.step_id, s.state, s.nodes) for s in gw.steps(job)] == [(step, "RUNNING", ("n1", "n2"))]
    gw.signal_step(step, "USR1")
    assert len(gw.steps(job)) == 1
    gw.signal_step(step, "KILL")
    assert gw.steps(job) == [] and model.writes[-1].fields == {"signal": "KILL"}
    with pytest.raises(JobNotFound):
        gw.signal_step(f"{job}.7")
    assert gw.steps(424242) == []


def test_completing_nodes_are_busy_until_the_epilog_ends():
    model = SlurmModel("n1", epilog_seconds=5)
    gw = SlurmGateway(model)
    job = model.submit("n1")
    model.finish(job, "FAILED")
    assert gw.node("n1").state_text == "IDLE+COMPLETING" and gw.node("n1").is_busy
    model.advance(5)
    assert (gw.node("n1").state_text, gw.job(job).state) == ("IDLE", "FAILED")


def test_slurmctld_unreachable(model, gw):
    model.controller_down = True
    with pytest.raises(SlurmUnavailable):
        gw.nodes()
    with pytest.raises(SlurmUnavailable):
        gw.set_state("n1", NodeState.DRAIN, "x")
    model.controller_down = False
    assert gw.node("n1").reason is None


def test_the_clock_only_moves_forward(model):
    with pytest.raises(ValueError):
        model.advance(-1)
    model.sleep(2.5)
    assert model.clock() - model.now.timestamp() == 0 and model.now.second == 2


def test_submit_refuses_what_slurm_would_not_start(model, gw):
    gw.set_state("n1", NodeState.DRAIN, "x")
    with pytest.raises(ValueError):
        model.submit("n1")
    model.submit("n2", exclusive=False)
    assert gw.node("n2").state == "MIXED"
    with pytest.raises(ValueError):
        model.submit("n2", exclusive=True)


# ------------------------------------------------------------------ the model's own invariants
NODES = ["n1", "n2", "n3"]
OPS = st.one_of(
    st.tuples(st.just("state"), st.sampled_from(NODES), st.sampled_from(["FAIL", "DRAIN", "DOWN", "RESUME",
                                                                        "POWER_DOWN_FORCE", "POWER_UP"])),
    st.tuples(st.just("reboot"), st.sampled_from(NODES), st.sampled_from([None, "RESUME", "DOWN"])),
    st.tuples(st.sampled_from(["kill", "power_on", "revive", "hang", "submit", "finish"]), st.sampled_from(NODES),
              st.none()),
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 5, 61, 130, 301]), st.none()),
)


def _apply(model: SlurmModel, gw: SlurmGateway, op, target, arg) -> None:
    """One operation; what Slurm or the model refuses is part of the game."""
    try:
        if op == "state":
            gw.set_state(target, NodeState(arg), None if arg in ("RESUME", "POWER_UP") else "Action: Reboot")
        elif op == "reboot":
            gw.reboot(target, reason="Action: Reboot", next_state=NodeState(arg) if arg else None)
        elif op == "advance":
            model.advance(target)
        elif op == "hang":
            model.hang_reboots ^= {target}
        elif op == "submit":
            model.submit(target, requeue=True)
        elif op == "finish":
            for job in gw.jobs():
                if job.is_running and target in job.nodes:
                    model.finish(job.job_id)
        else:
            getattr(model, op)(target)
    except (SlurmCommandError, ValueError):
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, max_size=40))
def test_model_invariants_hold_under_any_sequence(ops):
    model = SlurmModel(",".join(NODES))
    gw = SlurmGateway(model)
    boots = {n.name: n.boot_time for n in gw.nodes()}
    for op in ops:
        _apply(model, gw, *op)
        jobs = gw.jobs()
        for node in gw.nodes(with_jobs=True):
            running = [j for j in jobs if j.is_running and node.name in j.nodes]
            assert (node.state in ("ALLOCATED", "MIXED")) == bool(running)   # a DOWN node runs nothing
            assert not (running and node.flags & {"POWERED_DOWN", "REBOOT_ISSUED"})
            assert (node.reason is None) == (node.reason_user is None) == (node.reason_time is None)
            assert node.reason_time is None or node.reason_time <= model.now
            if node.boot_time is not None:
                assert node.boot_time >= boots[node.name]
                boots[node.name] = node.boot_time
        for job in jobs:
            assert (job.state == "PENDING") == (job.reason in ("BeginTime", "Resources"))
        assert [w.time for w in model.writes] == sorted(w.time for w in model.writes)
