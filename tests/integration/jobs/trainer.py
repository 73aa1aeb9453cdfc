"""A stand-in for a training step, for the auto-resume tests: every task steps in
lockstep (sleeping), rank 0 checkpoints every --every steps with hpresilience.checkpoint
and, at the end, writes what happened to --result. Resumes from the newest checkpoint.
Fast and deterministic; examples/ddp_train.py is the real PyTorch one."""
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
    args = p.parse_args()
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    ckpt = CheckpointDir(args.ckpt_dir, keep=3)
    latest = ckpt.latest()
    start = latest.step if latest else 0
    host = socket.gethostname()
    print(f"rank {rank} on {host}: attempt {os.environ.get('HPR_ATTEMPT')} resumes at step {start} "
          f"nodes {os.environ.get('HPR_NODELIST')} master {os.environ.get('MASTER_ADDR')}", flush=True)
    first_step_at = None
    for step in range(start + 1, args.steps + 1):
        time.sleep(args.step_seconds)
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
    if rank == 0:
        args.result.write_text(json.dumps({
            "final_step": args.steps, "resumed_from": start, "attempt": int(os.environ.get("HPR_ATTEMPT", "0")),
            "nodelist": os.environ.get("HPR_NODELIST"), "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "first_step_at": first_step_at, "host": host, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
