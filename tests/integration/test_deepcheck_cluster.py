"""`hpresilience deepcheck --nodes` on the real test cluster (issue 10, deliverable 2): real srun,
real torch.distributed with gloo across the nodes, n3 slowed by a real CPU cap (cgroups,
`testcluster degrade`). The check names n3 and only n3.

Sizes chosen by measurement on the project's 2-core machine (docs/performance.md): one 4 MiB
message, 40 timed all-reduces, so a run's timed part spans many CFS periods (100 ms) and a
capped node cannot hide inside one period's quota. At 20% of one CPU a pair with n3 measured
0.28-0.34 of the best pair, against the 0.5 threshold; a degraded run takes ~25 s (torch's import
on n3 alone takes several seconds at 20%), the passing one ~12 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from .conftest import LiveCluster, wait_until

# Alone: the all-reduce compares bandwidths between node pairs, and another worker's cluster on the
# same two cores made a healthy pair read slow (issue 13, when the suite went to two workers).
pytestmark = [pytest.mark.cluster, pytest.mark.alone]
# The container image leaves torch out (HPR_EXTRAS=test, issue 14): skipped there. Everywhere else
# ./scripts/test installs it (the `examples` extra), and a broken install fails here, not skips.
if "examples" not in os.environ.get("HPR_EXTRAS", "test,examples").split(","):
    pytest.skip("torch is left out of this environment (HPR_EXTRAS without examples)", allow_module_level=True)

HPRESILIENCE = Path(sys.executable).parent / "hpresilience"
CONFIG = """\
[deepcheck.cluster]
sizes_bytes = [4194304]
iterations = 40
warmup = 3
group_test = {group_test}
timeout_seconds = 90
collective_timeout_seconds = 60
immediate_seconds = 15
# the nodes' names do not resolve and every node is 127.0.0.1 here
env = {{ GLOO_SOCKET_IFNAME = "lo" }}
"""


def deepcheck(tmp_path: Path, group_test: bool) -> Tuple[int, Dict[str, Any]]:
    config = tmp_path / f"agent-{group_test}.toml"
    config.write_text(CONFIG.format(group_test=str(group_test).lower()))
    proc = subprocess.run([str(HPRESILIENCE), "deepcheck", "--config", str(config), "--nodes", "n[1-4]", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def pair_grades(report: Dict[str, Any]):
    rounds = report["checks"][0]["evidence"]["rounds"]
    return [[(t["nodes"], t["grade"]) for t in r["tests"]] for r in rounds]


def test_the_all_reduce_check_names_the_degraded_node_and_only_it(tc: LiveCluster, tmp_path):
    # Nothing degraded, the whole default flow (the group, then the pairs): everyone passes.
    rc, passing = deepcheck(tmp_path, group_test=True)
    check = passing["checks"][0]
    assert (rc, passing["status"], passing["culprits"]) == (0, "pass", []), check
    assert check["evidence"]["group"]["busbw_gbps"] > 0            # it really ran, across all four
    assert pair_grades(passing) == [[(["n1", "n2"], "good"), (["n3", "n4"], "good")]]

    # n3 slow; the group test is left out to keep the suite short (its path: the unit tests).
    tc.tc("degrade", "n3", "--cpu", "20")
    try:
        rc, degraded = deepcheck(tmp_path, group_test=False)
    finally:
        tc.tc("degrade", "n3", "--cpu", "100")
    check = degraded["checks"][0]
    assert (rc, degraded["status"], degraded["culprits"]) == (1, "fail", ["n3"]), check
    # pairs; re-pairs with known-good nodes; n3 confirmed slow with a second known-good partner
    assert pair_grades(degraded) == [[(["n1", "n2"], "good"), (["n3", "n4"], "bad")],
                                  [(["n3", "n1"], "bad"), (["n4", "n2"], "good")],
                                  [(["n3", "n2"], "bad")]]
    assert check["evidence"]["cleared"] == ["n1", "n2", "n4"] and check["summary"].startswith("culprit(s) n3: ")


def node_deepcheck(tc: LiveCluster, node: str) -> subprocess.CompletedProcess:
    """The quick disk check on `node`, run inside it as the controller's gate runs it."""
    return tc.tc("exec", node, "--", str(HPRESILIENCE), "deepcheck", "--only", "disk", "--level", "quick",
                 "--config", str(tc.dir / "nodes" / node / "agent.toml"), check=False)


def test_a_deep_check_never_runs_on_a_node_carrying_jobs(tc: LiveCluster):
    """Issue 10: a deep check never runs on a node carrying jobs (it would disturb them); Slurm
    says which jobs run there. The same command on an idle node runs (it is not simply broken)."""
    idle = node_deepcheck(tc, "n1")
    assert idle.returncode == 0 and "PASS  disk" in idle.stdout, idle.stdout + idle.stderr
    job = tc.sbatch("-w", "n2", "-N1", "--wrap", "sleep 300")
    try:
        wait_until(lambda: "RUNNING" in tc.slurm("squeue", "-h", "-j", str(job), "-o", "%T"), 30, "the job running")
        busy = node_deepcheck(tc, "n2")
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert f"n2 runs job(s) {job}" in busy.stderr and "disk" not in busy.stdout
    finally:
        tc.slurm("scancel", str(job))
