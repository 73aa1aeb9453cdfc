"""Parsing of real `scontrol -o` output captured from the test cluster
(Slurm 22.05.8, tests/fixtures/scontrol/)."""
from pathlib import Path

import pytest

from hpresilience.action import NodeAction
from hpresilience.slurm.errors import ParseError
from hpresilience.slurm.scontrol_parse import parse_jobs, parse_nodes, parse_record, parse_state, parse_version

FIXTURES = Path(__file__).parent.parent / "fixtures" / "scontrol"


def load(name):
    return (FIXTURES / name).read_text()


def by_name(nodes):
    return {n.name: n for n in nodes}


def test_idle_nodes():
    nodes = parse_nodes(load("nodes_idle.txt"))
    assert [n.name for n in nodes] == ["n1", "n2", "n3", "n4"]
    for i, n in enumerate(nodes, start=1):
        assert n.state == "IDLE" and n.flags == frozenset() and n.available
        assert n.reason is None and n.action_reason is None
        assert n.address == "127.0.0.1" and n.hostname == f"n{i}" and n.port == 17000 + i
        assert n.partitions == ("train",) and n.gres == ("gpu:8",) and n.cpus == 4
        assert n.boot_time is not None and n.boot_time.tzinfo is not None


def test_fail_and_drain_reasons():
    nodes = by_name(parse_nodes(load("nodes_fail_drain.txt")))
    n1 = nodes["n1"]
    assert (n1.state, n1.flags) == ("IDLE", frozenset({"FAIL"}))
    assert n1.reason == "Action: Replace; XID 74 NVLink error on GPU 3 (0000:b9:00)"
    assert n1.reason_user == "root" and n1.reason_time.isoformat().startswith("2026-11-22T11:12:36")
    assert n1.action_reason.action is NodeAction.REPLACE
    assert n1.is_drained and not n1.available
    n4 = nodes["n4"]
    # An admin's reason with '=' and brackets inside survives intact, and is not ours.
    assert n4.reason == "admin: bad fan Foo=bar [x]"
    assert n4.action_reason is None and n4.flags == frozenset({"DRAIN"})
    # Fields after the one with spaces (OS=Linux ... #1 SMP ...) are still read.
    assert n4.boot_time is not None and n4.partitions == ("train",)


def test_reboot_requested_node():
    (n2,) = parse_nodes(load("node_reboot_requested.txt"))
    assert n2.state == "ALLOCATED"
    assert n2.flags == frozenset({"DRAIN", "REBOOT_REQUESTED"})
    assert n2.reboot_pending and n2.is_busy and n2.next_state == "RESUME"
    assert n2.action_reason.action is NodeAction.REBOOT and n2.action_reason.detail == "test"


def test_not_responding_node():
    (n3,) = parse_nodes(load("node_down_not_responding.txt"))
    assert not n3.is_responding and "COMPLETING" in n3.flags and not n3.available


def test_jobs():
    jobs = {j.job_id: j for j in parse_jobs(load("jobs_running.txt"))}
    long = jobs[2]
    assert long.state == "RUNNING" and long.is_running and long.batch
    assert long.nodes == ("n1", "n2") and long.nodelist == "n[1-2]" and long.batch_host == "n1"
    assert long.exclusive and long.requeue and long.restart_count == 0 and long.num_nodes == 2
    assert jobs[1].exclusive is False and jobs[1].batch is False          # plain srun job
    assert jobs[3].gres == ("gpu:2",) and jobs[3].user == "root"
    assert {(j.array_job_id, j.array_task_id) for j in jobs.values() if j.name == "arr"} == {(4, "1"), (4, "2")}


def test_requeued_job():
    (job,) = parse_jobs(load("job_requeued_pending.txt"))
    assert job.restart_count == 1 and job.std_out == "/tmp/rq.out" and job.work_dir == "/tmp"


@pytest.mark.parametrize("text, base, flags", [
    ("IDLE", "IDLE", set()),
    ("ALLOCATED+FAIL", "ALLOCATED", {"FAIL"}),
    ("DOWN+DRAIN+REBOOT_ISSUED", "DOWN", {"DRAIN", "REBOOT_ISSUED"}),
    ("IDLE+COMPLETING+NOT_RESPONDING", "IDLE", {"COMPLETING", "NOT_RESPONDING"}),
    ("DOWN*", "DOWN", {"NOT_RESPONDING"}),           # sinfo-style suffixes (older releases)
    ("idle~", "IDLE", {"POWERED_DOWN"}),
])
def test_state(text, base, flags):
    assert parse_state(text) == (base, frozenset(flags))


def test_record_values_with_spaces():
    r = parse_record("NodeName=n1 OS=Linux 6.1 #1 SMP State=IDLE+DRAIN Reason=a b=c [root@2026-01-02T03:04:05]")
    assert r["OS"] == "Linux 6.1 #1 SMP" and r["State"] == "IDLE+DRAIN"
    assert r["Reason"] == "a b=c" and r["ReasonUser"] == "root"


def test_newer_gres_spelling():
    line = load("job_gres.txt").replace("TresPerNode=gres:gpu:2", "TresPerNode=gres/gpu:2")
    assert parse_jobs(line)[0].gres == ("gpu:2",)


@pytest.mark.parametrize("text, version", [
    ("slurm-wlm 22.05.8\n", (22, 5, 8)), ("slurm 23.11.4", (23, 11, 4)), ("slurm 25.11.0-1", (25, 11, 0)),
])
def test_version(text, version):
    assert parse_version(text) == version


def test_garbage_raises_parse_error():
    with pytest.raises(ParseError):
        parse_record("no keys here")
    with pytest.raises(ParseError):
        parse_nodes("Foo=bar Baz=1")
