"""scripts/testcluster itself: the ground every other integration test stands on."""
import datetime as dt
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .conftest import PORT_BASE, REPO, TESTCLUSTER, LiveCluster, own_processes, wait_until

DEEP_CHECKS = REPO / "tests" / "fixtures" / "deep-checks"
DCGMI_PASS = DEEP_CHECKS / "dcgmi-diag-r2-pass.json"
DCGMI_FAIL = DEEP_CHECKS / "dcgmi-diag-dcgm4-r1-fail-persistence.json"
# A fixed amount of CPU work that times itself, so srun's and Python's start-up are left out.
CPU_WORK = "import time; t = time.perf_counter(); sum(range(3 * 10**6)); print(time.perf_counter() - t)"


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


def cpu_work_seconds(cluster: LiveCluster, node: str, via: str) -> float:
    """Wall seconds of CPU_WORK on `node`, run by a job step (srun) or `testcluster exec`."""
    if via == "srun":
        out = cluster.slurm("srun", "-N1", "-w", node, "python3", "-c", CPU_WORK)
    else:
        out = cluster.tc("exec", node, "--", "python3", "-c", CPU_WORK).stdout
    return float(out.strip())


def node_status(cluster: LiveCluster, node: str) -> str:
    return next(line for line in cluster.tc("status", check=False).stdout.splitlines()
                if line.startswith(f"slurmd {node} "))


def test_degrade_caps_a_nodes_cpu(tc):
    """Issue 10: `degrade n3 --cpu 10` makes n3 slow for job steps and `exec` alike, n1 stays
    fast; `--cpu 100` gives n3 its speed back and removes the cgroup. Compared side by side as
    a ratio (10% of a CPU should make the work about 10x slower; 2x is the bar)."""
    try:
        out = tc.tc("degrade", "n3", "--cpu", "10").stdout
        assert "n3 capped at 10% of one CPU" in out
        cgroup = Path(json.loads((tc.dir / "nodes" / "n3" / "degrade.json").read_text())["cgroup"])
        assert cgroup.name.endswith("-n3") and "degraded: cpu 10%" in node_status(tc, "n3")
        fast = cpu_work_seconds(tc, "n1", "srun")
        slow = cpu_work_seconds(tc, "n3", "srun")
        slow_exec = cpu_work_seconds(tc, "n3", "exec")
        print(f"n1 {fast:.3f}s, n3 at 10%: srun {slow:.3f}s, exec {slow_exec:.3f}s")
        assert slow > 2 * fast and slow_exec > 2 * fast
        tc.tc("degrade", "n3", "--cpu", "100")
        restored = cpu_work_seconds(tc, "n3", "srun")
        print(f"n3 after --cpu 100: {restored:.3f}s")
        assert slow > 2 * restored
        assert not cgroup.exists() and "degraded" not in node_status(tc, "n3")
    finally:
        tc.tc("degrade", "n3", "--cpu", "100")


def test_degrade_rejects_a_bad_percent(cluster):
    proc = cluster.tc("degrade", "n3", "--cpu", "0", check=False)
    assert proc.returncode == 1 and "--cpu must be 1..100" in proc.stderr


def run_dcgmi(cluster: LiveCluster, node: str, *args: str, via: str = "srun") -> subprocess.CompletedProcess:
    """The node's `dcgmi` as a deep check finds it: first on PATH (`testcluster env`) for a job
    step, on the node's own PATH for `exec`."""
    if via == "srun":
        env = dict(os.environ, PATH=f"{cluster.dir / 'path'}:{os.environ['PATH']}")
        argv = ["srun", "-N1", "-w", node, "dcgmi", *args]
    else:
        env, argv = None, [str(TESTCLUSTER), "--dir", str(cluster.dir), "exec", node, "--", "dcgmi", *args]
    return subprocess.run(argv, env=env, capture_output=True, timeout=60)


def test_fake_dcgmi_replays_the_output_chosen_per_node(tc):
    """Issue 10: each node's dcgmi prints its chosen capture byte for byte and exits with its
    status (226 is what the GB10 captures exited with); the others keep the passing default."""
    try:
        tc.tc("dcgmi", "n2", "--replay", str(DCGMI_FAIL), "--exit", "226")
        failing = run_dcgmi(tc, "n2", "diag", "-r", "1", "-j")
        assert failing.stdout == DCGMI_FAIL.read_bytes() and failing.returncode == 226
        on_exec = run_dcgmi(tc, "n2", "diag", "-r", "1", "-j", "--fail-early", via="exec")
        assert on_exec.stdout == DCGMI_FAIL.read_bytes() and on_exec.returncode == 226
        passing = run_dcgmi(tc, "n1", "diag", "-r", "2", "-j")
        assert passing.stdout == DCGMI_PASS.read_bytes() and passing.returncode == 0
        tc.tc("dcgmi", "n2", "--reset")
        reset = run_dcgmi(tc, "n2", "diag", "-r", "2", "-j")
        assert reset.stdout == DCGMI_PASS.read_bytes() and reset.returncode == 0
    finally:
        tc.tc("dcgmi", "n2", "--reset")


def test_fake_dcgmi_refuses_what_it_cannot_replay(cluster):
    unknown = run_dcgmi(cluster, "n1", "stats", via="exec")
    assert unknown.returncode == 1 and unknown.stdout == b"" and b"unknown command 'stats'" in unknown.stderr
    no_json = run_dcgmi(cluster, "n1", "diag", "-r", "2", via="exec")
    assert no_json.returncode == 1 and b"(-j)" in no_json.stderr


def test_fake_dcgmi_hangs(tc):
    """`--hang`: the fake never prints (a hung tool, for deep-check timeouts). It execs its
    sleep, so the caller's own process is what hangs and what its timeout kills."""
    try:
        tc.tc("dcgmi", "n4", "--hang")
        argv = [str(TESTCLUSTER), "--dir", str(tc.dir), "exec", "n4", "--", "dcgmi", "diag", "-r", "2", "-j"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b"sleep\0infinity\0", 30,
                       "the fake dcgmi to reach its hang")
            assert proc.poll() is None
        finally:
            proc.kill()
        out, err = proc.communicate(timeout=30)
        assert out == b"" and err == b""
    finally:
        tc.tc("dcgmi", "n4", "--reset")
    assert run_dcgmi(tc, "n4", "diag", "-r", "2", "-j", via="exec").returncode == 0


def test_a_restart_keeps_a_nodes_faults_and_replace_clears_them(tc):
    """Issue 10: a slow CPU and a failing DCGM diagnostic belong to the node's hardware. Killed
    and started again (the emulated reboot starts slurmd the same way), the new slurmd is back
    in the node's cgroup and dcgmi still fails; `replace` (new, healthy hardware) clears both."""
    node_dir = tc.dir / "nodes" / "n2"
    try:
        tc.tc("degrade", "n2", "--cpu", "50")
        tc.tc("dcgmi", "n2", "--replay", str(DCGMI_FAIL), "--exit", "226")
        cgroup = Path(json.loads((node_dir / "degrade.json").read_text())["cgroup"])
        tc.tc("kill", "n2")
        tc.tc("start", "n2")
        slurmd = int((node_dir / "slurmd.pid").read_text())
        assert slurmd in {int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
        assert run_dcgmi(tc, "n2", "diag", "-r", "1", "-j", via="exec").returncode == 226
        tc.tc("replace", "n2")
        assert not cgroup.exists() and not (node_dir / "degrade.json").exists()
        assert "degraded" not in node_status(tc, "n2")
        after = run_dcgmi(tc, "n2", "diag", "-r", "2", "-j", via="exec")
        assert after.stdout == DCGMI_PASS.read_bytes() and after.returncode == 0
    finally:
        tc.tc("degrade", "n2", "--cpu", "100")
        tc.tc("dcgmi", "n2", "--reset")


def test_down_removes_the_cpu_caps(tmp_path):
    """Issue 10: `down` leaves no cgroup behind (one per degraded node, named after the cluster)."""
    cluster = LiveCluster(tmp_path / "degraded", ["n1"])
    try:
        cluster.tc("up", "--nodes", "1", "--port-base", str(PORT_BASE + 300))
        cluster.tc("degrade", "n1", "--cpu", "30")
        cgroup = Path(json.loads((cluster.dir / "nodes" / "n1" / "degrade.json").read_text())["cgroup"])
        assert int((cluster.dir / "nodes" / "n1" / "slurmd.pid").read_text()) in {
            int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()}
    finally:
        cluster.tc("down", check=False)
    assert not cgroup.exists() and not own_processes(cluster.dir)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def _stranger() -> subprocess.Popen:
    """A process in a UTS namespace of its own that is none of ours (another cluster's node,
    a container)."""
    proc = subprocess.Popen(["unshare", "--uts", "sleep", "300"])
    mine = os.readlink("/proc/self/ns/uts")
    wait_until(lambda: os.readlink(f"/proc/{proc.pid}/ns/uts") != mine, 5, "the stranger's own namespace")
    return proc


def test_kill_and_down_spare_a_process_in_a_reused_namespace(tmp_path):
    """Linux gives a new namespace the lowest free id, so a freed one's id comes back at once.
    A record of a daemon's namespace outlives the daemon when it dies on its own (slurmctld
    stopped or crashed, a slurmd killed), and a later kill or down signalled whoever holds that
    id by then: in CI, the other worker's cluster lost a node's slurmd ("Not responding") and
    every later test on that cluster failed. A recorded namespace is only ours if it says so."""
    cluster = LiveCluster(tmp_path / "reused", ["n1"])
    strangers = [_stranger(), _stranger()]
    try:
        cluster.tc("up", "--nodes", "1", "--port-base", str(PORT_BASE + 400))
        slurmd = int((cluster.dir / "nodes" / "n1" / "slurmd.pid").read_text())
        with open(cluster.dir / "nodes" / "n1" / "namespaces", "a") as f:   # as if n1 had used its id before
            f.write(os.readlink(f"/proc/{strangers[0].pid}/ns/uts") + "\n")
        with open(cluster.dir / "ctld" / "namespaces", "a") as f:
            f.write(os.readlink(f"/proc/{strangers[1].pid}/ns/uts") + "\n")
        # With stdin, stdout and stderr closed, as Slurm runs SuspendProgram (a power-off is such a kill):
        # the namespace's descriptor was then 1 or 2, replaced by the child's pipes.
        killed = subprocess.run(["sh", "-c", 'exec 0<&- 1>&- 2>&-; exec "$0" "$@"', str(TESTCLUSTER),
                                 "--dir", str(cluster.dir), "kill", "n1"], timeout=60)
        assert killed.returncode == 0
        wait_until(lambda: _gone(slurmd), 10, "n1's slurmd to die")
        assert strangers[0].poll() is None, "kill signalled a process that is not the node's"
        cluster.tc("start", "n1")
        with open(cluster.dir / "nodes" / "n1" / "namespaces", "a") as f:
            f.write(os.readlink(f"/proc/{strangers[0].pid}/ns/uts") + "\n")
    finally:
        cluster.tc("down", check=False)
        alive = [s.poll() is None for s in strangers]
        for s in strangers:
            s.kill()
            s.wait(timeout=10)
    assert not own_processes(cluster.dir)   # down did its work ...
    assert alive == [True, True], "down signalled processes that are not the cluster's"   # ... on its own only
