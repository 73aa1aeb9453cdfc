"""The Slurm gateway against the real test cluster."""
import dataclasses
import datetime as dt
import os

import pytest
import structlog

from hpresilience.action import NodeAction
from hpresilience.controller.expedite import expedite_requeued
from hpresilience.slurm import (
    ActionReason,
    CommandRunner,
    InvalidNodeName,
    JobNotFound,
    NodeNotFound,
    NodeState,
    ReasonNotOurs,
    ReasonOwner,
    ScontrolBackend,
    SlurmGateway,
    SlurmNotInstalled,
    SlurmUnavailable,
)
from hpresilience.slurm.reason import MAX_REASON_LEN

from .conftest import PORT_BASE, wait_until


def test_version_detected(gateway):
    assert gateway.version >= (22, 5, 0)
    assert gateway.requeue_has_delay == (gateway.version < (25, 11, 0))


def test_read_nodes(gateway, cluster):
    nodes = gateway.nodes()
    assert [n.name for n in nodes] == cluster.nodes
    for n in nodes:
        assert n.address == "127.0.0.1" and n.hostname == n.name
        assert n.partitions == ("train",) and n.gres == ("gpu:8",)
        assert n.boot_time is not None and n.boot_time < dt.datetime.now().astimezone()
    assert [n.name for n in gateway.nodes("n[2-3]")] == ["n2", "n3"]


def test_read_jobs_and_jobs_on_nodes(tc, gateway):
    job_id = tc.sbatch("-N2", "--exclusive", "--gres=gpu:1", "-J", "readme", "--wrap", "sleep 300")
    job = wait_until(lambda: (j := gateway.job(job_id)).is_running and j, 30, "job running")
    assert job.name == "readme" and job.num_nodes == 2 and len(job.nodes) == 2
    assert job.exclusive and job.requeue and job.restart_count == 0 and job.batch
    assert job.batch_host == job.nodes[0] and job.gres == ("gpu:1",)
    on = {n.name: n.jobs for n in gateway.nodes(with_jobs=True)}
    assert all(job_id in on[name] for name in job.nodes)
    assert all(job_id not in jobs for name, jobs in on.items() if name not in job.nodes)
    array = tc.sbatch("--array=1-2", "-N1", "--wrap", "sleep 300")
    wait_until(lambda: len([j for j in gateway.jobs() if j.array_job_id == array and j.is_running]) == 2,
               30, "both array tasks running")
    assert {j.array_task_id for j in gateway.jobs() if j.array_job_id == array} == {"1", "2"}


def test_fail_node_with_action_reason_lets_job_finish(tc, gateway):
    job_id = tc.sbatch("-N1", "-w", "n1", "--wrap", "sleep 300")
    wait_until(lambda: gateway.job(job_id).is_running, 30, "job running")
    gateway.mark_action("n1", ActionReason(NodeAction.REPLACE, "XID 74 NVLink error on GPU 3 (0000:b9:00)"))
    n1 = gateway.node("n1", with_jobs=True)
    assert n1.is_busy and "FAIL" in n1.flags and n1.jobs == (job_id,)
    assert n1.reason == "Action: Replace; XID 74 NVLink error on GPU 3 (0000:b9:00)"
    assert n1.action_reason == ActionReason(NodeAction.REPLACE, "XID 74 NVLink error on GPU 3 (0000:b9:00)")
    assert n1.reason_user == "root" and n1.reason_time is not None
    assert gateway.job(job_id).is_running                       # FAIL does not kill the job
    tc.slurm("scancel", str(job_id))
    wait_until(lambda: not gateway.node("n1").is_busy, 30, "job gone from n1")
    assert gateway.node("n1").flags == frozenset({"FAIL"})
    gateway.set_state("n1", NodeState.RESUME)
    assert gateway.node("n1").available and gateway.node("n1").reason is None


def test_hyperpod_style_reason_is_recognised(tc, gateway):
    tc.slurm("scontrol", "update", "nodename=n2", "state=fail", "reason=Action:Replace")
    assert gateway.node("n2").action_reason.action is NodeAction.REPLACE
    gateway.set_state("n2", NodeState.RESUME)


def test_never_overwrites_or_clears_a_reason_we_did_not_write(tc, gateway):
    tc.slurm("scontrol", "update", "nodename=n3", "state=drain", "reason=admin: fan noise, ticket 42")
    with pytest.raises(ReasonNotOurs, match="n3"):
        gateway.mark_action("n3", ActionReason(NodeAction.REBOOT, "hung task"))
    n3 = gateway.node("n3")
    assert n3.reason == "admin: fan noise, ticket 42" and "DRAIN" in n3.flags


def test_reason_owner_by_writer_and_exact_form(tc, gateway):
    """Issue 9, defect 2: an admin's text that starts like Slurm's own is the admin's."""
    assert gateway.slurm_user == "root"                       # the test cluster's SlurmUser
    tc.slurm("scontrol", "update", "nodename=n3", "state=drain", "reason=Not responding - DO NOT POWER CYCLE")
    assert gateway.node("n3").reason_owner is ReasonOwner.FOREIGN
    tc.slurm("scontrol", "update", "nodename=n3", "state=drain", "reason=Action: Reboot requested by bob")
    assert gateway.node("n3").reason_owner is ReasonOwner.FOREIGN
    tc.slurm("scontrol", "update", "nodename=n3", "state=resume")


def test_reason_sanitized_through_slurm(tc, gateway):
    gateway.mark_action("n4", ActionReason(NodeAction.REBOOT, "first line\nsecond line\t" + "x" * 400),
                        state=NodeState.DRAIN)
    n4 = gateway.node("n4")
    assert "\n" not in n4.reason and len(n4.reason) <= MAX_REASON_LEN
    assert n4.reason.startswith("Action: Reboot; first line second line x")
    assert n4.action_reason.action is NodeAction.REBOOT


def test_reboot_changes_boot_time(tc, gateway):
    before = gateway.node("n3")
    gateway.reboot("n3", reason="Action: Reboot; gateway test")
    after = wait_until(lambda: (n := gateway.node("n3")).boot_time > before.boot_time + dt.timedelta(seconds=1)
                       and n.state == "IDLE" and not n.flags and n, 60, "n3 rebooted and idle")
    assert after.reason is None                                  # nextstate=RESUME cleared it
    assert "reboot requested" in (tc.dir / "nodes" / "n3" / "reboots.log").read_text()


def test_user_text_cannot_forge_a_job_record(tc, gateway):
    """Issue 11, deliverable 6: a job name with `NodeList=`/`BatchHost=` words and a comment with a
    newline and a whole forged record line (22.05 prints both raw) change nothing read from Slurm."""
    forged = "x NodeList=n9 BatchHost=n9 OverSubscribe=NO"
    comment = "mine\nJobId=999 JobState=RUNNING NodeList=n[1-4] Requeue=1"
    job_id = tc.sbatch("-N1", "-J", forged, f"--comment={comment}", "--wrap", "sleep 300")
    job = wait_until(lambda: (j := gateway.job(job_id)).is_running and j, 30, "job running")
    assert job.name == forged and job.extra["Comment"] == comment
    assert len(job.nodes) == 1 and job.batch_host == job.nodes[0] and not job.exclusive
    jobs = gateway.jobs()
    assert 999 not in [j.job_id for j in jobs] and [j.nodes for j in jobs if j.job_id == job_id] == [job.nodes]


def test_an_expedited_requeue_restarts_the_job_on_its_own_node_with_the_users_comment(tc, gateway, tmp_path):
    """Requeue: restart count and SLURM_RESTART_COUNT (issue 9). Expedited (issue 11): our mark in
    front of the user's comment, newline kept, which the controller's pass strips. And the job runs
    again on its own node: StartTime=now right after a requeue started it within the second its node
    had revoked its credential, and Slurm killed it at launch ("Job credential revoked", FAILED: 4 of
    6 on this cluster); pinned to its node (-w), it must run again, twice."""
    out = tmp_path / "out.txt"
    comment = "run 7\nof sweep"
    job_id = tc.sbatch("-N1", "-w", tc.nodes[0], "--requeue", f"--comment={comment}", "--open-mode=append",
                       "-o", str(out), "--wrap", 'echo "restart=${SLURM_RESTART_COUNT:-0}"; sleep 300')
    for restart in (1, 2):
        wait_until(lambda r=restart: f"restart={r - 1}" in (out.read_text() if out.exists() else ""), 30,
                   f"run {restart}")
        gateway.requeue(job_id, expedite=True)
        pending = wait_until(lambda: (j := gateway.job(job_id)).state == "PENDING" and j, 30, "job pending")
        assert pending.restart_count == restart and pending.extra["Comment"] == f"hpr-expedite {comment}"
        wait_until(lambda: expedite_requeued(gateway) == 1, 10, "the controller's expedite")
        wait_until(lambda r=restart: f"restart={r}" in out.read_text() or gateway.job(job_id).state == "FAILED",
                   30, f"run {restart + 1}, made eligible within seconds")
        job = gateway.job(job_id)
        assert job.state == "RUNNING" and job.extra["Comment"] == comment, job


def test_shrink_running_job(tc, gateway):
    job_id = tc.sbatch("-N3", "--wrap", "sleep 300")
    job = wait_until(lambda: (j := gateway.job(job_id)).is_running and j, 30, "3-node job running")
    keep = job.nodes[:2]
    gateway.update_job(job_id, nodelist=keep)
    assert wait_until(lambda: gateway.job(job_id).nodes == keep, 15, "job shrunk")


def test_unknown_node_and_job_are_typed_errors(gateway):
    with pytest.raises(NodeNotFound) as err:
        gateway.node("n99")
    assert err.value.node == "n99" and "n99" in str(err.value)
    with pytest.raises(NodeNotFound) as err:
        gateway.set_state("n99", NodeState.DRAIN, "Action: Reboot")
    assert err.value.node == "n99"
    with pytest.raises(NodeNotFound, match="n77"):
        gateway.nodes(["n1", "n77"])
    with pytest.raises(JobNotFound) as err:
        gateway.job(999999)
    assert err.value.job_id == "999999"
    with pytest.raises(JobNotFound):
        gateway.requeue(999999)


def test_bad_node_names_never_reach_slurm(gateway):
    for bad in ("n1 state=resume", "n1;reboot", ""):
        with pytest.raises(InvalidNodeName):
            gateway.set_state(bad, NodeState.DRAIN, "Action: Reboot")


def test_controller_down_retries_then_clear_error(cluster, tmp_path):
    conf = tmp_path / "slurm.conf"
    text = (cluster.dir / "etc" / "slurm.conf").read_text()
    # Nothing listens 499 ports above this worker's cluster (the next worker's is 500 above).
    conf.write_text(text.replace(f"SlurmctldPort={PORT_BASE}", f"SlurmctldPort={PORT_BASE + 499}"))
    assert f"SlurmctldPort={PORT_BASE + 499}" in conf.read_text()
    runner = CommandRunner(timeout=15, attempts=3, env={**os.environ, "SLURM_CONF": str(conf)})
    gateway = SlurmGateway(ScontrolBackend(dataclasses.replace(runner, sleep=lambda s: None)))
    with structlog.testing.capture_logs() as logs, pytest.raises(SlurmUnavailable) as err:
        gateway.nodes()
    assert "Unable to contact slurm controller" in str(err.value)
    assert [e["attempt"] for e in logs if e["event"] == "slurm.retry"] == [1, 2]


def test_missing_scontrol_says_what_to_install(tmp_path):
    gateway = SlurmGateway(ScontrolBackend(CommandRunner(env={"PATH": str(tmp_path)})))
    with pytest.raises(SlurmNotInstalled, match="apt-get install slurm-client"):
        gateway.nodes()
