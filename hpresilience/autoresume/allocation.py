"""The nodes of a job as Slurm sees them now: which are healthy, which one is
the master, in job order. Shared by the auto-resume runner (each attempt's
environment) and `hpresilience nodes` (the same for scripts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from ..slurm import Job, Node, SlurmGateway
from ..slurm.hostlist import fold

BAD_FLAGS = {"DRAIN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN", "POWERING_DOWN"}


def why_bad(node: Node) -> Optional[str]:
    """Why a node must not run (more of) a training step, or None when it is fine.

    Any Action: reason counts, even before Slurm's state changed (the agent sets
    reason and state in one call, an admin may not)."""
    if node.action_reason is not None:
        return node.reason
    if node.is_down:
        return f"DOWN ({node.reason or 'no reason'})"
    flags = node.flags & BAD_FLAGS
    if flags:
        return f"{'+'.join(sorted(flags))} ({node.reason or 'no reason'})"
    return None


@dataclass(frozen=True)
class Allocation:
    job: Job
    nodes: List[Node]              # the job's nodes, in job order

    @classmethod
    def read(cls, gateway: SlurmGateway, job_id: int) -> Allocation:
        job = gateway.job(job_id)
        found = {n.name: n for n in gateway.nodes(job.nodes)} if job.nodes else {}
        return cls(job, [found[name] for name in job.nodes if name in found])

    @property
    def bad(self) -> Dict[str, str]:
        return {n.name: why for n in self.nodes if (why := why_bad(n)) is not None}

    @property
    def healthy(self) -> List[str]:
        bad = self.bad
        return [n.name for n in self.nodes if n.name not in bad]

    def address(self, name: str) -> str:
        """The node's address for MASTER_ADDR: Slurm's NodeAddr, else its name."""
        node = next((n for n in self.nodes if n.name == name), None)
        return (node.address if node is not None and node.address else None) or name


def step_env(alloc: Allocation, nodes: List[str], attempt: int, max_attempts: int,
             master_port: int) -> Dict[str, str]:
    """What every attempt's tasks get: the node list recomputed from Slurm, never the
    stale $SLURM_JOB_NODELIST of the batch script."""
    return {
        "HPR_NODELIST": fold(nodes), "HPR_NNODES": str(len(nodes)),
        "MASTER_ADDR": alloc.address(nodes[0]), "MASTER_PORT": str(master_port),
        "HPR_ATTEMPT": str(attempt), "HPR_MAX_ATTEMPTS": str(max_attempts), "HPR_JOB_ID": str(alloc.job.job_id),
    }
