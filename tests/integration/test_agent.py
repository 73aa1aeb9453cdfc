"""The node agent on the real test cluster: one agent per node, started by
`testcluster up --agents`, reading the node's kern.log and fake GPUs, and
changing the node's Slurm state through the real slurmctld."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from .conftest import LiveCluster, own_processes, wait_until

XID_LINE = ("NVRM: Xid (PCI:0000:b9:00): {xid}, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on "
            "link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)")
PORT_BASE = 28000


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """A second, small cluster with agents (its own dir and ports)."""
    directory = tmp_path_factory.mktemp("agents")
    c = LiveCluster(directory, ["n1", "n2", "n3"])
    c.tc("up", "--nodes", "3", "--port-base", str(PORT_BASE), "--agents", timeout=300)
    try:
        yield c
    finally:
        down = c.tc("down", check=False)
        assert down.returncode == 0, down.stderr
        assert not own_processes(directory)


def slurm_env(c: LiveCluster) -> dict:
    return {**os.environ, "SLURM_CONF": str(c.dir / "etc" / "slurm.conf")}


def node_line(c: LiveCluster, node: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True,
                         env=slurm_env(c), timeout=30).stdout
    return out


def state_and_reason(c: LiveCluster, node: str):
    line = node_line(c, node)
    state = line.split(" State=")[1].split()[0]
    reason = line.split(" Reason=")[1].rsplit(" [", 1)[0] if " Reason=" in line else None
    return state, reason


def resume(c: LiveCluster, node: str) -> None:
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=slurm_env(c),
                   capture_output=True, timeout=30)
    wait_until(lambda: state_and_reason(c, node)[0] == "IDLE", 30, f"{node} idle")


def test_agents_running(agents):
    out = agents.tc("status").stdout
    assert out.count("agent n") == 3 and "not running" not in out


def test_xid_74_fails_node_with_replace_within_2s(agents):
    t0 = time.monotonic()
    agents.tc("log", "n1", XID_LINE.format(xid=74))
    wait_until(lambda: "FAIL" in state_and_reason(agents, "n1")[0], 10, "n1 FAIL")
    elapsed = time.monotonic() - t0
    state, reason = state_and_reason(agents, "n1")
    print(f"XID 74 → {state} '{reason}' in {elapsed:.2f}s")
    assert reason.startswith("Action: Replace") and "74" in reason
    assert elapsed < 2.0
    resume(agents, "n1")


def test_xid_73_gives_reboot(agents):
    agents.tc("log", "n2", XID_LINE.format(xid=73))
    wait_until(lambda: "FAIL" in state_and_reason(agents, "n2")[0], 10, "n2 FAIL")
    assert state_and_reason(agents, "n2")[1].startswith("Action: Reboot")
    resume(agents, "n2")


def test_xid_13_changes_nothing(agents):
    agents.tc("log", "n3", "NVRM: Xid (PCI:0000:b9:00): 13, pid=1234, name=python, Graphics SM Warp Exception")
    time.sleep(2)
    assert state_and_reason(agents, "n3") == ("IDLE", None)


def test_admin_drain_keeps_admin_reason(agents):
    subprocess.run(["scontrol", "update", "nodename=n3", "state=drain", "reason=admin: fan noise"],
                   env=slurm_env(agents), check=True, timeout=30)
    agents.tc("log", "n3", XID_LINE.format(xid=74))
    time.sleep(2)
    state, reason = state_and_reason(agents, "n3")
    assert reason == "admin: fan noise" and "DRAIN" in state
    log = (agents.dir / "nodes" / "n3" / "agent.log").read_text()
    assert '"outcome": "foreign_reason"' in log
    resume(agents, "n3")


def test_lost_gpu_fails_node(agents):
    state_file = agents.dir / "nodes" / "n2" / "gpus.state"
    original = state_file.read_text()
    state_file.write_text(original + "gpu.3.lost=1\n")
    try:
        wait_until(lambda: "FAIL" in state_and_reason(agents, "n2")[0], 15, "n2 FAIL for a lost GPU")
        assert state_and_reason(agents, "n2")[1].startswith("Action: Reboot")
    finally:
        state_file.write_text(original)
        time.sleep(1.5)
        resume(agents, "n2")


def test_classify_command():
    lines = "\n".join([
        "Nov 22 11:20:21 n2 kernel: " + XID_LINE.format(xid=74),
        "[12345.678] NVRM: Xid (PCI:0000:b9:00): 13, pid=1, name=x, Graphics Exception",
        "an unrelated line",
    ])
    out = subprocess.run(["hpresilience", "classify"], input=lines, capture_output=True, text=True, timeout=60)
    records = [json.loads(x) for x in out.stdout.splitlines()]
    by_line = {r["line_no"]: r for r in records}
    assert by_line[1]["action"] == "replace" and by_line[1]["rule"]
    assert 3 not in by_line
    assert all({"line_no", "action", "rule", "message"} <= set(r) for r in records)

