"""The drill's canary, a stand-in for a training step (also the auto-resume tests' trainer):
every task steps in lockstep (sleeping), rank 0 checkpoints every --every steps with
hpresilience.checkpoint, prints `step=N host=H attempt=A t=T` per step (what the drill reads
to time the resume and count the steps redone) and, at the end, writes what happened to
--result. Resumes from the newest checkpoint. Fast and deterministic, no GPU or framework:
examples/ddp_train.py is the real PyTorch one.

    srun --auto-resume=1 -N 2 python3 -m hpresilience.drill.canary --steps 40 --ckpt-dir D --result R"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from hpresilience.checkpoint import CheckpointDir, heartbeat


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--step-seconds", type=float, default=0.5)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--fail-at", type=int, default=0, help="exit 3 at this step: an application error")
    p.add_argument("--hang-at", type=int, default=0, help="attempt 1 hangs at this step (a collective that never "
                                                            "returns), on every rank")
    p.add_argument("--heartbeat", action="store_true", help="rank 0 calls hpresilience.checkpoint.heartbeat each step")
    p.add_argument("--lockstep", action="store_true",
                   help="every rank waits for all ranks after each step (a file barrier beside the checkpoints), "
                        "as a collective would: a dead node stops training instead of letting rank 0 run on")
    args = p.parse_args()
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    ckpt = CheckpointDir(args.ckpt_dir, keep=3)
    latest = ckpt.latest()
    start = latest.step if latest else 0
    host = socket.gethostname()
    print(f"rank {rank} on {host}: attempt {os.environ.get('HPR_ATTEMPT')} resumes at step {start} "
          f"nodes {os.environ.get('HPR_NODELIST')} master {os.environ.get('MASTER_ADDR')}", flush=True)
    first_step_at = None
    done = start
    barrier = Barrier.for_attempt(args.ckpt_dir, rank) if args.lockstep else None
    for step in range(start + 1, args.steps + 1):
        time.sleep(args.step_seconds)
        if barrier is not None:
            barrier.wait(step)
        if first_step_at is None:
            first_step_at = time.time()
        if args.hang_at and step == args.hang_at and os.environ.get("HPR_ATTEMPT") == "1":
            print(f"rank {rank}: hanging at step {step}", flush=True)
            time.sleep(3600)
        if args.fail_at and step == args.fail_at:
            print(f"rank {rank}: application error at step {step}", file=sys.stderr, flush=True)
            return 3
        if rank == 0 and step % args.every == 0:
            ckpt.save_file(step, "state.json", json.dumps({"step": step}).encode())
        if rank == 0 and args.heartbeat:
            heartbeat(step)
        if rank == 0:
            print(f"step={step} host={host} attempt={os.environ.get('HPR_ATTEMPT')} t={time.time():.3f}", flush=True)
        done = step   # the result says the last step run, not the one asked for (issue 13 review)
    if rank == 0:
        args.result.write_text(json.dumps({
            "final_step": done, "resumed_from": start, "attempt": int(os.environ.get("HPR_ATTEMPT", "0")),
            "nodelist": os.environ.get("HPR_NODELIST"), "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "first_step_at": first_step_at, "host": host, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    return 0


class Barrier:
    """All ranks of one attempt meet after each step: rank r writes `s<step>.r<r>` and waits for
    every rank's file of that step. Per attempt, so a dead attempt's files never let a new one pass.
    Files two steps old are removed by their writer (no rank still waits on them)."""

    def __init__(self, directory: Path, rank: int, ranks: int):
        self.directory, self.rank, self.ranks = directory, rank, ranks
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_attempt(cls, ckpt_dir: Path, rank: int) -> Barrier:
        env = os.environ
        attempt = f"{env.get('SLURM_JOB_ID', '0')}-{env.get('SLURM_RESTART_COUNT', '0')}-{env.get('HPR_ATTEMPT', '0')}"
        return cls(ckpt_dir.parent / f".lockstep-{ckpt_dir.name}" / attempt, rank, int(env.get("SLURM_NTASKS", "1")))

    def wait(self, step: int) -> None:
        (self.directory / f"s{step}.r{self.rank}").touch()
        (self.directory / f"s{step - 2}.r{self.rank}").unlink(missing_ok=True)
        while not all((self.directory / f"s{step}.r{r}").exists() for r in range(self.ranks)):
            time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
