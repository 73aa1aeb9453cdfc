"""SlurmGateway: the one place where hpresilience reads and changes Slurm.

Agent, controller and the auto-resume shim all go through this class. It
validates node names, keeps reasons sane, and enforces the ownership rule:
a reason that is not an ``Action:`` request in its exact form (see
reason.reason_owner) belongs to someone else and is never overwritten or
cleared by us.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import structlog

from .backend import ScontrolBackend, SlurmBackend
from .errors import JobNotFound, NodeNotFound, SlurmCommandError, SlurmError
from .hostlist import Nodes, expand, fold
from .models import Job, Node, RequeuedJob, Reservation, Step, StepResult
from .reason import EXPEDITE_MARK, ActionReason, sanitize_reason

log = structlog.get_logger(__name__)


def with_expedite_mark(comment: str) -> str:
    """The comment with EXPEDITE_MARK in front, once; the user's text after it exactly as it was.

    >>> with_expedite_mark("keep  this"), with_expedite_mark("hpr-expedite keep"), with_expedite_mark("")
    ('hpr-expedite keep  this', 'hpr-expedite keep', 'hpr-expedite')
    """
    if EXPEDITE_MARK in comment.split():
        return comment
    return f"{EXPEDITE_MARK} {comment}" if comment else EXPEDITE_MARK


def without_expedite_mark(comment: str) -> str:
    r"""The comment without the EXPEDITE_MARK word(s); the rest exactly as it was.

    >>> without_expedite_mark("hpr-expedite keep\n this"), without_expedite_mark("hpr-expedite")
    ('keep\n this', '')
    """
    return re.sub(rf"(?<!\S){re.escape(EXPEDITE_MARK)}(?:\s|$)", "", comment)


OLDEST_SUPPORTED = (22, 5)
NEWEST_TESTED = (25, 11)


class NodeState(str, enum.Enum):
    """States we may set. FAIL lets running jobs finish (the default for our
    faults), DRAIN likewise, DOWN kills them now; RESUME returns a node."""
    FAIL = "FAIL"
    DRAIN = "DRAIN"
    DOWN = "DOWN"
    RESUME = "RESUME"
    POWER_DOWN_FORCE = "POWER_DOWN_FORCE"   # power saving: off now, jobs killed (cloud replace)
    POWER_UP = "POWER_UP"


class ReasonNotOurs(SlurmError):
    """Refused: the node carries a reason someone else wrote."""

    def __init__(self, node: str, reason: str):
        super().__init__(f"node {node} has a reason we did not write ({reason!r}); leaving it alone")
        self.node = node
        self.reason = reason


class SlurmGateway:
    def __init__(self, backend: Optional[SlurmBackend] = None):
        self.backend: SlurmBackend = backend or ScontrolBackend()
        self._version: Optional[Tuple[int, int, int]] = None
        self._slurm_user: Optional[str] = None

    # ---------------------------------------------------------------- version
    @property
    def version(self) -> Tuple[int, int, int]:
        """(major, minor, micro) of the Slurm tools, detected once."""
        if self._version is None:
            self._version = self.backend.version()
            if self._version[:2] < OLDEST_SUPPORTED:
                raise SlurmError(f"Slurm {'.'.join(map(str, self._version))} is older than the oldest "
                                 f"supported release {OLDEST_SUPPORTED[0]}.{OLDEST_SUPPORTED[1]:02d}")
            if self._version[:2] > NEWEST_TESTED:
                log.warning("slurm.version_untested", version=self._version)
        return self._version

    @property
    def requeue_has_delay(self) -> bool:
        """Before 25.11, a requeued job waits ~121 s (cred expiry) unless its
        StartTime is reset; 25.11 added requeue_delay= and --requeue=expedite."""
        return self.version[:2] < (25, 11)

    @property
    def slurm_user(self) -> str:
        """The cluster's SlurmUser, read once: the writer of Slurm's own reasons."""
        if self._slurm_user is None:
            self._slurm_user = self.backend.slurm_user()
        return self._slurm_user

    # ------------------------------------------------------------------ reads
    def nodes(self, nodes: Optional[Nodes] = None, with_jobs: bool = False) -> List[Node]:
        """Nodes (all, or those named), optionally with the ids of active jobs on each."""
        found = self.backend.show_nodes(fold(nodes) if nodes is not None else None)
        # Every Node can tell Slurm's own reasons from others' (issue 9, defect 2).
        slurm_user = self.slurm_user
        found = [dataclasses.replace(n, slurm_user=slurm_user) for n in found]
        if nodes is not None:
            missing = set(expand(nodes)) - {n.name for n in found}
            if missing:
                raise NodeNotFound(fold(missing), ["scontrol", "show", "node", fold(nodes)], "not found")
        if not with_jobs:
            return found
        on_node: Dict[str, List[int]] = {}
        for job in self.jobs():
            if job.is_active:
                for name in job.nodes:
                    on_node.setdefault(name, []).append(job.job_id)
        return [dataclasses.replace(n, jobs=tuple(sorted(on_node.get(n.name, ())))) for n in found]

    def node(self, name: str, with_jobs: bool = False) -> Node:
        if len(expand(name)) != 1:
            raise NodeNotFound(name, ["scontrol", "show", "node", name], "expected exactly one node")
        return self.nodes(name, with_jobs=with_jobs)[0]

    def jobs(self) -> List[Job]:
        return self.backend.show_jobs()

    def job(self, job_id: int) -> Job:
        found = self.backend.show_jobs(int(job_id))
        # `show job <array id>` returns every task; pick the one asked for.
        for job in found:
            if job.job_id == int(job_id):
                return job
        if found:
            return found[0]
        raise JobNotFound(str(job_id), ["scontrol", "show", "job", str(job_id)], "no such job")

    # ----------------------------------------------------------------- writes
    def set_state(self, nodes: Nodes, state: NodeState, reason: Optional[str] = None) -> None:
        """Set state (and reason) on nodes, exactly as given. Prefer the
        ownership-aware mark_action() for our own faults."""
        state = NodeState(state)
        if state in (NodeState.FAIL, NodeState.DRAIN, NodeState.DOWN) and not reason:
            raise ValueError(f"Slurm requires a reason to set {state.value}")
        nodelist = fold(nodes)
        reason = sanitize_reason(reason) if reason else None
        self.backend.update_nodes(nodelist, state.value, reason)
        log.info("slurm.set_state", nodes=nodelist, state=state.value, reason=reason)

    def mark_action(self, node: Union[str, Node], action: ActionReason, state: NodeState = NodeState.FAIL) -> Node:
        """Take a node out of service with an Action: reason, unless someone else's
        reason is already on it. Pass a Node just read to save a second read.
        Returns the node as it was before."""
        if state is NodeState.RESUME:
            raise ValueError("mark_action takes a node out of service; it never resumes one")
        current = node if isinstance(node, Node) else self.node(node)
        if current.reason_is_foreign:
            raise ReasonNotOurs(current.name, current.reason)
        self.set_state(current.name, state, str(action))
        return current

    def reboot(self, nodes: Nodes, reason: Optional[str] = None, asap: bool = True,
               next_state: Optional[NodeState] = NodeState.RESUME) -> None:
        """`scontrol reboot`: RebootProgram runs on the node once it is idle
        (ASAP drains it first so no new job lands there meanwhile)."""
        if next_state not in (None, NodeState.RESUME, NodeState.DOWN):
            raise ValueError(f"next_state must be RESUME or DOWN, not {next_state}")
        nodelist = fold(nodes)
        reason = sanitize_reason(reason) if reason else None
        self.backend.reboot_nodes(nodelist, asap, next_state.value if next_state else None, reason)
        log.info("slurm.reboot", nodes=nodelist, asap=asap, next_state=next_state, reason=reason)

    def requeued_jobs(self) -> List[RequeuedJob]:
        """Requeued jobs waiting for their BeginTime, each with its own Comment (read so that
        user text cannot forge another job's record)."""
        return self.backend.requeued_jobs()

    def steps(self, job_id: int) -> List[Step]:
        return self.backend.show_steps(int(job_id))

    def submit_batch(self, argv: Sequence[str], name: str) -> int:
        """`sbatch --parsable --job-name=NAME ARGV...` (sbatch options, then the script and its
        arguments): the job id. `name` must be unique: a failed try is looked for by it before
        sbatch runs again, and twins are cancelled, so at most one job is left running.
        `hpresilience drill` submits its canary so (issue 13)."""
        job_id = self.backend.submit_batch(argv, name)
        log.info("slurm.submitted", job=job_id)
        return job_id

    def cancel_job(self, job_id: int) -> None:
        self.backend.cancel_job(job_id)
        log.info("slurm.cancelled", job=job_id)

    def job_ids_named(self, name: str) -> List[int]:
        """Ids of the jobs called `name` (any state, any partition), oldest first."""
        return self.backend.job_ids_named(name)

    def signal_step(self, step_id: str, signal_name: str = "KILL") -> None:
        """`scancel --signal=NAME JOB.STEP` (for a step whose srun no longer answers)."""
        self.backend.signal_step(step_id, signal_name)
        log.info("slurm.signal_step", step=step_id, signal=signal_name)

    def requeue(self, job_id: int, expedite: bool = False) -> None:
        """`scontrol requeue JOB`. expedite=True: the job should be eligible again at once, not after
        the requeue delay (~121 s). Slurm 25.11+ does that itself for a job submitted with
        --requeue=expedite; any other job (and every job before 25.11) first gets EXPEDITE_MARK in
        front of its Comment, and `hpresilience controller` then resets its StartTime
        (controller/expedite.py). The user's own comment is kept exactly, and never marked twice."""
        job_id = int(job_id)
        if expedite:
            try:
                self._mark_expedite(job_id)
            except SlurmError as e:
                # Requeue all the same: the job then waits Slurm's requeue delay unless job_submit.lua
                # marked it. Seen: 22.05 refuses every update of a --no-kill job holding a step on a
                # node it dropped ("Unexpected message received for job", issue 11); a slow slurmctld
                # or an unreadable comment must not keep a job that needs a requeue from one either.
                log.warning("slurm.expedite_mark_failed", job=job_id, error=str(e))
        self.backend.requeue_job(job_id)
        log.info("slurm.requeue", job=job_id, expedite=expedite)

    def _mark_expedite(self, job_id: int) -> None:
        if self._slurm_expedites(job_id):
            return
        comment = self.backend.job_comment(job_id)   # the job's own, read so no other text forges it
        marked = with_expedite_mark(comment)
        if marked != comment:
            self.backend.update_job(job_id, [("Comment", marked)])

    def _slurm_expedites(self, job_id: int) -> bool:
        """Slurm makes this job eligible at once after a requeue (25.11+, submitted --requeue=expedite;
        accepted only where SlurmctldParameters=enable_expedited_requeue)."""
        return not self.requeue_has_delay and self.backend.expedited_requeue(job_id)

    def update_job(self, job_id: int, nodelist: Optional[Nodes] = None,
                   start_time: Optional[dt.datetime] = None, now: bool = False,
                   comment: Optional[str] = None) -> None:
        """Shrink a running job to `nodelist`, or move its StartTime (now=True
        makes a requeued job eligible at once instead of after ~121 s)."""
        fields: List[Tuple[str, str]] = []
        if nodelist is not None:
            fields.append(("NodeList", fold(nodelist)))
        if now:
            fields.append(("StartTime", "now"))
        elif start_time is not None:
            fields.append(("StartTime", start_time.astimezone().strftime("%Y-%m-%dT%H:%M:%S")))
        if comment is not None:
            # As given: a comment is the user's text, newlines and all (issue 11), in one argv word.
            fields.append(("Comment", comment))
        if not fields:
            raise ValueError("update_job needs nodelist, start_time, now or comment")
        self.backend.update_job(int(job_id), fields)
        log.info("slurm.update_job", job=int(job_id), fields=dict(fields))

    # ------------------------------------------------------------ reservations
    def reservations(self) -> List[Reservation]:
        return self.backend.show_reservations()

    def reservation(self, name: str) -> Optional[Reservation]:
        return next((r for r in self.reservations() if r.name == name), None)

    def create_reservation(self, name: str, nodes: Nodes, users: Sequence[str], minutes: Optional[int],
                           flags: Sequence[str] = ("MAINT", "IGNORE_JOBS")) -> None:
        """A reservation starting now; minutes=None lasts until deleted."""
        self.backend.create_reservation([
            ("ReservationName", name), ("Nodes", fold(nodes)), ("StartTime", "now"),
            ("Duration", "UNLIMITED" if minutes is None else str(int(minutes))),
            ("Users", ",".join(users)), ("Flags", ",".join(flags))])
        log.info("slurm.reservation_created", name=name, nodes=fold(nodes), minutes=minutes)

    def set_reservation_nodes(self, name: str, nodes: Nodes) -> None:
        self.backend.update_reservation(name, [("Nodes", fold(nodes))])
        log.info("slurm.reservation_updated", name=name, nodes=fold(nodes))

    def delete_reservation(self, name: str) -> bool:
        """Delete; False when there was no such reservation (idempotent)."""
        try:
            self.backend.delete_reservation(name)
        except SlurmCommandError as e:
            if "invalid reservation name" in e.stderr.lower() or self.reservation(name) is None:
                return False
            raise
        log.info("slurm.reservation_deleted", name=name)
        return True

    # -------------------------------------------------------------- job steps
    def run_on_node(self, node: str, argv: Sequence[str], timeout: float, reservation: Optional[str] = None,
                    srun: Sequence[str] = ("srun",), job_name: str = "hpr-verify") -> StepResult:
        """Run `argv` on `node` as a one-task job step (srun -w NODE), killed at `timeout`."""
        if len(expand(node)) != 1:
            raise NodeNotFound(node, ["srun", "-w", node], "expected exactly one node")
        if not argv or argv[0].startswith("-"):
            raise ValueError(f"not a command: {list(argv)!r}")
        minutes = max(1, math.ceil(timeout / 60))
        options = [f"--reservation={reservation}"] if reservation else []
        options += ["-w", node, "-N1", "-n1", f"--time={minutes}", f"--job-name={job_name}"]
        result = self.backend.run_step([*srun, *options, *argv], timeout)
        log.info("slurm.step", node=node, argv=list(argv), returncode=result.returncode)
        return result
