"""Auto-resume recovery: XID 74 written to a training step node's kern.log → the next
attempt launched, and → its first training step; the seconds split into hpresilience's
share and the training framework's, for the stand-in trainer and the real PyTorch example.

`testcluster up --nodes 4 --agents --controller`, the srun shim first on PATH. Each run
submits a batch script with one `srun --auto-resume=1 -N2` step, waits until it has
checkpointed, writes the XID 74 line (one write(), like `testcluster log`) to a step
node that is not the batch host, and reads the runner's event file (a wall-clock time
per decision) and the job's output (a wall-clock time per training step):

    fault ─detect→ step_stopping ─stop→ srun ended ─relaunch→ attempt_started ─framework→ first step
          (agent + runner poll)  (program's SIGTERM   (release or requeue,    (interpreter, imports,
                                  handling, torchrun,  controller expedite,    rendezvous, checkpoint
                                  srun teardown)       next srun)              load, one step)

hpresilience's share is detect + relaunch; stop is the program's own shutdown after
SIGTERM (its chance to save), framework is what any restart of the program costs.

- trainers: stand-in (tests/integration/jobs/trainer.py: exits at SIGTERM, no imports)
  and pytorch (examples/: torchrun + DDP/gloo on CPU);
- paths: in-allocation (3-node job, 2-node step: a spare node in the allocation) and
  requeue (2-node job, 2-node step: the job is requeued, the controller makes it
  eligible at once).
Between runs the controller repairs the node (XID 74 → Replace) before the next one.

    /work/main/.venv/bin/python benchmarks/autoresume_recovery.py [--runs 10] [--trainers stand-in,pytorch]
        [--paths in-allocation,requeue]
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
from typing import Dict, List, Tuple

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

from hpresilience.slurm.hostlist import expand

JOBS = REPO / "tests" / "integration" / "jobs"
EXAMPLES = REPO / "examples"
# Both trainers print one line per completed step with its attempt and wall-clock time.
STEP_RE = re.compile(r"^step=(\d+) .*?attempt=(\d+) .*?t=([\d.]+)$", re.MULTILINE)
EVERY = 4
PATHS = ("in-allocation", "requeue")
SEGMENTS = ("launch", "detect", "stop", "relaunch", "framework", "first_step")


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


def steps_seen(out: Path) -> List[Tuple[int, int, float]]:
    text = out.read_text(errors="replace") if out.exists() else ""
    return [(int(s), int(a), float(t)) for s, a, t in STEP_RE.findall(text)]


def events(state: Path) -> List[dict]:
    return [json.loads(line) for f in sorted(state.glob("*.events.jsonl")) for line in f.read_text().splitlines()]


def submit(env: Dict[str, str], tmp: Path, trainer: str, path: str) -> int:
    out = tmp / "out.txt"
    job_nodes = 3 if path == "in-allocation" else 2
    common = f"HPR_STATE_DIR={tmp / 'state'},PYTHON={sys.executable}"
    if trainer == "stand-in":
        export = (f"ALL,{common},STEP_NODES=2,STEPS=40,CKPT={tmp / 'ckpt'},RESULT={tmp / 'result.json'},"
                  f"TRAINER={JOBS / 'trainer.py'},EXTRA=--every={EVERY},STEP_SECONDS=0.25")
        script = JOBS / "train.sbatch"
    else:
        export = (f"ALL,{common},TRAIN_NODES=2,TRAIN_STEPS=30,TRAIN_CKPT_EVERY={EVERY},TRAIN_STEP_SECONDS=0.25,"
                  f"TRAIN_PYTHON={sys.executable},TRAIN_EXAMPLES_DIR={EXAMPLES},TRAIN_CKPT_DIR={tmp / 'ckpt'},"
                  f"TRAIN_RESULT={tmp / 'result.json'},GLOO_SOCKET_IFNAME=lo")
        script = EXAMPLES / "train.sbatch"
    sub = subprocess.run(["sbatch", "--parsable", "-N", str(job_nodes), "--exclusive", "--requeue",
                          "--open-mode=append", "-o", str(out), f"--export={export}", str(script)],
                         capture_output=True, text=True, env=env, timeout=30)
    if sub.returncode != 0:
        raise RuntimeError(f"sbatch: {sub.stderr}")
    return int(sub.stdout.strip().split(";")[0])


def one_run(cluster: BenchCluster, env: Dict[str, str], trainer: str, path: str) -> Dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"hpr-ar-{trainer}-{path}-"))
    out = tmp / "out.txt"
    job = submit(env, tmp, trainer, path)
    try:
        wait(lambda: any(s >= EVERY + 2 for s, _, _ in steps_seen(out)), 90, "the first checkpoint")
    except RuntimeError:
        raise RuntimeError(f"job {job} made no progress: {cluster.scontrol('-o', 'show', 'job', str(job))}\n"
                           f"{out.read_text() if out.exists() else '(no output)'}") from None
    line = cluster.scontrol("-o", "show", "job", str(job))
    batch = re.search(r"BatchHost=(\S+)", line).group(1)
    nodes = re.search(r"\bNodeList=(n\S+)", line).group(1)
    victim = next(n for n in expand(nodes) if n != batch)
    fd = os.open(cluster.kern_log(victim), os.O_WRONLY | os.O_APPEND)
    try:
        fault = time.time()
        os.write(fd, syslog_line(victim, XID74).encode())
    finally:
        os.close(fd)
    first_after = wait(lambda: next((t for s, a, t in steps_seen(out) if a >= 2), None), 180,
                       "the first step after the resume")
    wait(lambda: job_state(cluster, job) in ("COMPLETED", "FAILED", "CANCELLED"), 180, "the job to end")
    state = job_state(cluster, job)
    result = json.loads((tmp / "result.json").read_text()) if (tmp / "result.json").exists() else {}
    if state != "COMPLETED" or result.get("final_step") not in (30, 40):
        raise RuntimeError(f"job {job} ended {state}: {result}\n{out.read_text()[-3000:]}")
    seen = events(tmp / "state")

    def at(kind: str, after: float = 0.0) -> float:
        return next(e["at"] for e in seen if e["event"] == kind and e["at"] >= after)

    stopping = at("step_stopping", fault)
    ended = at("node_failure", fault)            # srun ended, the runner attributed it to the node
    started = at("attempt_started", ended)
    # Work lost: the last step attempt 1 completed − the step the next attempt resumed from.
    before = max((s for s, a, _ in steps_seen(out) if a == 1), default=0)
    resumed = min(s for s, a, _ in steps_seen(out) if a >= 2) - 1
    # Before the next run: the controller replaces the node the fault was written to.
    wait(lambda: "Reason=" not in cluster.node_line(victim) and re.search(r"State=IDLE\s", cluster.node_line(victim)),
         120, f"{victim} repaired by the controller", interval=0.5)
    return {"launch": started - fault, "detect": stopping - fault, "stop": ended - stopping,
            "relaunch": started - ended, "framework": first_after - started, "first_step": first_after - fault,
            "redone": before - resumed, "restart_count": result.get("restart_count", 0)}


def measure(cluster: BenchCluster, runs: int, trainers: List[str], paths: List[str]) -> Dict[str, object]:
    env = dict(cluster.env, PATH=f"{REPO / 'scripts'}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    results: Dict[str, object] = {}
    for trainer in trainers:
        for path in paths:
            samples = []
            for i in range(runs):
                s = one_run(cluster, env, trainer, path)
                samples.append(s)
                print(f"{trainer:8} {path:13} run {i + 1:2}: " + " ".join(f"{k}={s[k]:.2f}s" for k in SEGMENTS)
                      + f" redone={s['redone']} restarts={s['restart_count']}", flush=True)
            stats = {k: summary([s[k] for s in samples]) for k in SEGMENTS}
            key = f"{trainer}/{path}"
            print(f"{key}: " + "; ".join(f"{k} p50={stats[k]['p50']:.2f}s max={stats[k]['max']:.2f}s"
                                         for k in SEGMENTS), flush=True)
            results[key] = {**stats, "redone_max": max(s["redone"] for s in samples)}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--trainers", default="stand-in,pytorch")
    parser.add_argument("--paths", default=",".join(PATHS))
    args = parser.parse_args()
    trainers = [t for t in args.trainers.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    if not set(trainers) <= {"stand-in", "pytorch"} or not set(paths) <= set(PATHS):
        parser.error(f"--trainers: stand-in and/or pytorch; --paths: {' and/or '.join(PATHS)}")
    install_sigterm_handler()
    print_header(f"auto-resume recovery, {args.runs} runs per trainer and path")
    results = run_on_cluster("autoresume", 4, lambda c: measure(c, args.runs, trainers, paths),
                             up_args=("--agents", "--controller"))
    print(json.dumps(results))
    goals: Dict[str, bool] = {}
    for key, r in results.items():
        goals[f"{key}: fault → next attempt launched p50 < 2 s"] = r["launch"]["p50"] < 2
        goals[f"{key}: steps redone never more than one checkpoint interval ({EVERY})"] = r["redone_max"] <= EVERY
    for goal, ok in goals.items():
        print(f"goal {goal}: {'MET' if ok else 'MISSED'}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
