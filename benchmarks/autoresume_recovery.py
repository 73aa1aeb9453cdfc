"""Auto-resume recovery: XID 74 written to a training step node's kern.log → the first
training step completed after the resume, and the work lost (steps redone).

`testcluster up --nodes 4 --agents --controller`, the srun shim first on PATH. Each run
submits tests/integration/jobs/train.sbatch (`srun --auto-resume=1 -N2` of a stand-in
trainer that steps every 0.25 s and checkpoints every 4 steps; every step line carries
its wall-clock time), waits until it has checkpointed, writes the XID 74 line (one
write(), like `testcluster log`) to a step node that is not the batch host, and reads
from the job's output: the last step completed before the fault, the step the next
attempt resumed from, and when that attempt completed its first step.

- in-allocation: a 3-node job, 2-node step (a spare node in the allocation);
- requeue: a 2-node job, 2-node step (no spare: the job is requeued, and the controller
  makes it eligible at once).
Between runs the controller repairs the node (XID 74 → Replace) before the next one.

    /work/main/.venv/bin/python benchmarks/autoresume_recovery.py [--runs 10]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from _bench import (
    REPO,
    XID74,
    BenchCluster,
    install_sigterm_handler,
    print_header,
    run_on_cluster,
    summary,
    syslog_line,
)

JOBS = REPO / "tests" / "integration" / "jobs"
STEP_RE = re.compile(r"^step=(\d+) host=\S+ attempt=(\d+) t=([\d.]+)$", re.MULTILINE)
RESUME_RE = re.compile(r"^rank 0 on \S+: attempt (\d+) resumes at step (\d+)", re.MULTILINE)
EVERY = 4


def job_state(cluster: BenchCluster, job: int) -> str:
    return re.search(r"JobState=(\S+)", cluster.scontrol("-o", "show", "job", str(job))).group(1)


def wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def steps_seen(out: Path) -> List[tuple]:
    text = out.read_text() if out.exists() else ""
    return [(int(s), int(a), float(t)) for s, a, t in STEP_RE.findall(text)]


def one_run(cluster: BenchCluster, env: Dict[str, str], path: str) -> Dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"hpr-ar-{path}-"))
    out = tmp / "out.txt"
    job_nodes = 3 if path == "in-allocation" else 2
    export = (f"ALL,STEP_NODES=2,STEPS=60,CKPT={tmp / 'ckpt'},RESULT={tmp / 'result.json'},"
              f"TRAINER={JOBS / 'trainer.py'},PYTHON={sys.executable},EXTRA=--every={EVERY},"
              f"STEP_SECONDS=0.25,HPR_STATE_DIR={tmp / 'state'}")
    sub = subprocess.run(["sbatch", "--parsable", "-N", str(job_nodes), "--exclusive", "--requeue",
                          "--open-mode=append", "-o", str(out), f"--export={export}",
                          str(JOBS / "train.sbatch")], capture_output=True, text=True, env=env, timeout=30)
    if sub.returncode != 0:
        raise RuntimeError(f"sbatch: {sub.stderr}")
    job = int(sub.stdout.strip().split(";")[0])
    try:
        wait(lambda: any(s >= EVERY + 2 for s, _, _ in steps_seen(out)), 60, "the first checkpoint")
    except RuntimeError:
        raise RuntimeError(f"job {job} made no progress: {cluster.scontrol('-o', 'show', 'job', str(job))}\n"
                           f"{out.read_text() if out.exists() else '(no output)'}") from None
    line = cluster.scontrol("-o", "show", "job", str(job))
    batch = re.search(r"BatchHost=(\S+)", line).group(1)
    nodes = re.search(r"\bNodeList=(n\S+)", line).group(1)
    from hpresilience.slurm.hostlist import expand
    victim = next(n for n in expand(nodes) if n != batch)
    fd = os.open(cluster.kern_log(victim), os.O_WRONLY | os.O_APPEND)
    try:
        fault = time.time()
        os.write(fd, syslog_line(victim, XID74).encode())
    finally:
        os.close(fd)
    first_after = wait(lambda: next(((s, t) for s, a, t in steps_seen(out) if a >= 2), None), 120,
                       "the first step after the resume")
    # Work lost: steps attempt 1 completed (some after the fault line, before the step was
    # stopped) that the next attempt had to do again.
    before = [s for s, a, t in steps_seen(out) if a == 1]
    resumed = [int(r) for a, r in RESUME_RE.findall(out.read_text()) if int(a) >= 2]
    wait(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), 180, "the job to end")
    state = job_state(cluster, job)
    result = json.loads((tmp / "result.json").read_text()) if (tmp / "result.json").exists() else {}
    if state != "COMPLETED" or result.get("final_step") != 60:
        raise RuntimeError(f"job {job} ended {state}: {result}\n{out.read_text()[-3000:]}")
    # Before the next run: the controller replaces the node the fault was written to.
    wait(lambda: "Reason=" not in cluster.node_line(victim) and re.search(r"State=IDLE\s", cluster.node_line(victim)),
         120, f"{victim} repaired by the controller", interval=0.5)
    return {"recovery": first_after[1] - fault, "last_step_before": max(before) if before else 0,
            "steps_after_fault": sum(1 for s, a, t in steps_seen(out) if a == 1 and t > fault),
            "resumed_from": resumed[0] if resumed else -1,
            "redone": (max(before) if before else 0) - (resumed[0] if resumed else 0),
            "restart_count": result.get("restart_count", 0)}


def measure(cluster: BenchCluster, runs: int) -> Dict[str, object]:
    env = dict(cluster.env, PATH=f"{REPO / 'scripts'}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    results: Dict[str, object] = {}
    for path in ("in-allocation", "requeue"):
        samples = []
        for i in range(runs):
            s = one_run(cluster, env, path)
            samples.append(s)
            print(f"{path:13} run {i + 1}: fault → first step after resume {s['recovery']:.2f}s; last step before "
                  f"{s['last_step_before']}, resumed from {s['resumed_from']}, redone {s['redone']} "
                  f"(restart count {s['restart_count']})", flush=True)
        rec = summary([s["recovery"] for s in samples])
        redone = [s["redone"] for s in samples]
        print(f"{path}: " + "  ".join(f"{k}={v:.2f}s" if k != "n" else f"n={v:.0f}" for k, v in rec.items())
              + f"; steps redone max {max(redone)} (checkpoint interval {EVERY})")
        results[path] = {"recovery_s": rec, "redone_max": max(redone), "redone": redone}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    install_sigterm_handler()
    print_header(f"auto-resume recovery, {args.runs} runs per path")
    results = run_on_cluster("autoresume", 4, lambda c: measure(c, args.runs), up_args=("--agents", "--controller"))
    print(json.dumps(results))
    goals = {"in-allocation max < 15 s": results["in-allocation"]["recovery_s"]["max"] < 15,
             "requeue max < 30 s": results["requeue"]["recovery_s"]["max"] < 30,
             f"steps redone never more than one checkpoint interval ({EVERY})":
                 max(results[p]["redone_max"] for p in results) <= EVERY}
    for goal, ok in goals.items():
        print(f"goal {goal}: {'MET' if ok else 'MISSED'}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
