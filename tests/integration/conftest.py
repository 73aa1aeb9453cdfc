"""The real Slurm test cluster, started once per test session.

Tests here talk to a real slurmctld and real slurmd daemons started by
scripts/testcluster; nothing of Slurm or of hpresilience is mocked."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTCLUSTER = REPO / "scripts" / "testcluster"
# Apart from a dev cluster on 17000. Under pytest-xdist (./scripts/test runs two workers, whole modules
# each) every worker has its own session cluster: 500 ports apart (a cluster spans P..P+116).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
PORT_BASE = int(os.environ.get("HPR_TEST_PORT_BASE", "27000")) + 500 * _WORKER
NODES = 4


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class LiveCluster:
    dir: Path
    nodes: List[str]

    def tc(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(TESTCLUSTER), "--dir", str(self.dir), *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"testcluster {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def slurm(self, *argv: str, check: bool = True) -> str:
        """Run a Slurm user command (sbatch, scancel, ...) against this cluster."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str) -> int:
        return int(self.slurm("sbatch", "--parsable", *args).strip().split(";")[0])

    def reset(self) -> None:
        """Between tests: no jobs, every node back (started, resumed, idle)."""
        subprocess.run(["scancel", "--full", "--quiet", "--user=root"], timeout=30)
        for node in self.nodes:
            self.tc("start", node)
        out = self.slurm("scontrol", "-o", "show", "node")
        for line in out.splitlines():
            name = line.split()[0].split("=", 1)[1]
            if "State=IDLE " not in line:
                subprocess.run(["scontrol", "update", f"nodename={name}", "state=resume"], capture_output=True,
                               timeout=30)
        wait_until(lambda: self.slurm("scontrol", "-o", "show", "node").count("State=IDLE ") == len(self.nodes),
                   60, "all nodes idle again")


def own_processes(directory: Path) -> List[str]:
    """Daemons whose command line names the cluster directory (munged, slurmctld, slurmd)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@contextlib.contextmanager
def private_cluster(tmp_path_factory, name: str, nodes: int, port_base: int, *up_args: str,
                    env: Optional[Dict[str, str]] = None) -> Iterator[LiveCluster]:
    """A cluster in its own directory on its own ports, with SLURM_CONF and HPR_TESTCLUSTER_DIR
    (and `env`) pointing at it while it runs; `down` must leave no daemon behind."""
    directory = tmp_path_factory.mktemp(name)
    c = LiveCluster(directory, [f"n{i}" for i in range(1, nodes + 1)])
    started = time.monotonic()
    c.tc("up", "--nodes", str(nodes), "--port-base", str(port_base), *up_args, timeout=300)
    c.up_seconds = time.monotonic() - started
    wanted = {"SLURM_CONF": str(directory / "etc" / "slurm.conf"), "HPR_TESTCLUSTER_DIR": str(directory),
              **(env or {})}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield c
    finally:
        down = c.tc("down", check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = own_processes(directory)
        assert down.returncode == 0, down.stderr
        assert not left, f"testcluster down left processes behind: {left}"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[LiveCluster]:
    with private_cluster(tmp_path_factory, "cluster", NODES, PORT_BASE) as c:
        yield c


@pytest.fixture
def tc(cluster) -> LiveCluster:
    """The cluster, reset to all-idle after the test."""
    yield cluster
    cluster.reset()


@pytest.fixture
def gateway(cluster):
    from hpresilience.slurm import SlurmGateway
    return SlurmGateway()
