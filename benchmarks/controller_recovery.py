"""Recovery time through the controller: an admin's `Action: Reboot` / `Action: Replace`
on an idle node → the node back IDLE, reason cleared, out of its maintenance reservation.

`scripts/testcluster up --controller` (the controller as that command configures it:
a pass every 1 s, the command provider running `testcluster replace`, verification
by `hpresilience check` through srun). Per run, from just before the `scontrol update`
that sets the reason, until our own `scontrol -o show node` poll (every 50 ms) shows
the node plain IDLE with no reason and a new BootTime. The journal gives where the
time went: pick-up, the side effect, the new boot seen, the check, the release.

    /work/main/.venv/bin/python benchmarks/controller_recovery.py [--runs 10]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import sys
import time
from typing import Dict, List

from _bench import BenchCluster, install_sigterm_handler, print_header, run_on_cluster, summary

from hpresilience.controller.journal import Journal

POLL_SECONDS = 0.05
TIMEOUT_SECONDS = 120.0


def boot_time(line: str) -> str:
    found = re.search(r"\bBootTime=(\S+)", line)
    return found.group(1) if found else ""


def in_service(line: str) -> bool:
    return bool(re.search(r"\bState=IDLE\s", line)) and "Reason=" not in line


def one_run(cluster: BenchCluster, node: str, action: str) -> Dict[str, float]:
    cluster.wait_idle(node, timeout=60)
    before = boot_time(cluster.node_line(node))
    start = time.time()
    cluster.scontrol("update", f"nodename={node}", "state=fail", f"reason=Action: {action}")
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while True:
        line = cluster.node_line(node)
        if in_service(line) and boot_time(line) not in ("", before):
            end = time.time()
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node} not back after {TIMEOUT_SECONDS:.0f}s: {line.strip()}")
        time.sleep(POLL_SECONDS)
    journal = Journal(cluster.dir / "controller" / "journal.sqlite")
    try:
        # The reservation is dropped just before the journal records `done`: we may look in between.
        while (wf := journal.history(node=node)[-1]).status == "active" and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        steps = {e.detail["to"]: e.at for e in journal.events(workflow_id=wf.id) if e.kind == "step"}
    finally:
        journal.close()
    if wf.status != "done":
        raise RuntimeError(f"workflow {wf.id} on {node} ended {wf.status}: {wf.data.get('outcome')}")
    first = "reboot" if action == "Reboot" else "replace"
    waited = "await_boot" if action == "Reboot" else "await_node"
    checked = steps.get("deepcheck", steps["release"])   # the deep-check gate (issue 10), when on
    return {"total": end - start, "pickup": wf.created_at - start, "effect": steps[waited] - wf.created_at,
            "boot_seen": steps["verify"] - steps[waited], "verify": checked - steps["verify"],
            "deepcheck": steps["release"] - checked,
            "release": steps["done"] - steps["release"], "observed_after_done": end - steps["done"],
            "first_step": steps[first] - wf.created_at}


def fmt_s(stats: Dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.2f}s" if k != "n" else f"n={v:.0f}" for k, v in stats.items())


def no_refault_escalation(cluster: BenchCluster) -> None:
    """Runs repeat on the same nodes within minutes: as configured by testcluster, the
    controller would (rightly) turn a second `Action: Reboot` within refault_window_seconds
    into a replacement. Measure plain reboots: window 0, applied by SIGHUP (a reload)."""
    reconfigure(cluster, "[workflow]\n", "[workflow]\nrefault_window_seconds = 0\n")


def reconfigure(cluster: BenchCluster, old: str, new: str) -> None:
    """Edit the controller's configuration (the first `old` becomes `new`) and reload it by SIGHUP."""
    config = cluster.dir / "controller.toml"
    text = config.read_text()
    config.write_text(text.replace(old, new, 1))
    log = cluster.dir / "controller.log"
    seen = log.read_text().count('"controller.reloaded"')
    os.kill(int((cluster.dir / "controller.pid").read_text()), signal.SIGHUP)
    deadline = time.monotonic() + 10
    while log.read_text().count('"controller.reloaded"') == seen:
        if time.monotonic() > deadline:
            raise RuntimeError("the controller did not reload its configuration")
        time.sleep(0.1)


def measure(cluster: BenchCluster, runs: int) -> Dict[str, object]:
    no_refault_escalation(cluster)
    results: Dict[str, object] = {}
    for action in ("Reboot", "Replace"):
        samples: List[Dict[str, float]] = []
        for i in range(runs):
            node = cluster.nodes[i % len(cluster.nodes)]
            sample = one_run(cluster, node, action)
            samples.append(sample)
            print(f"{action:7} {node}: total {sample['total']:.2f}s  (pickup {sample['pickup']:.2f}, "
                  f"{'reboot' if action == 'Reboot' else 'replace'}→new boot seen "
                  f"{sample['effect'] + sample['boot_seen']:.2f}, verify {sample['verify']:.2f}, "
                  f"deepcheck {sample['deepcheck']:.2f}, release {sample['release']:.2f})", flush=True)
        totals = summary([s["total"] for s in samples])
        parts = {k: round(sum(s[k] for s in samples) / len(samples), 3) for k in samples[0]}
        print(f"{action}: {fmt_s(totals)}", flush=True)
        print(f"{action}: mean breakdown {json.dumps(parts)}")
        results[action] = {"total": totals, "mean_breakdown": parts}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per action (rotating over the nodes)")
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    install_sigterm_handler()
    print_header(f"controller recovery, {args.runs} runs per action, {dt.date.today()}")
    results = run_on_cluster("recovery", args.nodes, lambda c: measure(c, args.runs), up_args=("--controller",))
    print(json.dumps(results))
    met = True
    for action, goal in (("Reboot", 20.0), ("Replace", 30.0)):
        ok = results[action]["total"]["max"] < goal
        met = met and ok
        print(f"goal {action} max < {goal:.0f} s: {'MET' if ok else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
