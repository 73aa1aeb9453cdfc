"""What the gateway returns: plain dataclasses, independent of the backend."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple

from .reason import ActionReason, ReasonOwner, parse_reason, reason_owner

# Flags that take a node out of scheduling (what sinfo shows as drain/fail/down).
UNAVAILABLE_FLAGS = frozenset({"DRAIN", "FAIL", "NOT_RESPONDING", "MAINTENANCE", "POWERED_DOWN", "POWERING_DOWN"})
REBOOT_FLAGS = frozenset({"REBOOT_REQUESTED", "REBOOT_ISSUED"})
# A MIG instance's GRES type ends in its profile name: [<c>c.]<g>g.<memory>gb[+<extra>] (see Node.gpu_count).
_MIG_PROFILE = re.compile(r"(?:^|[_-])(?:\d+c\.)?\d+g\.\d+gb(?:\+[a-z0-9.]+)?$", re.IGNORECASE)


NODE_CATEGORIES = ("idle", "allocated", "mixed", "drained", "failed", "down", "other")   # Node.category


@dataclass(frozen=True)
class Node:
    name: str
    state: str                              # base state: IDLE, ALLOCATED, MIXED, DOWN, ...
    flags: FrozenSet[str] = frozenset()     # DRAIN, FAIL, NOT_RESPONDING, REBOOT_REQUESTED, ...
    reason: Optional[str] = None            # without Slurm's "[user@time]" stamp
    reason_user: Optional[str] = None
    reason_time: Optional[dt.datetime] = None
    address: Optional[str] = None
    hostname: Optional[str] = None
    port: Optional[int] = None
    boot_time: Optional[dt.datetime] = None
    slurmd_start_time: Optional[dt.datetime] = None
    next_state: Optional[str] = None
    partitions: Tuple[str, ...] = ()
    gres: Tuple[str, ...] = ()              # e.g. ("gpu:8",)
    features: Tuple[str, ...] = ()          # ActiveFeatures, e.g. ("h100", "ib") (issue 10: per-feature thresholds)
    cpus: Optional[int] = None
    version: Optional[str] = None
    jobs: Tuple[int, ...] = ()              # filled in by SlurmGateway.nodes(with_jobs=True)
    slurm_user: Optional[str] = None        # the cluster's SlurmUser, filled in by SlurmGateway.nodes()

    @property
    def gpu_count(self) -> Optional[int]:
        """Physical GPUs Slurm was told this node has (Gres=gpu:8, gpu:h100:8, ...); None when it has no
        gpu GRES, or when any gpu GRES type is a MIG profile (1g.10gb, 3g.40gb, 1g.5gb+me, Slurm's
        AutoDetect a100_1g.5gb): those count instances (gpu:1g.10gb:28,gpu:3g.40gb:8 is 36 on 8 GPUs)
        and say nothing of how many GPUs hold them (issue 9, defect 6).

        >>> Node("n1", "IDLE", gres=("gpu:h100:4", "gpu:a100:2", "nic:1")).gpu_count
        6
        >>> [Node("n1", "IDLE", gres=gres).gpu_count for gres in [("gpu:1g.10gb:28", "gpu:3g.40gb:8"),
        ...     ("gpu:h100:4", "gpu:nvidia_a100_1g.5gb+me:7"), ("gpu:7g.80gb:8",), ("gpu:a100-sxm4-80gb:8",)]]
        [None, None, None, 8]
        """
        gpus = [g.split(":") for g in self.gres if g.split(":", 1)[0] == "gpu"]
        if any(len(parts) > 2 and _MIG_PROFILE.search(parts[1]) for parts in gpus):
            return None
        counts = [int(parts[-1]) for parts in gpus if len(parts) > 1 and parts[-1].isdigit()]
        return sum(counts) if counts else None

    @property
    def action_reason(self) -> Optional[ActionReason]:
        """The Action: reason, when the node's reason is one."""
        return parse_reason(self.reason)

    @property
    def reason_owner(self) -> ReasonOwner:
        """Whose the reason is, by exact form and writer (see reason.reason_owner)."""
        return reason_owner(self.reason, self.reason_user, self.slurm_user)

    @property
    def reason_is_foreign(self) -> bool:
        """A reason that is not an Action: request is on the node (an admin's, NHC's,
        Slurm's, or our own give-up for a human): never ours to overwrite or clear."""
        return self.reason_owner not in (ReasonOwner.NONE, ReasonOwner.ACTION)

    @property
    def is_down(self) -> bool:
        return self.state == "DOWN"

    @property
    def is_drained(self) -> bool:
        """Out of scheduling by an admin or by us (DRAIN or FAIL), jobs or not."""
        return bool(self.flags & {"DRAIN", "FAIL"})

    @property
    def is_responding(self) -> bool:
        return "NOT_RESPONDING" not in self.flags

    @property
    def reboot_pending(self) -> bool:
        return bool(self.flags & REBOOT_FLAGS)

    @property
    def is_busy(self) -> bool:
        """Jobs are on the node (running or still being cleaned up)."""
        return self.state in ("ALLOCATED", "MIXED") or "COMPLETING" in self.flags

    @property
    def available(self) -> bool:
        """Schedulable and healthy as far as Slurm knows."""
        return self.state in ("IDLE", "ALLOCATED", "MIXED") and not (self.flags & (UNAVAILABLE_FLAGS | REBOOT_FLAGS))

    @property
    def state_text(self) -> str:
        return "+".join([self.state, *sorted(self.flags)])

    @property
    def category(self) -> str:
        """One bucket per node for `hpresilience status` and the controller's metrics: down,
        failed, drained, idle/allocated/mixed, or other (not responding, rebooting, powered down, ...)."""
        if self.is_down:
            return "down"
        if "FAIL" in self.flags:
            return "failed"
        if "DRAIN" in self.flags:
            return "drained"
        if self.available:
            return self.state.lower()
        return "other"


@dataclass(frozen=True)
class Job:
    job_id: int
    name: str
    state: str                             # RUNNING, PENDING, COMPLETING, ...
    reason: Optional[str] = None           # why it is pending/held, e.g. BeginTime
    user: Optional[str] = None
    partition: Optional[str] = None
    nodes: Tuple[str, ...] = ()            # allocated nodes, expanded
    nodelist: str = ""                     # the same, as Slurm's hostlist expression
    requested_nodes: Tuple[str, ...] = ()
    excluded_nodes: Tuple[str, ...] = ()
    batch_host: Optional[str] = None
    batch: bool = False
    num_nodes: Optional[int] = None
    exclusive: bool = False
    requeue: bool = False
    restart_count: int = 0
    gres: Tuple[str, ...] = ()             # per-node GRES request, e.g. ("gpu:2",)
    array_job_id: Optional[int] = None
    array_task_id: Optional[str] = None
    submit_time: Optional[dt.datetime] = None
    start_time: Optional[dt.datetime] = None
    eligible_time: Optional[dt.datetime] = None
    work_dir: Optional[str] = None
    std_out: Optional[str] = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def is_active(self) -> bool:
        """Holds nodes: running, suspended, or being torn down."""
        return self.state in ("RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STAGE_OUT")


@dataclass(frozen=True)
class Reservation:
    name: str
    nodes: Tuple[str, ...] = ()            # expanded
    flags: FrozenSet[str] = frozenset()
    users: Tuple[str, ...] = ()
    state: str = ""                         # ACTIVE | INACTIVE
    start_time: Optional[dt.datetime] = None
    end_time: Optional[dt.datetime] = None


@dataclass(frozen=True)
class StepResult:
    """What `srun` on one node gave back (see SlurmGateway.run_on_node)."""
    returncode: Optional[int]              # None: killed at the timeout
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Step:
    """A job step (`scontrol -o show step`): "123.0", "123.batch", ..."""
    step_id: str
    state: str
    nodes: Tuple[str, ...] = ()
    name: str = ""
    srun_pid: Optional[int] = None         # SrunHost:Pid's pid: which srun started the step


@dataclass(frozen=True)
class RequeuedJob:
    """A requeued job (restart count >= 1) waiting for its BeginTime (SlurmGateway.requeued_jobs)."""
    job_id: int
    restart_count: int
    comment: str
    requeued_at: Optional[dt.datetime] = None   # its SubmitTime, which Slurm resets at a requeue
