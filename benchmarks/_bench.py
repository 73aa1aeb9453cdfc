"""Shared helpers for the agent benchmarks: a private test cluster, the agent's
logs and metrics, and /proc accounting. Not a benchmark itself.

Every benchmark brings up its own cluster in its own directory on port base
37000 (tests and developers use 17000/27000/28000 on the same machine), so the
benchmarks must run one at a time.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

REPO = Path(__file__).resolve().parent.parent
TESTCLUSTER = REPO / "scripts" / "testcluster"
PORT_BASE = 37000
T = TypeVar("T")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The HyperPod workshop's seed line: XID 74 (NVLink) maps to Action: Replace.
XID74 = ("NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link "
         "6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)")


def syslog_line(node: str, text: str, when: Optional[float] = None) -> str:
    """The exact line `testcluster log` appends; built here so the injection is a
    single write() with a known timestamp, not a 100 ms Python process start."""
    now = time.localtime(when)
    stamp = time.strftime("%b ", now) + f"{now.tm_mday:>2}" + time.strftime(" %H:%M:%S", now)
    return f"{stamp} {node} kernel: {text}\n"


def install_sigterm_handler() -> None:
    # A benchmark killed with SIGTERM (timeout, CI) must still run its finally: and tear the cluster down.
    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


class AgentGone(RuntimeError):
    """An agent died under the benchmark: its figures would be meaningless."""


def run_on_cluster(name: str, nodes: int, measure: Callable[[BenchCluster], T], attempts: int = 3,
                   up_args: Sequence[str] = ("--agents",)) -> T:
    """Bring a cluster up, measure, ALWAYS tear it down; start over (up to `attempts`
    in all) when an agent died under the benchmark (the machine is shared: something
    outside the benchmark can kill it, as a testcluster bug once did)."""
    for attempt in range(1, attempts + 1):
        cluster = BenchCluster(name, nodes, up_args)
        try:
            cluster.up()
            return measure(cluster)
        except AgentGone as e:
            if attempt == attempts:
                raise
            print(f"attempt {attempt}: {e}; starting over", file=sys.stderr)
        finally:
            cluster.down()
    raise AssertionError("unreachable")


class BenchCluster:
    """A test cluster (by default with one agent per node) in a directory of its own."""

    def __init__(self, name: str, nodes: int, up_args: Sequence[str] = ("--agents",)) -> None:
        self.up_args = list(up_args)
        self.dir = Path(os.environ.get("HPR_BENCH_DIR", "/tmp")) / f"hpr-bench-{name}"
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "etc" / "slurm.conf"))

    def _testcluster(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(TESTCLUSTER), "--dir", str(self.dir), *args], capture_output=True,
                              text=True, timeout=timeout)

    def up(self) -> None:
        proc = self._testcluster("up", "--nodes", str(len(self.nodes)), "--port-base", str(PORT_BASE), *self.up_args,
                                 timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"testcluster up failed:\n{proc.stdout}{proc.stderr}")

    def down(self) -> None:
        proc = self._testcluster("down")
        if proc.returncode != 0:
            print(f"warning: testcluster down: {proc.stdout}{proc.stderr}", file=sys.stderr)

    def check_agents_alive(self) -> None:
        """Fail loudly when an agent vanished mid-run: its figures would be meaningless."""
        for node in self.nodes:
            pid = read_pid(self.node_dir(node) / "agent.pid")
            if pid is None or proc_comm(pid) != "hpresilience" or not alive(pid):
                raise AgentGone(f"the agent on {node} is gone (killed from outside the benchmark?); "
                                   f"see {self.agent_log(node)}")

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def kern_log(self, node: str) -> Path:
        return self.node_dir(node) / "kern.log"

    def agent_log(self, node: str) -> Path:
        return self.node_dir(node) / "agent.log"

    def agent_pid(self, node: str) -> int:
        return int((self.node_dir(node) / "agent.pid").read_text().strip())

    def metrics_port(self, node: str) -> int:
        return PORT_BASE + 100 + self.nodes.index(node) + 1

    def scontrol(self, *args: str, timeout: float = 10) -> str:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def node_line(self, node: str) -> str:
        return self.scontrol("-o", "show", "node", node)

    def wait_idle(self, node: str, timeout: float = 30) -> None:
        """Until the node is plain IDLE with no reason: ready for the next injection."""
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.node_line(node)
            if re.search(r"\bState=IDLE\s", line) and "Reason=" not in line:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{node} not idle after {timeout:.0f}s: {line.strip()}")


def is_replace_fail(line: str) -> bool:
    state = re.search(r"\bState=(\S+)", line)
    return bool(state and "FAIL" in state.group(1).split("+") and "Reason=Action: Replace" in line)


# ------------------------------------------------------------------ agent log
def iso_time(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class LogFollower:
    """Reads a structlog JSON log from a byte offset on; only complete lines."""

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0

    def events(self) -> Iterator[dict]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for raw in data[:end].splitlines():
            try:
                yield json.loads(raw)
            except ValueError:
                continue  # a stray non-JSON line (a traceback) is not an event

    def wait_for(self, predicate, timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if predicate(event):
                    return event
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)


# -------------------------------------------------------------------- metrics
def scrape(port: int, timeout: float = 2) -> Dict[str, float]:
    """Prometheus text → {'name{labels}': value} (no parsing of label values needed here)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: Dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def metric(samples: Dict[str, float], name: str) -> float:
    """Sum of every sample of `name` (all label sets)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


# ----------------------------------------------------------------------- /proc
def read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def proc_comm(pid: int) -> Optional[str]:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running, not a zombie: a dead agent reparented to a pid 1 that does not reap
    (as in this container) keeps its pid and name, but has no memory any more."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cpu_ticks(pid: int, tid: Optional[int] = None) -> int:
    """utime + stime of a process (or one of its threads), in clock ticks."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime field 14, stime field 15 (1-based).
    return int(fields[11]) + int(fields[12])


def thread_ticks(pid: int) -> Dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = cpu_ticks(pid, int(tid))
        except OSError:
            continue  # the thread ended between listdir and open
    return out


def status_fields(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def rss_mb(pid: int) -> float:
    fields = status_fields(pid)
    if "VmRSS" not in fields:  # a zombie: died between our liveness check and now
        raise AgentGone(f"process {pid} died")
    return int(fields["VmRSS"].split()[0]) / 1024


def threads(pid: int) -> int:
    return int(status_fields(pid)["Threads"])


# ---------------------------------------------------------------- statistics
def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: with 50-100 samples, p99 is the largest or second largest."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary(values: Sequence[float]) -> Dict[str, float]:
    return {"n": len(values), "min": min(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values), "mean": statistics.fmean(values)}


def fmt_ms(stats: Dict[str, float]) -> str:
    return "  ".join(f"{k}={v * 1000:.0f}ms" if k != "n" else f"n={v:.0f}" for k, v in stats.items())


def machine() -> Dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": os.uname().release,
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def print_header(title: str) -> None:
    m = machine()
    print(f"== {title} ({dt.datetime.now().isoformat(timespec='seconds')})")
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, kernel {m['kernel']}, load average {m['loadavg']}")


def timeline_value(points: List[Tuple[float, float]], t: float) -> float:
    """Step function: the last value recorded at or before t (0 before the first)."""
    value = 0.0
    for when, v in points:
        if when > t:
            break
        value = v
    return value
