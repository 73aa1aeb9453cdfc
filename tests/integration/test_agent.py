"""The node agent on the real test cluster: one agent per node, started by
`testcluster up --agents`, reading the node's kern.log and fake GPUs, and
changing the node's Slurm state through the real slurmctld."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from .conftest import LiveCluster, private_cluster, wait_until

XID_LINE = ("NVRM: Xid (PCI:0000:b9:00): {xid}, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on "
            "link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)")
PORT_BASE = 28000


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """A second, small cluster with agents (its own dir and ports)."""
    with private_cluster(tmp_path_factory, "agents", 3, PORT_BASE, "--agents") as c:
        yield c


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
    # Issue 9, defect 15: first the positive sign that the agent read and classified the line.
    log = agents.dir / "nodes" / "n3" / "agent.log"
    wait_until(lambda: '"code": "XID_13"' in log.read_text(), 10, "the agent to log XID 13")
    assert state_and_reason(agents, "n3") == ("IDLE", None)


def test_admin_drain_keeps_admin_reason(agents):
    subprocess.run(["scontrol", "update", "nodename=n3", "state=drain", "reason=admin: fan noise"],
                   env=slurm_env(agents), check=True, timeout=30)
    agents.tc("log", "n3", XID_LINE.format(xid=74))
    log = agents.dir / "nodes" / "n3" / "agent.log"
    wait_until(lambda: '"outcome": "foreign_reason"' in log.read_text(), 10, "the agent to see the admin's reason")
    state, reason = state_and_reason(agents, "n3")
    assert reason == "admin: fan noise" and "DRAIN" in state
    # The fault is not forgotten: once the admin returns the node, the agent acts on it.
    subprocess.run(["scontrol", "update", "nodename=n3", "state=resume"], env=slurm_env(agents), check=True,
                   timeout=30)
    wait_until(lambda: (state_and_reason(agents, "n3")[1] or "").startswith("Action: Replace"), 20,
               "pending XID 74 applied after the admin's resume")
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



def agent_log(c: LiveCluster, node: str) -> str:
    return (c.dir / "nodes" / node / "agent.log").read_text()


def agent_pid(c: LiveCluster, node: str) -> int:
    return int((c.dir / "nodes" / node / "agent.pid").read_text())


def test_decision_survives_slurmctld_outage_and_agent_restart(agents):
    """slurmctld down: the decision waits on disk, survives an agent restart, and lands when Slurm is back."""
    agents.tc("slurmctld", "stop")
    try:
        agents.tc("log", "n2", XID_LINE.format(xid=74))
        wait_until(lambda: '"agent.action_deferred"' in agent_log(agents, "n2"), 30, "decision deferred")
        pending = agents.dir / "nodes" / "n2" / "agent-state" / "pending-events.json"
        assert "XID_74" in pending.read_text()
        # The agent keeps turning while Slurm is away: it still answers SIGTERM promptly.
        os.kill(agent_pid(agents, "n2"), signal.SIGTERM)
        wait_until(lambda: '"agent.stopped"' in agent_log(agents, "n2"), 20, "agent stopped")
    finally:
        agents.tc("slurmctld", "start")
    agents.tc("kill", "n2")
    agents.tc("start", "n2")            # boots the node: slurmd and a fresh agent, as systemd would
    wait_until(lambda: "Action: Replace" in (state_and_reason(agents, "n2")[1] or ""), 60,
               "pending XID 74 applied after slurmctld came back")
    resume(agents, "n2")


def test_no_replay_after_agent_restart(agents):
    agents.tc("log", "n1", XID_LINE.format(xid=73))
    wait_until(lambda: "FAIL" in state_and_reason(agents, "n1")[0], 10, "n1 FAIL")
    resume(agents, "n1")
    os.kill(agent_pid(agents, "n1"), signal.SIGTERM)
    wait_until(lambda: agent_log(agents, "n1").count('"agent.stopped"') >= 1, 20, "agent stopped")
    agents.tc("kill", "n1")
    agents.tc("start", "n1")
    resume(agents, "n1")  # Slurm may hold it DOWN as "unexpectedly rebooted"
    # Issue 9, defect 15: the restarted agent is running and has read its log before we
    # conclude it did nothing with the old line.
    wait_until(lambda: agent_log(agents, "n1").count('"agent.started"') >= 2, 20, "agent restarted")
    agents.tc("log", "n1", "NVRM: Xid (PCI:0000:b9:00): 13, pid=1, name=probe, marker after restart")
    wait_until(lambda: "marker after restart" in agent_log(agents, "n1"), 20, "the restarted agent to read")
    # The XID 73 line is still in kern.log; the restarted agent must not act on it again.
    assert state_and_reason(agents, "n1") == ("IDLE", None)


def test_sighup_reload_keeps_running_on_bad_config(agents):
    conf = agents.dir / "nodes" / "n3" / "agent.toml"
    good = conf.read_text()
    pid = agent_pid(agents, "n3")
    try:
        conf.write_text(good + "\n[system]\nfull_threshold_percent = 'high'\n")
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: '"agent.reload_failed"' in agent_log(agents, "n3"), 10, "reload refused")
        failed = [line for line in agent_log(agents, "n3").splitlines() if '"agent.reload_failed"' in line]
        assert "system.full_threshold_percent: expected a number" in failed[-1]
        conf.write_text(good.replace("[kernel_log]", "[kernel_log]\npoll_interval_seconds = 0.2"))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: '"agent.reloaded"' in agent_log(agents, "n3"), 10, "reload applied")
        # Still detecting after the reload:
        agents.tc("log", "n3", XID_LINE.format(xid=74))
        wait_until(lambda: "FAIL" in state_and_reason(agents, "n3")[0], 10, "n3 FAIL after reload")
    finally:
        conf.write_text(good)
        resume(agents, "n3")


def test_bad_config_refuses_to_start(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text("[agent]\ncheck_interval_seconds = 'fast'\n")
    proc = subprocess.run(["hpresilience", "agent", "--config", str(conf)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"{conf}: agent.check_interval_seconds: expected a number" in proc.stderr
    rules = tmp_path / "rules.toml"
    rules.write_text("[rules.mine]\npattern = 'x['\ncode = 'X'\naction = 'reboot'\nmessage = 'x'\n")
    conf.write_text(f"[kernel_log]\nrules_file = '{rules}'\n")
    proc = subprocess.run(["hpresilience", "agent", "--config", str(conf)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and 'rule "mine"' in proc.stderr and "pattern" in proc.stderr


def boot_time_of(c: LiveCluster, node: str) -> str:
    return node_line(c, node).split(" BootTime=")[1].split()[0]


def test_check_reads_kernel_log_back_to_boot_only(agents):
    conf = str(agents.dir / "nodes" / "n3" / "agent.toml")
    agents.tc("log", "n3", XID_LINE.format(xid=74))
    wait_until(lambda: "FAIL" in state_and_reason(agents, "n3")[0], 10, "n3 FAIL")
    failing = agents.tc("exec", "n3", "--", "hpresilience", "check", "--config", conf, check=False)
    assert failing.returncode == 1 and "XID_74" in failing.stdout
    # After a reboot the XID line is still in kern.log (as in /var/log/messages), but it is history.
    before = boot_time_of(agents, "n3")
    subprocess.run(["scontrol", "reboot", "ASAP", "nextstate=resume", "n3"], env=slurm_env(agents), check=True,
                   timeout=30)
    # Slurm keeps FAIL across a reboot (reason + " : reboot issued"); returning the node is the controller's job.
    wait_until(lambda: boot_time_of(agents, "n3") != before and "REBOOT" not in state_and_reason(agents, "n3")[0]
               and "NOT_RESPONDING" not in state_and_reason(agents, "n3")[0], 60, "n3 rebooted")
    ok = agents.tc("exec", "n3", "--", "hpresilience", "check", "--config", conf, check=False)
    assert ok.returncode == 0 and "healthy" in ok.stdout, ok.stdout + ok.stderr
    state = agents.dir / "nodes" / "n3" / "gpus.state"
    original = state.read_text()
    try:
        state.write_text(original + "gpu.2.remap_failure=1\n")
        bad = agents.tc("exec", "n3", "--", "hpresilience", "check", "--config", conf, check=False)
        assert bad.returncode == 1 and "ROW_REMAP_FAILURE" in bad.stdout
    finally:
        state.write_text(original)
        time.sleep(1.5)
        resume(agents, "n3")


def test_systemd_notify_protocol(tmp_path):
    """The real daemon under a systemd-like supervisor: READY, WATCHDOG, STATUS, reload, clean stop."""
    log = tmp_path / "kern.log"
    log.write_text("")
    conf = tmp_path / "agent.toml"
    conf.write_text(f"""
[agent]
node_name = "nodeless"
state_dir = "{tmp_path / 'state'}"
metrics_port = 0
control_socket = ""
[kernel_log]
sources = ["{log}"]
[nvml]
enabled = false
""")
    sock_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(20)
        env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"}
        proc = subprocess.Popen(["hpresilience", "agent", "--config", str(conf)], env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            messages = [sock.recv(4096).decode() for _ in range(2)]
            assert messages[0].startswith("READY=1\nSTATUS=watching nodeless")
            assert "WATCHDOG=1" in messages[1] or "STATUS=" in messages[1]
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                if sock.recv(4096) == b"WATCHDOG=1":
                    break
            assert proc.poll() is None, "the agent must survive SIGHUP"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            rest = []
            sock.settimeout(0.5)
            try:
                while True:
                    rest.append(sock.recv(4096))
            except socket.timeout:
                pass
            assert b"STOPPING=1" in rest
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr = proc.stderr.read()
        assert '"agent.reloaded"' in stderr and '"agent.stopped"' in stderr
