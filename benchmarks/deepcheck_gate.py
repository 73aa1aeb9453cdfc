"""Deep checks on the test cluster (issue 10): how long each level takes on a node, and what
the controller's gate adds to a node's time to service.

1. Levels: `hpresilience deepcheck --level L --json` on a node through `testcluster exec`, as
   the controller's gate runs it, `--runs` times per level; per check durations from the report.
2. Gate on/off: an admin's `Action: Reboot` on an idle node → back in service (the controller
   as `testcluster up --controller` configures it), alternating runs with the gate on (quick
   after a reboot) and off (`after_reboot = "none"`, by SIGHUP), so both see the same machine
   load; the ratio of medians is the figure to read.

    /work/main/.venv/bin/python benchmarks/deepcheck_gate.py [--runs 5]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from _bench import REPO, TESTCLUSTER, BenchCluster, install_sigterm_handler, print_header, run_on_cluster, summary
from controller_recovery import fmt_s, no_refault_escalation, one_run, reconfigure

HPRESILIENCE = REPO / ".venv" / "bin" / "hpresilience"


def level_run(cluster: BenchCluster, node: str, level: str) -> Dict[str, object]:
    argv = [str(TESTCLUSTER), "--dir", str(cluster.dir), "exec", node, "--", str(HPRESILIENCE), "deepcheck",
            "--json", "--level", level, "--config", str(cluster.node_dir(node) / "agent.toml")]
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - began
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"seconds": report["duration_seconds"], "wall": wall, "status": report["status"],
            "checks": {c["name"]: (c["status"], c["duration_seconds"]) for c in report["checks"]}}


def measure(cluster: BenchCluster, runs: int) -> Dict[str, object]:
    results: Dict[str, object] = {"levels": {}}
    for level in ("quick", "standard", "full"):
        samples = [level_run(cluster, cluster.nodes[i % len(cluster.nodes)], level) for i in range(runs)]
        per_check = {name: round(statistics.median(s["checks"][name][1] for s in samples), 2)
                     for name in samples[0]["checks"]}
        statuses = {name: status for name, (status, _) in samples[0]["checks"].items()}
        totals = summary([float(s["seconds"]) for s in samples])
        wall = summary([float(s["wall"]) for s in samples])
        print(f"level {level}: checks {fmt_s(totals)}; wall with start-up {fmt_s(wall)}; median per check "
              f"{per_check}; statuses {statuses}", flush=True)
        results["levels"][level] = {"total": totals, "wall": wall, "median_per_check": per_check,
                                    "statuses": statuses}
    no_refault_escalation(cluster)
    on: List[float] = []
    off: List[float] = []
    gate_off = 'after_reboot = "none"\n'
    for i in range(runs):
        for gate in ("on", "off"):
            if gate == "off":
                reconfigure(cluster, "[deepcheck]\n", "[deepcheck]\n" + gate_off)
            node = cluster.nodes[(2 * i + (gate == "off")) % len(cluster.nodes)]
            sample = one_run(cluster, node, "Reboot")
            (on if gate == "on" else off).append(sample["total"])
            print(f"reboot with gate {gate:3} {node}: total {sample['total']:.2f}s (deepcheck "
                  f"{sample['deepcheck']:.2f}s)", flush=True)
            if gate == "off":
                reconfigure(cluster, "[deepcheck]\n" + gate_off, "[deepcheck]\n")
    results["gate"] = {"on": summary(on), "off": summary(off),
                       "ratio_of_medians": statistics.median(on) / statistics.median(off)}
    print(f"reboot to service, gate on: {fmt_s(summary(on))}")
    print(f"reboot to service, gate off: {fmt_s(summary(off))}")
    print(f"gate on / off (medians): {results['gate']['ratio_of_medians']:.2f}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    install_sigterm_handler()
    print_header(f"deep checks, {args.runs} runs per level and per gate setting, {dt.date.today()}")
    results = run_on_cluster("deepcheck", 4, lambda c: measure(c, args.runs), up_args=("--agents", "--controller"))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
