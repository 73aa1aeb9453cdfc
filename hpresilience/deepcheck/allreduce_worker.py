"""The all-reduce workload of `hpresilience deepcheck --nodes` (issue 10), one task per node under srun:

    srun -N 2 --ntasks-per-node=1 -w n[1-2] python -m hpresilience.deepcheck.allreduce_worker \\
        --sizes 1048576 --iterations 5 --address n1=10.0.0.1

Rendezvous from Slurm's environment: rank SLURM_PROCID of SLURM_NTASKS; the master is
the first node of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST outside a step), where task 0
runs, at the address given with --address (Slurm's NodeAddr, which the caller reads;
node names need not resolve) or its name; the port is --port-base plus (job id * 8 + step
id) modulo PORT_SPAN, so runs at the same time (each its own srun) do not collide. NCCL when
CUDA is available, gloo otherwise.

Output, one JSON line on stdout: rank 0's result when it worked ({"ok": true,
"busbw_gbps": ..., "sizes": [...]}); any rank's failure ({"ok": false, "phase":
"rendezvous"|"collective", "error": ...}). The phase decides what the failure means to
the caller: a rendezvous that failed is no evidence about the node (a peer never
started), a collective that raised or summed wrong after the workers met is.
Bus bandwidth as nccl-tests defines it: algbw * 2(n-1)/n, in GB/s (1e9 bytes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

EXIT_RENDEZVOUS, EXIT_COLLECTIVE = 3, 4
PORT_SPAN = 1000


def bus_bandwidth(size_bytes: int, seconds: float, world: int) -> float:
    """GB/s on the wire per rank, as nccl-tests reports it.

    >>> round(bus_bandwidth(10**9, 1.0, 4), 3)
    1.5
    """
    return size_bytes / seconds / 1e9 * 2 * (world - 1) / world


def master_port(port_base: int, env: Mapping[str, str]) -> int:
    """A port per (job, step): every rank computes the same one, concurrent runs differ.

    >>> master_port(29600, {"SLURM_JOB_ID": "17", "SLURM_STEP_ID": "0"}), master_port(29600, {})
    (29736, 29600)
    """
    job, step = (_int(env.get(k)) for k in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
    return port_base + (job * 8 + step) % PORT_SPAN


def master_address(env: Mapping[str, str], addresses: Mapping[str, str]) -> str:
    from ..slurm.hostlist import expand
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("not under srun: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
    first = expand(nodelist)[0]
    return addresses.get(first, first)


def _int(text: Optional[str]) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _emit(data: Dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(torch: Any, dist: Any, device: Any, size: int, iterations: int, warmup: int) -> Dict[str, float]:
    world = dist.get_world_size()
    tensor = torch.ones(max(size // 4, 1), dtype=torch.float32, device=device)
    for _ in range(warmup):
        dist.all_reduce(tensor)
    _sync(torch, device)
    dist.barrier()
    began = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(tensor)
    _sync(torch, device)
    seconds = (time.perf_counter() - began) / iterations
    nbytes = tensor.numel() * 4
    return {"bytes": nbytes, "seconds": seconds, "algbw_gbps": nbytes / seconds / 1e9,
            "busbw_gbps": bus_bandwidth(nbytes, seconds, world)}


def check_sum(torch: Any, dist: Any, device: Any, size: int) -> Optional[str]:
    """Each rank contributes rank+1: every element must sum to n(n+1)/2 (a fabric that corrupts data)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensor = torch.full((max(size // 4, 1),), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    expected = world * (world + 1) / 2
    wrong = int((tensor != expected).sum().item())
    return f"{wrong} of {tensor.numel()} elements summed wrong on rank {rank}" if wrong else None


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # torch's CPU wheel warns at import when numpy is absent; the worker does not use numpy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist
    rank, world = _int(env.get("SLURM_PROCID")), _int(env.get("SLURM_NTASKS")) or 1
    node = env.get("SLURMD_NODENAME", "")
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", _int(env.get("SLURM_LOCALID"))) if backend == "nccl" else torch.device("cpu")
    failure = {"ok": False, "rank": rank, "node": node, "backend": backend}
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        addresses = dict(a.split("=", 1) for a in args.address)
        url = f"tcp://{master_address(env, addresses)}:{master_port(args.port_base, env)}"
        dist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
    except Exception as e:  # the workers never met: says nothing about this node's fabric
        _emit({**failure, "phase": "rendezvous", "error": f"{type(e).__name__}: {e}"})
        return EXIT_RENDEZVOUS
    try:
        began = time.perf_counter()
        sizes = [measure(torch, dist, device, s, args.iterations, args.warmup) for s in args.sizes]
        wrong = check_sum(torch, dist, device, args.sizes[0])
    except Exception as e:
        _emit({**failure, "phase": "collective", "error": f"{type(e).__name__}: {e}"})
        return EXIT_COLLECTIVE
    if wrong:
        _emit({**failure, "phase": "collective", "error": wrong})
        return EXIT_COLLECTIVE
    if rank == 0:
        _emit({"ok": True, "rank": 0, "node": node, "backend": backend, "world": world,
               "busbw_gbps": max(s["busbw_gbps"] for s in sizes), "sizes": sizes,
               "seconds": time.perf_counter() - began})
    dist.destroy_process_group()
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpresilience.deepcheck.allreduce_worker")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1 << 20],
                   help="message sizes in bytes, comma-separated")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--timeout", type=float, default=120.0, help="rendezvous and each collective, seconds")
    p.add_argument("--port-base", type=int, default=29600)
    p.add_argument("--address", action="append", default=[], metavar="NODE=ADDR",
                   help="a node's address (Slurm's NodeAddr), repeatable")
    return p.parse_args(list(argv))


def main(argv: Optional[List[str]] = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv), os.environ)


if __name__ == "__main__":
    sys.exit(main())
