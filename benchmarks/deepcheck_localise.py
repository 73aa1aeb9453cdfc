"""Localisation time of the cluster all-reduce check (issue 10) against the number of nodes.

On a private 4-node test cluster: `hpresilience deepcheck --nodes n[1-N] --json` (real srun,
torch.distributed over gloo) for N = 2, 3, 4, with nothing degraded and, for N >= 3, with the
last node's CPU capped (`testcluster degrade nN --cpu 20`; with N = 2 there is no known-good
node to tell the two apart). Prints the wall time, rounds, runs and culprits of each, the mean
time of a round, and the model (hpresilience/deepcheck/localise.py `cost_model`) for 1,000 nodes
with that round time and with `--gpu-run-seconds` (an estimate for NCCL on GPU nodes).

    /work/main/.venv/bin/python benchmarks/deepcheck_localise.py [--gpu-run-seconds 30]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Dict, List

from _bench import REPO, BenchCluster, install_sigterm_handler, print_header, run_on_cluster

from hpresilience.deepcheck.localise import cost_model

HPRESILIENCE = REPO / ".venv" / "bin" / "hpresilience"
# As in tests/integration/test_deepcheck_cluster.py (sizes chosen there by measurement), with the group test on.
CONFIG = """\
[deepcheck.cluster]
sizes_bytes = [4194304]
iterations = 40
warmup = 3
timeout_seconds = 120
collective_timeout_seconds = 90
immediate_seconds = 15
env = { GLOO_SOCKET_IFNAME = "lo" }
"""


def run_check(cluster: BenchCluster, nodes: List[str]) -> Dict:
    config = cluster.dir / "deepcheck.toml"
    config.write_text(CONFIG)
    proc = subprocess.run([str(HPRESILIENCE), "deepcheck", "--config", str(config), "--nodes", ",".join(nodes),
                           "--json"], capture_output=True, text=True, env=cluster.env, timeout=600)
    report = json.loads(proc.stdout)
    evidence = report["checks"][0]["evidence"]
    rounds = evidence.get("rounds", [])
    count = len(rounds) + ("group" in evidence)
    return {"nodes": len(nodes), "status": report["status"], "culprits": report["culprits"],
            "seconds": report["duration_seconds"], "rounds": count,
            "runs": sum(len(r["tests"]) for r in rounds) + ("group" in evidence),
            "seconds_per_round": report["duration_seconds"] / max(count, 1)}


def measure(cluster: BenchCluster) -> List[Dict]:
    results = []
    for n in (2, 3, 4):
        nodes = cluster.nodes[:n]
        results.append({"degraded": None, **run_check(cluster, nodes)})
        if n < 3:
            continue
        victim = nodes[-1]
        cluster._testcluster("degrade", victim, "--cpu", "20")
        try:
            results.append({"degraded": victim, **run_check(cluster, nodes)})
        finally:
            cluster._testcluster("degrade", victim, "--cpu", "100")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-run-seconds", type=float, default=30.0,
                        help="assumed wall time of one NCCL run on GPU nodes (launch, import, init, timed part)")
    args = parser.parse_args()
    install_sigterm_handler()
    print_header("deepcheck --nodes: localisation time against the number of nodes")
    results = run_on_cluster("deepcheck", 4, measure, up_args=())
    print(f"{'nodes':>5} {'degraded':>8} {'status':>6} {'culprits':>8} {'rounds':>6} {'runs':>4} {'seconds':>7} "
          f"{'s/round':>7}")
    for r in results:
        print(f"{r['nodes']:>5} {r['degraded'] or '-':>8} {r['status']:>6} {','.join(r['culprits']) or '-':>8} "
              f"{r['rounds']:>6} {r['runs']:>4} {r['seconds']:>7.1f} {r['seconds_per_round']:>7.1f}")
    per_round = max(r["seconds_per_round"] for r in results if r["degraded"] is None)
    print("model for 1,000 nodes (group test, pairs, re-pairs; at most 64 runs at once):")
    for bad in (0, 1, 10):
        cost = cost_model(1000, bad, max_parallel=64)
        print(f"  {bad:>2} bad: {cost.rounds} rounds, {cost.runs} runs, {cost.waves} waves; "
              f"~{cost.waves * per_round:.0f} s at this machine's {per_round:.1f} s a wave, "
              f"~{cost.waves * args.gpu_run_seconds:.0f} s at {args.gpu_run_seconds:.0f} s a wave")
    print(json.dumps(results))
    named = all(r["culprits"] == [r["degraded"]] for r in results if r["degraded"])
    clean = all(r["culprits"] == [] and r["status"] == "pass" for r in results if not r["degraded"])
    ok = named and clean
    print(f"goal every degraded node named, and only it; no culprit without one: {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
