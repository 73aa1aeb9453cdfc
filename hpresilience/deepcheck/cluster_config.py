"""Settings of the cluster-level all-reduce check (`hpresilience deepcheck --nodes`), issue 10."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterCheckConfig:
    """`[deepcheck.cluster]` in the agent's file (read where the command runs)."""
    min_busbw_gbps: float = 0.0

    def validate(self) -> None:
        if self.min_busbw_gbps < 0:
            raise ValueError("min_busbw_gbps must be >= 0")
