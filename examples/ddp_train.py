#!/usr/bin/env python3
"""A real PyTorch DistributedDataParallel training script that survives node failures.

Launched by torchrun (one torchrun per node, e.g. from examples/launch.sh under
`srun --auto-resume=1`), CPU and the gloo backend, so it runs anywhere. It trains a
tiny MLP to imitate a fixed random "teacher" network on synthetic data and:

- checkpoints every --ckpt-every steps (and at the last step) from rank 0 only, with
  hpresilience.checkpoint: a checkpoint is fully there or not there at all;
- on start, resumes from the newest complete checkpoint (rank 0 picks it and broadcasts
  it, so every rank loads the same one);
- adapts to the world size of each attempt: the global batch of step s is a function of
  (seed, s) only and every rank trains on its slice of it, so a run resumed on fewer
  nodes computes the same updates (DDP averages the gradients; only the floating-point
  summation order differs);
- logs one line per step on stdout (rank 0):
      step=12 loss=0.183 attempt=2 nodes=n[1,3] world=2 t=1.234
- writes --result FILE (rank 0, atomically) at the end: the final step, the steps run in
  this attempt, the step it resumed from, the attempt, the world size, the final loss and
  a checksum of the parameters;
- on SIGTERM (srun stopping the step, torchrun stopping its workers) stops at once with
  exit status 143; a checkpoint being written is discarded by the helper, never left half
  written. It then leaves with os._exit: Python's own teardown with torch and gloo loaded took
  ~0.9 s of the 1.35 s from SIGTERM to torchrun's exit on the test machine, time every resume
  waits for (issue 11, deliverable 3); nothing is left to tear down that matters (a checkpoint
  is complete or discarded, the output is flushed). Any other error: a traceback and exit status 1.

Run alone (one process, no torchrun):   python examples/ddp_train.py --steps 20 --ckpt-dir /tmp/ck
Several processes on one machine:       torchrun --nproc-per-node=2 examples/ddp_train.py ...
On a Slurm cluster with auto-resume:    sbatch examples/train.sbatch   (see docs/auto-resume-example.md)
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # the CPU wheel without numpy

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from hpresilience.checkpoint import CheckpointDir  # noqa: E402
from hpresilience.log import configure as configure_logging  # noqa: E402

STATE_FILE = "state.pt"
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM (or SIGINT) arrived: stop now. A BaseException so that no `except Exception`
    swallows it; inside `CheckpointDir.save` it makes the helper discard the checkpoint."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True, help="train until this step (the total, not per attempt)")
    p.add_argument("--ckpt-dir", required=True, help="checkpoint directory, seen by every node")
    p.add_argument("--ckpt-every", type=int, default=5, help="checkpoint every K steps (default 5)")
    p.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (default 3)")
    p.add_argument("--step-seconds", type=float, default=0.0,
                   help="sleep this long in every step, so that faults can be injected mid-run")
    p.add_argument("--result", help="rank 0 writes a JSON summary here at the end")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--global-batch", type=int, default=240,
                   help="samples per step over all ranks; must divide by the world size (240: 1-6, 8, 10, 12...)")
    p.add_argument("--width", type=int, default=64, help="hidden width of the MLP")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a collective may wait for a peer before failing (default 120)")
    a = p.parse_args(argv)
    if a.steps < 0 or a.ckpt_every < 1 or a.keep < 1 or a.global_batch < 1 or a.step_seconds < 0:
        p.error("--steps >= 0, --ckpt-every >= 1, --keep >= 1, --global-batch >= 1, --step-seconds >= 0")
    return a


# --------------------------------------------------------------------- model and data
IN_FEATURES = 16


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 1))


def teacher_weights(seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(IN_FEATURES, 8, generator=g), torch.randn(8, 1, generator=g)


def global_batch(seed: int, step: int, size: int, teacher) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of `step`: depends on (seed, step) only, never on the world size or on
    how many attempts it took to get here."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(size, IN_FEATURES, generator=g)
    w1, w2 = teacher
    y = torch.sin(x @ w1 / 4) @ w2 / 3 + 0.01 * torch.randn(size, 1, generator=g)
    return x, y


def param_checksum(model: nn.Module) -> Tuple[str, float]:
    """sha256 of the parameters' bytes (exact: same world size and history) and their sum
    (compare with a tolerance across world sizes)."""
    h = hashlib.sha256()
    total = 0.0
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(bytes(t.view(torch.uint8).flatten().tolist()))   # no numpy needed
        total += float(t.double().sum())
    return h.hexdigest(), total


# --------------------------------------------------------------------- checkpoints
def save_checkpoint(ckpts: CheckpointDir, step: int, model: DDP, optim: torch.optim.Optimizer) -> None:
    with ckpts.save(step) as tmp:   # an exception (Terminated included) discards it
        torch.save({"step": step, "model": model.module.state_dict(), "optim": optim.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                   tmp / STATE_FILE)


def resume(ckpts: CheckpointDir, model: DDP, optim: torch.optim.Optimizer, rank: int) -> Tuple[int, Optional[str]]:
    """Load the newest complete checkpoint on every rank; returns (its step, its path) or (0, None)."""
    path = ""
    if rank == 0:
        ckpts.cleanup_partial(older_than_seconds=600)
        latest = ckpts.latest()
        path = str(latest.path) if latest else ""
    path = broadcast_text(path, rank)           # every rank resumes from the same checkpoint
    if not path:
        return 0, None
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    step = state["step"]
    model.module.load_state_dict(state["model"])
    optim.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return step, path


def broadcast_text(text: str, rank: int) -> str:
    """Rank 0's `text` on every rank (plain tensors: broadcast_object_list needs numpy)."""
    data = text.encode() if rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buf = torch.tensor(list(data), dtype=torch.uint8) if rank == 0 else torch.zeros(int(size), dtype=torch.uint8)
    if int(size):
        dist.broadcast(buf, src=0)
    return bytes(buf.tolist()).decode()


def write_json_atomically(path: Path, data: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------- training
def train(args: argparse.Namespace) -> int:
    started = time.time()
    attempt = os.environ.get("HPR_ATTEMPT", "0")
    nodes = os.environ.get("HPR_NODELIST") or os.environ.get("SLURM_STEP_NODELIST") or socket.gethostname()
    if "RANK" not in os.environ:   # run without torchrun: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29400"))
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not divide by the world size {world}")
    per_rank = args.global_batch // world

    torch.manual_seed(args.seed)            # the same initial weights on every rank (DDP also broadcasts them)
    random.seed(args.seed)
    model = DDP(make_model(args.width))
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    teacher = teacher_weights(args.seed + 1)
    ckpts = CheckpointDir(args.ckpt_dir, keep=args.keep)

    start, path = resume(ckpts, model, optim, rank)
    if rank == 0:
        print(f"attempt={attempt} nodes={nodes} world={world} host={socket.gethostname()} "
              + (f"resuming from {path} (step {start})" if path else "no checkpoint: starting at step 0"),
              flush=True)

    loss_value = float("nan")
    first_step_at: Optional[float] = None
    for step in range(start + 1, args.steps + 1):
        x, y = global_batch(args.seed, step, args.global_batch, teacher)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()                      # DDP: gradients averaged over the ranks here
        optim.step()
        # the global batch's loss, the same number on every rank and for every world size
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        loss_value = float(mean) / world
        if args.step_seconds:
            time.sleep(args.step_seconds)
        if rank == 0:
            now = time.time()
            first_step_at = first_step_at or now
            print(f"step={step} loss={loss_value:.6f} attempt={attempt} nodes={nodes} world={world} "
                  f"t={now:.3f}", flush=True)
        if step % args.ckpt_every == 0 or step == args.steps:
            if rank == 0:
                save_checkpoint(ckpts, step, model, optim)
            dist.barrier()                   # nobody runs ahead while rank 0 writes

    digest, total = param_checksum(model.module)
    if rank == 0 and args.result:
        write_json_atomically(Path(args.result), {
            "final_step": max(start, args.steps), "steps_run": max(0, args.steps - start),
            "resumed_from": start, "resumed_from_path": path, "attempt": int(attempt) if attempt.isdigit() else attempt,
            "world_size": world, "nodes": nodes, "final_loss": loss_value if start < args.steps else None,
            "param_sha256": digest, "param_sum": total, "job_id": os.environ.get("SLURM_JOB_ID"),
            "started": round(started, 3), "first_step_at": first_step_at and round(first_step_at, 3),
            "finished": round(time.time(), 3),
        })
        print(f"done: step={args.steps} steps_run={max(0, args.steps - start)} resumed_from={start} "
              f"world={world} param_sha256={digest[:16]}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def on_signal(signum, _frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(level="warning")     # the checkpoint helper's events: warnings only, JSON on stderr
    torch.set_num_threads(1)               # one core per rank: small model, many ranks per machine
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rank = os.environ.get("RANK", "0")
    try:
        return train(args)
    except Terminated as e:
        print(f"rank {rank}: {e}: stopping (no checkpoint is left half written)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_TERMINATED)   # skip the interpreter's teardown: see the module docstring
    except SystemExit:
        raise
    except BaseException:
        print(f"rank {rank}: training failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
