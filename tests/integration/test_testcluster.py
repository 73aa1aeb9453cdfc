"""scripts/testcluster itself: the ground every other integration test stands on."""
import datetime as dt
import os
import re
import signal
import subprocess
import time

from .conftest import PORT_BASE, REPO, TESTCLUSTER, own_processes, wait_until


def test_up_gives_idle_nodes_fast(cluster, gateway):
    assert cluster.up_seconds < 60
    nodes = gateway.nodes()
    assert [n.name for n in nodes] == cluster.nodes
    assert all(n.state == "IDLE" and not n.flags for n in nodes)
    assert len({n.port for n in nodes}) == len(nodes)


def test_up_is_idempotent(cluster):
    out = cluster.tc("up", "--nodes", str(len(cluster.nodes)), "--port-base", str(PORT_BASE)).stdout
    assert "already up" in out


def test_env_exports(cluster):
    out = cluster.tc("env").stdout
    assert f"export SLURM_CONF={cluster.dir}/etc/slurm.conf" in out
    assert f"export HPR_TESTCLUSTER_DIR={cluster.dir}" in out


def test_env_puts_the_srun_shim_first_on_path(cluster):
    """PATH: DIR/path (srun = the shim, hpresilience) first, the venv's bin last; eval'd twice,
    PATH stays the same. (That batch jobs then run the shim: test_job_submit.py.)"""
    shell = (f'eval "$({TESTCLUSTER} env --dir {cluster.dir})"; first=$PATH; '
             f'eval "$({TESTCLUSTER} env --dir {cluster.dir})"; [ "$first" = "$PATH" ] || echo GREW; '
             'echo "$PATH"; command -v srun; command -v hpresilience; sed -n 2p "$(command -v srun)"')
    out = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True, timeout=30).stdout
    assert "GREW" not in out
    path, srun, hpresilience, marker = out.splitlines()
    dirs = path.split(":")
    assert dirs[0] == str(cluster.dir / "path") and dirs.count(dirs[0]) == 1
    assert srun == str(cluster.dir / "path" / "srun") and "hpresilience-srun-shim" in marker
    assert hpresilience == str(cluster.dir / "path" / "hpresilience")
    assert str(REPO / "scripts") not in dirs  # scripts/ also holds `test` and `demo`
    venv_bin = REPO / ".venv" / "bin"
    if venv_bin.is_dir():
        assert dirs[-1] == str(venv_bin)


def test_up_configures_the_job_submit_plugin(cluster):
    conf = (cluster.dir / "etc" / "slurm.conf").read_text()
    assert "\nJobSubmitPlugins=lua\n" in conf
    assert (cluster.dir / "etc" / "job_submit.lua").resolve() == REPO / "slurm_plugins" / "job_submit.lua"


def test_exec_runs_inside_the_node(cluster):
    out = cluster.tc("exec", "n2", "--", "sh", "-c", 'hostname; echo "$HPR_NODE"; cut -d" " -f1 /proc/uptime')
    hostname, env_node, uptime = out.stdout.split()
    assert hostname == "n2" and env_node == "n2"
    # Own time namespace: the node's uptime counts from its own (emulated) boot.
    host_uptime = float(open("/proc/uptime").read().split()[0])
    assert float(uptime) < host_uptime


def test_log_appends_syslog_line(cluster):
    cluster.tc("log", "n3", "NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal")
    last = (cluster.dir / "nodes" / "n3" / "kern.log").read_text().splitlines()[-1]
    assert re.fullmatch(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d n3 kernel: NVRM: Xid \(PCI:0000:b9:00\): 74, .*", last)


def test_status(cluster):
    out = cluster.tc("status").stdout
    assert "slurmctld" in out and out.count("slurm: IDLE") == len(cluster.nodes)


def test_unknown_node_is_a_clear_error(cluster):
    proc = cluster.tc("log", "n99", "x", check=False)
    assert proc.returncode == 1 and "unknown node 'n99'" in proc.stderr


def test_kill_and_start(tc, gateway):
    job = tc.sbatch("-N1", "-w", "n4", "--wrap", "sleep 300")
    wait_until(lambda: gateway.job(job).is_running, 30, "job running on n4")
    killed_at = time.monotonic()
    tc.tc("kill", "n4")
    # Job steps died with the node: no process is left in the node's namespaces.
    assert tc.tc("exec", "n4", "--", "true", check=False).returncode != 0
    down = wait_until(lambda: (n := gateway.node("n4")).is_down and n, 60, "Slurm to mark n4 DOWN")
    print(f"n4 seen DOWN {time.monotonic() - killed_at:.1f}s after kill: {down.state_text} ({down.reason})")
    assert not down.is_responding
    old_boot = down.boot_time
    tc.tc("start", "n4")
    back = wait_until(lambda: (n := gateway.node("n4")).is_responding and n, 30, "n4 responding")
    # A power-cycled node registers with a new boot time; Slurm (ReturnToService=1) keeps it DOWN as
    # "unexpectedly rebooted" until someone returns it, which is what a real cluster does.
    assert back.boot_time > old_boot


def test_up_recovers_from_a_crashed_run(cluster, gateway):
    """A cluster whose slurmctld died (crash, OOM kill) is cleaned up and restarted by `up`."""
    pid = int((cluster.dir / "ctld" / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    out = cluster.tc("up", "--nodes", str(len(cluster.nodes)), "--port-base", str(PORT_BASE))
    assert "cleaning up a previous cluster" in out.stderr and "nodes idle" in out.stdout
    assert int((cluster.dir / "ctld" / "slurmctld.pid").read_text()) != pid
    assert all(n.state == "IDLE" and not n.flags for n in gateway.nodes())


def test_replace_gives_fresh_hardware(tc, gateway):
    node_dir = tc.dir / "nodes" / "n3"
    tc.tc("log", "n3", "NVRM: Xid (PCI:0000:b9:00): 79, pid=<unknown>, name=<unknown>, GPU has fallen off the bus.")
    (node_dir / "gpus.state").write_text("gpus=7\n")
    replacements = node_dir / "replacements.log"
    before = len(replacements.read_text().splitlines()) if replacements.exists() else 0
    old_boot = gateway.node("n3").boot_time
    started = time.time()
    out = tc.tc("replace", "n3").stdout
    assert out.count("\n") == 1 and "n3 replaced" in out
    # Back: registered with a new BootTime, no earlier than the call (Slurm then calls it
    # "unexpectedly rebooted", as it would a real replacement).
    node = gateway.node("n3")
    assert node.is_responding and node.boot_time > old_boot
    assert node.boot_time.timestamp() >= int(started)
    assert (node_dir / "kern.log").read_text() == ""
    assert (node_dir / "gpus.state").read_text() == "gpus=8\n"
    lines = replacements.read_text().splitlines()
    assert len(lines) == before + 1 and dt.datetime.fromisoformat(lines[-1])
    assert tc.tc("exec", "n3", "--", "hostname").stdout.strip() == "n3"


def test_replace_unknown_node_is_a_clear_error(cluster):
    proc = cluster.tc("replace", "n99", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "unknown node 'n99'" in proc.stderr


def test_extra_nodes_are_configured_but_never_register(tmp_path):
    """`up --extra-nodes N` (scale tests): N more nodes in slurm.conf, powered-down CLOUD
    nodes so slurmctld never pings them; `up` waits for the real nodes only."""
    directory = tmp_path / "extra"

    def tc(*args: str) -> str:
        return subprocess.run([str(TESTCLUSTER), "--dir", str(directory), *args], capture_output=True,
                              text=True, timeout=120, check=True).stdout

    try:
        out = tc("up", "--nodes", "2", "--extra-nodes", "50", "--port-base", str(PORT_BASE + 200))
        assert "2 nodes idle (+50 configured only)" in out
        env = dict(os.environ, SLURM_CONF=str(directory / "etc" / "slurm.conf"))
        lines = subprocess.run(["scontrol", "-o", "show", "node"], env=env, capture_output=True, text=True,
                               timeout=30, check=True).stdout.splitlines()
        states = {re.search(r"NodeName=(\S+)", line).group(1): re.search(r" State=(\S+)", line).group(1)
                  for line in lines}
        assert len(states) == 52 and states["n1"] == states["n2"] == "IDLE"
        assert {states[f"e{i}"] for i in range(1, 51)} == {"IDLE+CLOUD+POWERED_DOWN"}
        assert all("Partitions=train" in line for line in lines)
        assert "e[1-50]" in tc("status")
    finally:
        subprocess.run([str(TESTCLUSTER), "--dir", str(directory), "down"], capture_output=True, timeout=120)
    assert not own_processes(directory)
