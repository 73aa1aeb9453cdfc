"""Settings of the cluster-level all-reduce check (`hpresilience deepcheck --nodes`), issue 10.

    [deepcheck.cluster]
    min_busbw_gbps = 150.0                 # NCCL on a known fabric; 0 = no absolute threshold
    min_relative = 0.5                     # a pair below half the best pair is slow (0 = off)
    srun_args = ["--partition=maint", "--reservation=hpr-maint"]
    env = { NCCL_IB_HCA = "mlx5", GLOO_SOCKET_IFNAME = "ib0" }
    # the site's nccl-tests instead of the torch worker (one task per GPU):
    nccl_tests = ["/opt/nccl-tests/build/all_reduce_perf", "-b", "1G", "-e", "1G", "-g", "1"]
    ntasks_per_node = 8
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

BACKENDS = ("auto", "gloo", "nccl")


def _default_sizes() -> List[int]:
    return [16 << 20, 256 << 20]


@dataclass
class ClusterCheckConfig:
    """`[deepcheck.cluster]` in the agent's file (read where the command runs)."""
    min_busbw_gbps: float = 0.0          # bus bandwidth every group must reach (GB/s); 0 = off
    min_relative: float = 0.5            # a pair below this fraction of the best pair is slow; 0 = off
    group_test: bool = True              # first one all-reduce across all the nodes
    backend: str = "auto"                # the torch worker's: nccl when CUDA is available, else gloo
    sizes_bytes: List[int] = field(default_factory=_default_sizes)
    iterations: int = 20                 # timed all-reduces per size
    warmup: int = 5                      # untimed all-reduces per size first
    nccl_tests: List[str] = field(default_factory=list)   # all_reduce_perf argv; replaces the torch worker
    ntasks_per_node: int = 1             # the torch worker uses one; nccl-tests with -g 1 one per GPU
    python: str = ""                     # the nodes' interpreter for the worker; "" = this one
    srun_args: List[str] = field(default_factory=list)    # partition, reservation, account...
    env: Dict[str, str] = field(default_factory=dict)     # exported to the workers
    timeout_seconds: float = 300.0       # one run, launch included; past it, killed: could not run
    collective_timeout_seconds: float = 120.0   # the worker's rendezvous and each collective
    immediate_seconds: int = 60          # srun --immediate: a node not allocatable by then -> could not run
    port_base: int = 29600               # the worker's rendezvous port: port_base + (job, step) mod 1000
    max_parallel: int = 64               # runs (sruns) at once within a round
    max_rounds: int = 8                  # localisation rounds at most (a fabric-wide fault fails every pair)

    def validate(self) -> None:
        if self.min_busbw_gbps < 0:
            raise ValueError("min_busbw_gbps must be >= 0")
        if not 0 <= self.min_relative < 1:
            raise ValueError("min_relative must be in [0, 1)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: expected {', '.join(BACKENDS)}")
        if not self.sizes_bytes or any(s < 4 for s in self.sizes_bytes):
            raise ValueError("sizes_bytes: at least one size, each >= 4 bytes")
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError("iterations must be >= 1 and warmup >= 0")
        if min(self.ntasks_per_node, self.max_parallel, self.max_rounds, self.immediate_seconds) < 1:
            raise ValueError("ntasks_per_node, max_parallel, max_rounds and immediate_seconds must be >= 1")
        if not 0 < self.collective_timeout_seconds < self.timeout_seconds:
            # the worker must give up (and say so) before the run is killed, or a slow peer reads as a hang
            raise ValueError("collective_timeout_seconds must be > 0 and below timeout_seconds")
        if not 1024 <= self.port_base <= 65535 - 1000:
            raise ValueError("port_base must be in [1024, 64535]")
