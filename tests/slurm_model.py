"""An in-memory model of Slurm 22.05's node and job state machine, at our backend seam (issue 9).

`SlurmModel` implements `hpresilience.slurm.backend.SlurmBackend`, so `SlurmGateway(SlurmModel(...))` is the
real gateway over a fake Slurm. It is a fake of *Slurm*, never of our code: unit and Hypothesis property tests
of the decision logic (agent actuator/policy, controller pass and steps, auto-resume runner, providers) drive
it, and integration tests stay on the real test cluster (scripts/testcluster).

What it models, following what docs/testcluster.md, docs/controller.md and BRIEF.md §3-4 measured on 22.05:
- node base state (IDLE/ALLOCATED/MIXED/DOWN) and flags (DRAIN, FAIL, NOT_RESPONDING, REBOOT_REQUESTED,
  REBOOT_ISSUED, POWERED_DOWN, POWERING_UP, POWERING_DOWN, COMPLETING, MAINTENANCE, RESERVED); reasons with
  their writer and second-resolution time; BootTime.
- FAIL/DRAIN let jobs run (ALLOCATED+FAIL, then IDLE+FAIL); DOWN kills jobs (NODE_FAIL, requeueable ones
  requeue); RESUME clears DRAIN/FAIL and the reason, and a DOWN node shows IDLE+NOT_RESPONDING with no
  BootTime until it registers again (register_seconds later; a dead one goes DOWN again).
- `scontrol reboot [ASAP] [nextstate=]`: REBOOT_REQUESTED (+DRAIN for ASAP), issued once the node has no
  jobs (reason += " : reboot issued"), done reboot_seconds later with a BootTime after the request;
  nextstate RESUME (or none) clears DRAIN and the reason but keeps FAIL and its reason; DOWN keeps FAIL,
  drops DRAIN, reason += " : reboot complete". A reboot that never comes back: DOWN after ResumeTimeout.
- a dead node: NOT_RESPONDING, DOWN with "Not responding" after SlurmdTimeout, its jobs NODE_FAIL; a new
  boot nobody asked for: DOWN, "Node unexpectedly rebooted" only where no reason (or Slurm's "Not
  responding") was there (ReturnToService=1: a node DOWN only for silence returns when it answers again).
- power saving: POWER_DOWN_FORCE kills jobs, POWERING_DOWN, POWERED_DOWN after SuspendTimeout; POWER_UP
  boots a fresh instance (new BootTime) that registers with DRAIN/FAIL kept and the reason cleared.
- requeue: PENDING, Reason=BeginTime, eligible 121 s later (or at once after StartTime=now), restarts+1;
  a simple scheduler starts eligible pending jobs on the first free nodes by name.
- reservations (MAINT nodes show MAINTENANCE+RESERVED) and srun steps: `run_step` returns `check(node)` with
  srun's own "task 0: Exited with exit code N" line, and waits (returncode None, the clock moved by the
  timeout) when the node cannot run it (down, drained, reserved for someone else).
- errors: the stderr the real tools print, classified by the real `runner.classify`, so the same error
  classes come out (NodeNotFound, JobNotFound, SlurmUnavailable while `controller_down`).

Not modelled: CPUs/memory (a non-exclusive job makes a node MIXED, an exclusive one ALLOCATED), job arrays,
GRES scheduling, partitions' limits, --no-kill, accounting, cancel_reboot, HealthCheckProgram, the extern and
batch steps, the jobs srun creates, and Slurm 23.02+ changes but one: with version=(25, 11, 0),
`submit(expedite=True)` is `sbatch --requeue=expedite`, requeued with no delay (read in 25.11's source, not
run). Assumptions where the docs are silent are marked "assumed" below.
Not thread-safe beyond one lock around every public call.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Set, Tuple

from hpresilience.slurm.hostlist import expand, fold
from hpresilience.slurm.models import Job, Node, RequeuedJob, Reservation, Step, StepResult
from hpresilience.slurm.runner import Target, classify

EPOCH = dt.datetime(2026, 11, 22, 12, 0, 0, tzinfo=dt.timezone.utc)
REQUEUE_DELAY_SECONDS = 121.0        # cred_expire 120 s + 1, measured on 22.05 (BRIEF §3)
UNLIMITED_SECONDS = 365 * 86400.0    # Duration=UNLIMITED shows as a year (docs/controller.md)
BAD_FOR_JOBS = frozenset({"DRAIN", "FAIL", "NOT_RESPONDING", "REBOOT_REQUESTED", "REBOOT_ISSUED",
                          "POWERED_DOWN", "POWERING_DOWN", "POWERING_UP"})
NOT_RESPONDING = "Not responding"


@dataclass(frozen=True)
class Write:
    """One change made to Slurm: by a caller (`user`) or by Slurm itself (`slurm_user`, op "slurm")."""
    time: dt.datetime
    user: str
    op: str                  # update_node, reboot, requeue, update_job, signal_step, *_reservation, slurm
    target: str              # a node name, a job id, a step id or a reservation name
    fields: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRun:
    """One `srun` the model was asked to run (SlurmGateway.run_on_node)."""
    time: dt.datetime
    node: str
    argv: Tuple[str, ...]
    reservation: Optional[str]
    timeout: float


@dataclass
class _Node:
    name: str
    partitions: Tuple[str, ...]
    gres: Tuple[str, ...]
    cpus: int
    boot: float                                  # model seconds of the current boot
    down: bool = False
    flags: Set[str] = field(default_factory=set)
    reason: Optional[str] = None
    reason_user: Optional[str] = None
    reason_time: Optional[float] = None
    alive: bool = True                           # the machine runs and its slurmd answers
    silent_since: Optional[float] = None         # when slurmctld stopped hearing from it
    register_at: Optional[float] = None          # resumed from DOWN: registers again then (BootTime None till)
    next_state: Optional[str] = None
    boot_req: Optional[float] = None
    issued_at: Optional[float] = None
    power_at: Optional[float] = None             # POWERING_DOWN / POWERING_UP ends then


@dataclass
class _Job:
    job_id: int
    name: str
    user: str
    nodes: List[str]
    num_nodes: int
    requeue: bool
    exclusive: bool
    comment: str
    partition: str
    gres: Tuple[str, ...]
    submit: float
    state: str = "RUNNING"
    reason: Optional[str] = None
    start: Optional[float] = None
    eligible: Optional[float] = None
    end: Optional[float] = None                  # COMPLETING until then
    final_state: str = "COMPLETED"               # what a COMPLETING job becomes
    restarts: int = 0
    steps: Dict[str, Step] = field(default_factory=dict)
    next_step: int = 0
    expedite: bool = False                       # sbatch --requeue=expedite (25.11+)
    no_kill: bool = False                        # sbatch --no-kill: a DOWN node leaves the job, the job runs on


@dataclass
class _Reservation:
    name: str
    nodes: List[str]
    flags: Set[str]
    users: Tuple[str, ...]
    start: float
    end: float


def _locked(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: SlurmModel, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper



def deepcheck_result(node: str, level: str, failed: Sequence[str] = (), errors: Sequence[str] = ()) -> StepResult:
    """What `hpresilience deepcheck --json` prints and exits with: every named check failed
    (or could not run), the others passed."""
    checks = [{"name": name, "status": "fail", "summary": f"{name} failed"} for name in failed]
    checks += [{"name": name, "status": "error", "summary": f"{name} timed out"} for name in errors]
    checks += [{"name": "gpu_count", "status": "pass", "summary": "8 GPUs"}]
    status = "fail" if failed else "error" if errors else "pass"
    report = {"node": node, "level": level, "status": status, "checks": checks, "duration_seconds": 1.0}
    return StepResult({"pass": 0, "fail": 1}.get(status, 2), json.dumps(report) + "\n")

class SlurmModel:
    """A fake Slurm 22.05 cluster. Test-side controls: `now`/`clock()`/`advance()`/`tick()`/`sleep()`,
    `as_user()`, `submit()`/`finish()`/`start_step()`, `kill()`/`revive()`/`power_on()`/`power_cycle()`,
    `hang_reboots`, `check`, `controller_down`, `reboot_program`; records in `writes` and `steps_run`."""

    def __init__(self, nodes: str = "n[1-4]", partitions: Sequence[str] = ("train",), gres: Sequence[str] = ("gpu:8",),
                 cpus: int = 4, user: str = "root", slurm_user: str = "slurm", slurmd_timeout: float = 300.0,
                 resume_timeout: float = 60.0, suspend_timeout: float = 30.0, reboot_seconds: float = 4.0,
                 register_seconds: float = 1.0, epilog_seconds: float = 0.0,
                 version: Tuple[int, int, int] = (22, 5, 8)):
        self.user = user                         # who the caller's scontrol runs as
        self.slurm_user_name = slurm_user        # SlurmUser: who Slurm's own reasons are written by
        self.slurmd_timeout = slurmd_timeout     # Slurm's defaults; the test cluster uses 6/60/5 s
        self.resume_timeout = resume_timeout
        self.suspend_timeout = suspend_timeout
        self.reboot_seconds = reboot_seconds     # RebootProgram/ResumeProgram to registration (test cluster: ~4 s)
        self.register_seconds = register_seconds
        self.epilog_seconds = epilog_seconds     # a finished job's nodes stay COMPLETING this long
        self.slurm_version = version
        self.check: Callable[[str], StepResult] = lambda node: StepResult(0, "healthy\n")
        # `hpresilience deepcheck --json --level L` on a node (issue 10): (node, level) -> its result.
        self.deepcheck: Callable[[str, str], StepResult] = lambda node, level: deepcheck_result(node, level)
        self.hang_reboots: Set[str] = set()      # nodes whose reboots and power-ups never come back
        self.controller_down = False             # slurmctld unreachable: every call raises SlurmUnavailable
        self.reboot_program = True               # RebootProgram configured
        self.shrinks_gres_jobs = True            # 22.05 shrinks a GRES job (verified, issue 11); False: refuses
        self.writes: List[Write] = []
        self.steps_run: List[StepRun] = []
        self._t = 0.0
        self._nodes: Dict[str, _Node] = {}
        self._jobs: Dict[int, _Job] = {}
        self._reservations: Dict[str, _Reservation] = {}
        self._next_job = 1000
        self._lock = threading.RLock()
        self.add_nodes(nodes, partitions, gres, cpus)

    # ------------------------------------------------------------ test-side controls
    def add_nodes(self, nodes: str, partitions: Sequence[str] = ("train",), gres: Sequence[str] = ("gpu:8",),
                  cpus: int = 4) -> None:
        """Configure more nodes (idle, booted an hour before the model's start)."""
        for name in expand(nodes):
            self._nodes[name] = _Node(name, tuple(partitions), tuple(gres), cpus, boot=-3600.0)

    def remove_nodes(self, nodes: str) -> None:
        """Take nodes out of the configuration (slurm.conf edited, slurmctld restarted)."""
        for name in expand(nodes):
            del self._nodes[name]

    @property
    def now(self) -> dt.datetime:
        return EPOCH + dt.timedelta(seconds=self._t)

    def clock(self) -> float:
        """The model's time as epoch seconds (a `time.time` for the code under test)."""
        return EPOCH.timestamp() + self._t

    @_locked
    def advance(self, seconds: float) -> None:
        """Let `seconds` pass; Slurm's timers fire in order, each at its own time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        target = self._t + seconds
        self._process()
        while True:
            due = [t for t in self._deadlines() if self._t < t <= target]  # what is due now was just done
            if not due:
                break
            self._t = max(self._t, min(due))
            self._process()
        self._t = target
        self._process()

    def tick(self) -> None:
        """One pass of slurmctld's background work (reboots issued, jobs started) without time passing."""
        self.advance(0.0)

    sleep = advance  # for code that takes a `sleep` callable (e.g. the power-save provider)

    @contextlib.contextmanager
    def as_user(self, user: str) -> Iterator[None]:
        saved, self.user = self.user, user
        try:
            yield
        finally:
            self.user = saved

    @_locked
    def submit(self, nodes: str, user: str = "alice", requeue: bool = False, exclusive: bool = True,
               comment: str = "", name: str = "job", partition: str = "train", gres: Sequence[str] = (),
               expedite: bool = False, no_kill: bool = False) -> int:
        """A batch job running on `nodes` now; ValueError if they could not take it (a test bug).
        expedite: `sbatch --requeue=expedite`, which only 25.11+ knows."""
        if expedite and self.slurm_version[:2] < (25, 11):
            raise ValueError("sbatch: --requeue takes no argument before Slurm 25.11")
        names = expand(nodes)
        unfit = [n for n in names if n not in self._nodes or not self._fits(self._nodes[n], exclusive)]
        if unfit:
            raise ValueError(f"cannot run a job on {fold(unfit)}: unknown, busy or out of service")
        job = _Job(self._next_job, name, user, sorted(names), len(names), requeue, exclusive, comment, partition,
                   tuple(gres), submit=self._t, start=self._t, eligible=self._t, expedite=expedite, no_kill=no_kill)
        self._jobs[job.job_id] = job
        self._next_job += 1
        return job.job_id

    @_locked
    def finish(self, job_id: int, state: str = "COMPLETED") -> None:
        """The job's script ends (COMPLETED, FAILED, ...); its nodes are COMPLETING for `epilog_seconds`."""
        job = self._jobs[job_id]
        if job.state != "RUNNING":
            raise ValueError(f"job {job_id} is {job.state}, not running")
        job.steps.clear()
        if self.epilog_seconds > 0:
            job.state, job.end, job.final_state = "COMPLETING", self._t + self.epilog_seconds, state
        else:
            job.state = state

    @_locked
    def start_step(self, job_id: int, nodes: Optional[str] = None, name: str = "",
                   srun_pid: Optional[int] = None) -> str:
        """A running job step (what srun inside the job starts); returns "JOB.N". srun_pid: the
        pid `scontrol show step` gives in SrunHost:Pid (None: not shown)."""
        job = self._jobs[job_id]
        if job.state != "RUNNING":
            raise ValueError(f"job {job_id} is {job.state}, not running")
        step_id = f"{job_id}.{job.next_step}"
        job.next_step += 1
        job.steps[step_id] = Step(step_id, "RUNNING", tuple(expand(nodes)) if nodes else tuple(job.nodes), name,
                                  srun_pid=srun_pid)
        return step_id

    @_locked
    def lose_node(self, node: str, step_of: Optional[int] = None) -> None:
        """One event: (a step of job `step_of` runs on the node and) the node dies and Slurm has
        already marked it DOWN, so no caller can see it NOT_RESPONDING in between."""
        if step_of is not None:
            self.start_step(step_of, fold(sorted(set(self._jobs[step_of].nodes))))
        self.kill(node)
        self.advance(self.slurmd_timeout + 1)
        self.tick()

    @_locked
    def kill(self, node: str) -> None:
        """The node dies (power loss, kernel panic): silent now, DOWN after SlurmdTimeout."""
        rec = self._nodes[node]
        if not rec.alive:
            return
        rec.alive = False
        if "REBOOT_ISSUED" not in rec.flags:  # slurmctld expects silence while a reboot it issued runs
            rec.flags.add("NOT_RESPONDING")
            rec.silent_since = self._t
        rec.register_at = None

    @_locked
    def revive(self, node: str) -> None:
        """Its slurmd answers again without a reboot (a network blip): ReturnToService=1 returns a node
        that was DOWN only for silence; any other DOWN stays."""
        rec = self._nodes[node]
        if rec.flags & {"POWERED_DOWN", "POWERING_DOWN", "POWERING_UP"}:
            raise ValueError(f"{node} is under power saving: use POWER_UP")
        rec.alive = True
        self._registered(rec)

    @_locked
    def power_on(self, node: str) -> None:
        """A dead node boots (BMC, a technician): a new BootTime. An issued reboot completes; otherwise
        Slurm finds it unexpectedly rebooted (docs/testcluster.md: "Nodes coming back")."""
        rec = self._nodes[node]
        if rec.alive or rec.flags & {"POWERED_DOWN", "POWERING_DOWN", "POWERING_UP"}:
            raise ValueError(f"{node} is running or under power saving: kill() it first, or use POWER_UP")
        rec.alive = True
        if "REBOOT_ISSUED" in rec.flags:
            self._reboot_done(rec)
            return
        rec.boot = self._t
        self._slurm_down(rec, "Node unexpectedly rebooted")
        self._registered(rec)

    def power_cycle(self, node: str, off_seconds: float = 3.0) -> None:
        """What the controller's out-of-band power cycle does (testcluster `_power_cycle`: off for 3 s)."""
        self.kill(node)
        self.advance(off_seconds)
        self.power_on(node)

    @_locked
    def node(self, name: str) -> Node:
        return self._show_node(self._nodes[name])

    @_locked
    def job(self, job_id: int) -> Job:
        return self._show_job(self._jobs[job_id])

    # ------------------------------------------------------------ SlurmBackend: reads
    @_locked
    def version(self) -> Tuple[int, int, int]:
        self._reachable(["scontrol", "--version"])
        return self.slurm_version

    @_locked
    def slurm_user(self) -> str:
        self._reachable(["scontrol", "show", "config"])
        return self.slurm_user_name

    @_locked
    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]:
        argv = ["scontrol", "-o", "show", "node"] + ([nodes] if nodes else [])
        self._reachable(argv)
        if nodes is None:
            return [self._show_node(n) for n in self._nodes.values()]
        found = [self._show_node(self._nodes[n]) for n in expand(nodes) if n in self._nodes]
        if not found:
            self._fail(argv, f"Node {nodes} not found", Target(node=nodes))
        return found

    @_locked
    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]:
        argv = ["scontrol", "-o", "show", "job"] + ([str(job_id)] if job_id is not None else [])
        self._reachable(argv)
        if job_id is None:
            return [self._show_job(j) for j in self._jobs.values()]
        return [self._show_job(self._get_job(job_id, argv))]

    @_locked
    def requeued_jobs(self) -> List[RequeuedJob]:
        """The backend's contract: requeued jobs (restarts >= 1) waiting for their BeginTime."""
        self._reachable(["squeue", "--states=PD"])
        return [RequeuedJob(j.job_id, j.restarts, j.comment, self._at(j.submit)) for j in self._jobs.values()
                if j.state == "PENDING" and j.reason == "BeginTime" and j.restarts >= 1]

    @_locked
    def job_comment(self, job_id: int) -> str:
        return self._get_job(job_id, ["squeue", f"--jobs={job_id}", "--Format=JobID:|,Comment:|"]).comment

    @_locked
    def expedited_requeue(self, job_id: int) -> bool:
        """`scontrol show job` says ExpeditedRequeue=Yes (only 25.11+ has the flag)."""
        return self._get_job(job_id, ["scontrol", "-o", "show", "job", str(job_id)]).expedite

    @_locked
    def show_steps(self, job_id: int) -> List[Step]:
        self._reachable(["scontrol", "-o", "show", "step", str(job_id)])
        job = self._jobs.get(int(job_id))
        return list(job.steps.values()) if job else []   # "Job step N. not found": the backend returns []

    @_locked
    def show_reservations(self) -> List[Reservation]:
        self._reachable(["scontrol", "-o", "show", "reservation"])
        return [Reservation(r.name, tuple(r.nodes), frozenset(r.flags), r.users, "ACTIVE", self._at(r.start),
                            self._at(r.end)) for r in self._reservations.values()]

    # ------------------------------------------------------------ SlurmBackend: node writes
    @_locked
    def update_nodes(self, nodes: str, state: str, reason: Optional[str]) -> None:
        argv = ["scontrol", "update", f"nodename={nodes}", f"state={state}"] + ([f"reason={reason}"] if reason else [])
        recs = self._node_args(nodes, argv)
        state = state.upper()
        apply = {"DRAIN": self._drain, "FAIL": self._drain, "DOWN": self._set_down, "RESUME": self._resume,
                 "POWER_DOWN_FORCE": self._power_down, "POWER_UP": self._power_up}.get(state)
        if apply is None:
            self._fail(argv, "slurm_update error: Invalid node state specified")
        if state in ("DRAIN", "FAIL", "DOWN") and not reason:
            # scontrol itself refuses before asking slurmctld
            self._fail(argv, "You must specify a reason when DOWNING or DRAINING a node. Request denied")
        refused = []
        for rec in recs:
            if apply(rec, state, reason) is False:
                refused.append(rec.name)
                continue
            fields = {"state": state, **({"reason": reason} if reason else {})}
            self.writes.append(Write(self.now, self.user, "update_node", rec.name, fields))
        if refused:  # slurmctld applies the rest, then reports the error (assumed, as update_node() loops)
            self._fail(argv, "slurm_update error: Invalid node state specified")

    def _drain(self, rec: _Node, state: str, reason: Optional[str]) -> None:
        # FAIL replaces DRAIN (sinfo shows "fail"); DRAIN on a FAIL node keeps FAIL (assumed from update_node()).
        if state == "FAIL":
            rec.flags.discard("DRAIN")
        rec.flags.add(state)
        self._set_reason(rec, reason, self.user)

    def _set_down(self, rec: _Node, state: str, reason: Optional[str]) -> None:
        rec.down = True
        self._set_reason(rec, reason, self.user)
        self._kill_jobs(rec)

    def _resume(self, rec: _Node, state: str, reason: Optional[str]) -> Optional[bool]:
        if not (rec.down or rec.flags & {"DRAIN", "FAIL", "REBOOT_REQUESTED", "REBOOT_ISSUED"}):
            return False  # "Invalid node state specified": nothing to resume (assumed, update_node() on 22.05)
        rec.flags -= {"DRAIN", "FAIL"}
        self._set_reason(rec, None, None)
        if rec.down:
            # Measured: IDLE+NOT_RESPONDING with BootTime=None until slurmd registers again.
            rec.down = False
            rec.flags.add("NOT_RESPONDING")
            if rec.alive:
                rec.register_at = self._t + self.register_seconds
            else:
                rec.silent_since = self._t
        return None

    def _power_down(self, rec: _Node, state: str, reason: Optional[str]) -> None:
        if rec.flags & {"POWERED_DOWN", "POWERING_DOWN"}:
            return
        self._kill_jobs(rec)
        rec.flags -= {"REBOOT_REQUESTED", "REBOOT_ISSUED", "POWERING_UP"}
        rec.flags.add("POWERING_DOWN")
        rec.power_at = self._t + self.suspend_timeout
        if reason:
            self._set_reason(rec, reason, self.user)

    def _power_up(self, rec: _Node, state: str, reason: Optional[str]) -> None:
        if "POWERED_DOWN" not in rec.flags:
            return  # already up or on its way (assumed: accepted, nothing to do)
        rec.flags.discard("POWERED_DOWN")
        rec.flags.add("POWERING_UP")
        rec.power_at = self._t + (self.resume_timeout if rec.name in self.hang_reboots else self.reboot_seconds)

    @_locked
    def reboot_nodes(self, nodes: str, asap: bool, next_state: Optional[str], reason: Optional[str]) -> None:
        argv = ["scontrol", "reboot"] + (["ASAP"] if asap else []) + ([f"nextstate={next_state}"] if next_state else [])
        argv += ([f"reason={reason}"] if reason else []) + [nodes]
        recs = self._node_args(nodes, argv)
        if next_state and next_state.upper() not in ("RESUME", "DOWN"):
            self._fail(argv, f"Invalid nextstate: {next_state}")
        if not self.reboot_program:
            self._fail(argv, "Reboot request failed: RebootProgram isn't defined in config")
        for rec in recs:
            if rec.flags & {"POWERED_DOWN", "POWERING_DOWN"}:
                continue  # slurmctld skips powered-down nodes
            if "REBOOT_ISSUED" not in rec.flags:
                rec.flags.add("REBOOT_REQUESTED")
                rec.boot_req = self._t
            rec.next_state = next_state.upper() if next_state else None
            if asap:
                rec.flags.add("DRAIN")
            # man scontrol: reason= sets the reason; ASAP without one: "Reboot ASAP"; else "reboot requested".
            if reason:
                self._set_reason(rec, reason, self.user)
            elif not rec.reason:
                self._set_reason(rec, "Reboot ASAP" if asap else "reboot requested", self.user)
            fields = {"asap": str(asap), "nextstate": rec.next_state or "", **({"reason": reason} if reason else {})}
            self.writes.append(Write(self.now, self.user, "reboot", rec.name, fields))

    # ------------------------------------------------------------ SlurmBackend: job writes
    @_locked
    def requeue_job(self, job_id: int) -> None:
        argv = ["scontrol", "requeue", str(job_id)]
        job = self._get_job(job_id, argv)
        if job.state == "PENDING":
            self._fail(argv, "Job is pending execution", Target(job=str(job_id)))
        if not job.requeue:  # assumed: 22.05 refuses an admin requeue of a --no-requeue job (ESLURM_DISABLED)
            self._fail(argv, "Requested operation is presently disabled", Target(job=str(job_id)))
        self.writes.append(Write(self.now, self.user, "requeue", str(job_id)))
        self._requeue(job)

    @_locked
    def update_job(self, job_id: int, fields: List[Tuple[str, str]]) -> None:
        argv = ["scontrol", "update", f"jobid={job_id}", *(f"{k}={v}" for k, v in fields)]
        job = self._get_job(job_id, argv)
        if job.no_kill and any(set(step.nodes) - set(job.nodes) for step in job.steps.values()):
            # measured on 22.05: a --no-kill job holding a ghost step refuses every update (issue 11)
            self._fail(argv, f"Unexpected message received for job {job_id}", Target(job=str(job_id)))
        for key, value in fields:
            self._check_job_field(job, key, value, argv)
        for key, value in fields:
            if key == "NodeList":
                job.nodes = sorted(expand(value))
                job.num_nodes = len(job.nodes)
            elif key == "StartTime":
                job.eligible = self._parse_time(value)
            else:
                job.comment = value
        self.writes.append(Write(self.now, self.user, "update_job", str(job_id), dict(fields)))

    def _check_job_field(self, job: _Job, key: str, value: str, argv: List[str]) -> None:
        target = Target(job=str(job.job_id))
        if key == "NodeList":
            # 22.05 shrinks a running job to a subset of its nodes (BRIEF §3)
            if job.state != "RUNNING":
                self._fail(argv, "Job is no longer pending execution", target)
            names = expand(value)
            if not names or not set(names) <= set(job.nodes):
                self._fail(argv, "Requested node configuration is not available", target)
            if job.gres and not self.shrinks_gres_jobs:   # assumed wording of a Slurm that refuses
                self._fail(argv, "Job resizing is not supported for jobs with GRES", target)
        elif key == "StartTime":
            if job.state != "PENDING":
                self._fail(argv, "Job is no longer pending execution", target)
            self._parse_time(value)
        elif key != "Comment":
            self._fail(argv, "Update of this parameter is not supported", target)

    def _parse_time(self, value: str) -> float:
        if value.lower() == "now":
            return self._t
        try:
            when = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").astimezone()  # local time, as Slurm reads it
        except ValueError:
            self._fail(["scontrol", "update", f"StartTime={value}"], "Invalid time specification")
        return (when - EPOCH).total_seconds()

    @_locked
    def signal_step(self, step_id: str, signal_name: str) -> None:
        argv = ["scancel", f"--signal={signal_name}", step_id]
        self._reachable(argv)
        job = self._jobs.get(int(step_id.split(".")[0])) if step_id.split(".")[0].isdigit() else None
        if job is None or step_id not in job.steps:
            self._fail(argv, f"scancel: error: Kill job error on job id {step_id}: Invalid job id specified",
                       Target(job=step_id))
        self.writes.append(Write(self.now, self.user, "signal_step", step_id, {"signal": signal_name}))
        if job.no_kill and set(job.steps[step_id].nodes) - set(job.nodes):
            return   # the ghost of a --no-kill job's dead node: scancel says nothing, the step stays
        if signal_name.upper().removeprefix("SIG") in ("KILL", "TERM", "INT"):
            del job.steps[step_id]

    # ------------------------------------------------------------ SlurmBackend: reservations
    @_locked
    def create_reservation(self, fields: List[Tuple[str, str]]) -> None:
        argv = ["scontrol", "create", "reservation", *(f"{k}={v}" for k, v in fields)]
        self._reachable(argv)
        given = dict(fields)
        name = given.get("ReservationName", "")
        if not name or name in self._reservations:
            self._fail(argv, "Error creating the reservation: Duplicate reservation name")
        nodes = self._reservation_nodes(given.get("Nodes", ""), argv, "creating")
        start = self._parse_time(given.get("StartTime", "now"))
        duration = given.get("Duration", "UNLIMITED")
        end = start + (UNLIMITED_SECONDS if duration.upper() == "UNLIMITED" else float(duration) * 60)
        flags = {f.upper() for f in given.get("Flags", "").split(",") if f}
        users = tuple(u for u in given.get("Users", "").split(",") if u)
        self._reservations[name] = _Reservation(name, nodes, flags, users, start, end)
        self.writes.append(Write(self.now, self.user, "create_reservation", name, dict(fields)))

    @_locked
    def update_reservation(self, name: str, fields: List[Tuple[str, str]]) -> None:
        argv = ["scontrol", "update", f"reservationname={name}", *(f"{k}={v}" for k, v in fields)]
        self._reachable(argv)
        res = self._reservations.get(name)
        if res is None:
            self._fail(argv, "Error updating the reservation: Invalid reservation name specified")
        for key, value in fields:
            if key != "Nodes":
                self._fail(argv, "Error updating the reservation: Update of this parameter is not supported")
            res.nodes = self._reservation_nodes(value, argv, "updating")
        self.writes.append(Write(self.now, self.user, "update_reservation", name, dict(fields)))

    @_locked
    def delete_reservation(self, name: str) -> None:
        argv = ["scontrol", "delete", f"reservationname={name}"]
        self._reachable(argv)
        if self._reservations.pop(name, None) is None:
            self._fail(argv, "Error deleting the reservation: Invalid reservation name specified")
        self.writes.append(Write(self.now, self.user, "delete_reservation", name))

    def _reservation_nodes(self, text: str, argv: List[str], doing: str) -> List[str]:
        names = expand(text) if text else []
        if not names or any(n not in self._nodes for n in names):
            self._fail(argv, f"Error {doing} the reservation: Invalid node name specified")
        return sorted(names)

    # ------------------------------------------------------------ SlurmBackend: srun
    @_locked
    def run_step(self, srun_argv: Sequence[str], timeout: float) -> StepResult:
        self._reachable(list(srun_argv))
        argv = list(srun_argv)
        node = argv[argv.index("-w") + 1] if "-w" in argv else ""
        reservation = next((a.split("=", 1)[1] for a in argv if a.startswith("--reservation=")), None)
        self.steps_run.append(StepRun(self.now, node, tuple(argv), reservation, timeout))
        if node not in self._nodes:
            return StepResult(1, "srun: error: Unable to allocate resources: Invalid node name specified\n")
        if reservation is not None and reservation not in self._reservations:
            return StepResult(1, "srun: error: Unable to allocate resources: Requested reservation is invalid\n")
        rec = self._nodes[node]
        if rec.register_at is not None:  # srun waits in the queue while the node registers
            self.advance(max(0.0, rec.register_at - self._t))
        if not self._step_fits(rec, reservation):
            self.advance(timeout)  # srun sits "queued and waiting for resources" until it is killed
            return StepResult(None, "srun: job queued and waiting for resources\n")
        if "deepcheck" in argv:
            level = argv[argv.index("--level") + 1] if "--level" in argv else "standard"
            result = self.deepcheck(node, level)
        else:
            result = self.check(node)
        if result.returncode is None:
            self.advance(timeout)
            return result
        if result.returncode != 0:
            return StepResult(result.returncode, f"{result.output}srun: error: {node}: task 0: Exited with exit code "
                                                 f"{result.returncode}\n")
        return result

    def _step_fits(self, rec: _Node, reservation: Optional[str]) -> bool:
        holders = {r.name for r in self._reservations.values() if rec.name in r.nodes}
        if holders and reservation not in holders:
            return False
        if reservation is not None and rec.name not in self._reservations[reservation].nodes:
            return False
        return self._fits(rec, exclusive=False)

    # ------------------------------------------------------------ what Slurm does by itself
    def _deadlines(self) -> List[float]:
        times = []
        for rec in self._nodes.values():
            times += [t for t in (rec.register_at, rec.power_at) if t is not None]
            if rec.silent_since is not None and not rec.down:
                times.append(rec.silent_since + self.slurmd_timeout)
            if rec.issued_at is not None:
                hung = rec.name in self.hang_reboots or not rec.alive
                times.append(rec.issued_at + (self.resume_timeout if hung else self.reboot_seconds))
        for job in self._jobs.values():
            if job.state == "COMPLETING":
                times.append(job.end)
            elif job.state == "PENDING":
                times.append(job.eligible)
        return times

    def _process(self) -> None:
        """slurmctld's background work, due now: epilogs, node timers, reboots, scheduling. Only
        advance()/tick() run it, so a reboot asked for is seen REBOOT_REQUESTED until the next tick."""
        for job in self._jobs.values():
            if job.state == "COMPLETING" and job.end <= self._t:
                job.state, job.end = job.final_state, None
        for rec in self._nodes.values():
            self._node_timers(rec)
        for rec in self._nodes.values():
            if "REBOOT_REQUESTED" in rec.flags and rec.alive and not self._jobs_on(rec, active=True):
                self._issue_reboot(rec)
        self._schedule()

    def _node_timers(self, rec: _Node) -> None:
        if rec.register_at is not None and rec.register_at <= self._t:
            self._registered(rec)
        if rec.silent_since is not None and not rec.down and rec.silent_since + self.slurmd_timeout <= self._t:
            self._slurm_down(rec, NOT_RESPONDING)
        if rec.power_at is not None and rec.power_at <= self._t:
            self._power_timer(rec)
        if rec.issued_at is not None:
            hung = rec.name in self.hang_reboots or not rec.alive
            if not hung and rec.issued_at + self.reboot_seconds <= self._t:
                self._reboot_done(rec)
            elif hung and rec.issued_at + self.resume_timeout <= self._t:
                rec.alive, rec.issued_at, rec.next_state = False, None, None
                rec.flags -= {"REBOOT_ISSUED", "REBOOT_REQUESTED"}
                rec.flags.add("NOT_RESPONDING")
                # man scontrol: "reboot timed out" is appended; assumed written as SlurmUser at that time.
                self._slurm_down(rec, f"{rec.reason} : reboot timed out" if rec.reason else "reboot timed out",
                                 overwrite=True)

    def _issue_reboot(self, rec: _Node) -> None:
        rec.flags.discard("REBOOT_REQUESTED")
        rec.flags.add("REBOOT_ISSUED")
        rec.issued_at = self._t
        if rec.reason and "reboot issued" not in rec.reason:
            rec.reason += " : reboot issued"   # measured: "Action: Reboot : reboot issued"; writer and time kept
        self._slurm_write(rec.name, {"state": "REBOOT_ISSUED"})

    def _reboot_done(self, rec: _Node) -> None:
        """The node registers with a BootTime after the request (docs/testcluster.md, the reboot table)."""
        rec.boot = self._t   # after the request by reboot_seconds (the controller wants > 2 s: keep it above)
        rec.flags -= {"REBOOT_ISSUED", "REBOOT_REQUESTED", "NOT_RESPONDING"}
        rec.alive, rec.issued_at, rec.boot_req, rec.silent_since = True, None, None, None
        if rec.next_state == "DOWN":
            rec.down = True
            rec.flags.discard("DRAIN")
            if rec.reason:
                rec.reason += " : reboot complete"
        else:  # RESUME, or none given: DRAIN and the reason go, FAIL (and its reason) stays
            rec.down = False
            rec.flags.discard("DRAIN")
            if "FAIL" not in rec.flags:
                self._set_reason(rec, None, None)
        rec.next_state = None
        self._slurm_write(rec.name, {"state": self._show_node(rec).state_text, "reason": rec.reason or ""})

    def _power_timer(self, rec: _Node) -> None:
        rec.power_at = None
        if "POWERING_DOWN" in rec.flags:
            rec.flags -= {"POWERING_DOWN", "NOT_RESPONDING"}
            rec.flags.add("POWERED_DOWN")
            rec.alive, rec.down, rec.silent_since = False, False, None   # "reset the node to IDLE" (man scontrol)
            self._slurm_write(rec.name, {"state": "POWERED_DOWN"})
        elif rec.name in self.hang_reboots:
            rec.flags.discard("POWERING_UP")
            rec.flags.add("NOT_RESPONDING")
            self._slurm_down(rec, "ResumeTimeout reached")
        else:  # a fresh instance registers: DRAIN/FAIL kept, reason cleared (measured, docs/controller.md)
            rec.flags -= {"POWERING_UP", "NOT_RESPONDING"}
            rec.alive, rec.boot, rec.down = True, self._t, False
            self._set_reason(rec, None, None)
            # The reason is gone, whoever wrote it: recorded, so checkers see Slurm cleared it.
            self._slurm_write(rec.name, {"state": self._show_node(rec).state_text, "reason": ""})

    def _registered(self, rec: _Node) -> None:
        """slurmd (re)registers with its current boot."""
        rec.register_at, rec.silent_since = None, None
        rec.flags.discard("NOT_RESPONDING")
        if rec.down and rec.reason == NOT_RESPONDING and rec.reason_user == self.slurm_user_name:
            rec.down = False  # ReturnToService=1: down only for silence, so back
            self._set_reason(rec, None, None)
            self._slurm_write(rec.name, {"state": "IDLE", "reason": ""})

    def _slurm_down(self, rec: _Node, reason: str, overwrite: bool = False) -> None:
        rec.down = True
        self._kill_jobs(rec)
        if overwrite:
            self._set_reason(rec, reason, self.slurm_user_name)
        else:
            self._slurm_reason(rec, reason)
        self._slurm_write(rec.name, {"state": "DOWN", "reason": rec.reason or ""})

    def _slurm_reason(self, rec: _Node, reason: str) -> None:
        # set_node_down_ptr() writes its reason only over none or one that starts with "Not responding",
        # whoever wrote it: measured on 22.05, an admin's "Not responding - DO NOT POWER CYCLE" set before
        # the node went DOWN became Slurm's "Not responding"; set after, it stays. An Action: reason
        # survives (docs/testcluster.md).
        if not rec.reason or rec.reason.startswith(NOT_RESPONDING):
            self._set_reason(rec, reason, self.slurm_user_name)

    def _kill_jobs(self, rec: _Node) -> None:
        for job in self._jobs_on(rec, active=False):  # a COMPLETING job is done already
            if job.no_kill:
                # Measured on 22.05 (issue 11): the node leaves the job, which runs on; a step that had
                # the node stays RUNNING on it for good (a ghost no signal removes, see signal_step).
                job.nodes = [n for n in job.nodes if n != rec.name]
                job.num_nodes = len(job.nodes)
                continue
            if job.requeue:
                self._requeue(job)
            else:
                job.state, job.steps, job.end = "NODE_FAIL", {}, None
            self._slurm_write(str(job.job_id), {"job_state": job.state})

    def _requeue(self, job: _Job) -> None:
        job.state, job.reason, job.steps, job.end = "PENDING", "BeginTime", {}, None
        job.nodes, job.start, job.submit = [], None, self._t   # 22.05 resets SubmitTime at a requeue
        job.restarts += 1
        job.eligible = self._t + REQUEUE_DELAY_SECONDS
        if job.expedite:  # 25.11 batch_requeue_fini(): BeginTime 0, eligible at once (read, not run)
            job.reason, job.eligible = None, self._t

    def _schedule(self) -> None:
        """Start eligible pending jobs on the first free nodes by name; else they wait for Resources."""
        for job in sorted(self._jobs.values(), key=lambda j: j.job_id):
            if job.state != "PENDING" or job.eligible > self._t:
                continue
            free = sorted(r.name for r in self._nodes.values() if self._fits(r, job.exclusive)
                          and not any(r.name in res.nodes for res in self._reservations.values()))
            if len(free) < job.num_nodes:
                job.reason = "Resources"
                continue
            job.nodes, job.state, job.reason, job.start = free[:job.num_nodes], "RUNNING", None, self._t

    # ------------------------------------------------------------ helpers
    def _fits(self, rec: _Node, exclusive: bool) -> bool:
        if rec.down or not rec.alive or rec.register_at is not None or rec.flags & BAD_FOR_JOBS:
            return False
        jobs = self._jobs_on(rec, active=True)
        return not jobs if exclusive else not any(j.exclusive for j in jobs)

    def _jobs_on(self, rec: _Node, active: bool) -> List[_Job]:
        states = ("RUNNING", "COMPLETING") if active else ("RUNNING",)
        return [j for j in self._jobs.values() if j.state in states and rec.name in j.nodes]

    def _set_reason(self, rec: _Node, reason: Optional[str], user: Optional[str]) -> None:
        rec.reason = reason or None
        rec.reason_user = user if reason else None
        rec.reason_time = self._t if reason else None

    def _slurm_write(self, target: str, fields: Dict[str, str]) -> None:
        self.writes.append(Write(self.now, self.slurm_user_name, "slurm", target, fields))

    def _at(self, t: Optional[float]) -> Optional[dt.datetime]:
        """Slurm prints whole seconds: so does the model."""
        return None if t is None else (EPOCH + dt.timedelta(seconds=t)).replace(microsecond=0)

    def _show_node(self, rec: _Node) -> Node:
        flags = set(rec.flags)
        running = self._jobs_on(rec, active=False)
        if any(j.state == "COMPLETING" for j in self._jobs_on(rec, active=True)):
            flags.add("COMPLETING")
        for res in self._reservations.values():
            if rec.name in res.nodes:
                flags |= {"RESERVED", "MAINTENANCE"} if "MAINT" in res.flags else {"RESERVED"}
        state = "DOWN" if rec.down else ("IDLE" if not running else
                                         "ALLOCATED" if any(j.exclusive for j in running) else "MIXED")
        boot = None if rec.register_at is not None else self._at(rec.boot)
        return Node(rec.name, state, frozenset(flags), rec.reason, rec.reason_user, self._at(rec.reason_time),
                    address=rec.name, hostname=rec.name, boot_time=boot, slurmd_start_time=boot,
                    next_state=rec.next_state, partitions=rec.partitions, gres=rec.gres, cpus=rec.cpus,
                    version=".".join(map(str, self.slurm_version)))

    def _show_job(self, job: _Job) -> Job:
        return Job(job.job_id, job.name, job.state, job.reason, job.user, job.partition, tuple(job.nodes),
                   fold(job.nodes) if job.nodes else "", batch_host=job.nodes[0] if job.nodes else None, batch=True,
                   num_nodes=job.num_nodes, exclusive=job.exclusive, requeue=job.requeue, restart_count=job.restarts,
                   gres=job.gres, submit_time=self._at(job.submit), start_time=self._at(job.start),
                   eligible_time=self._at(job.eligible), extra={"Comment": job.comment})

    def _reachable(self, argv: List[str]) -> None:
        if self.controller_down:
            self._fail(argv, "Unable to contact slurm controller (connect failure)")

    def _fail(self, argv: List[str], stderr: str, target: Optional[Target] = None) -> NoReturn:
        raise classify(argv, 1, stderr, target or Target())   # the real backend's classification of the real message

    def _node_args(self, nodes: str, argv: List[str]) -> List[_Node]:
        self._reachable(argv)
        names = expand(nodes)
        if any(n not in self._nodes for n in names):
            self._fail(argv, "slurm_update error: Invalid node name specified", Target(node=nodes))
        return [self._nodes[n] for n in names]

    def _get_job(self, job_id: int, argv: List[str]) -> _Job:
        self._reachable(argv)
        job = self._jobs.get(int(job_id))
        if job is None:
            self._fail(argv, "slurm_load_jobs error: Invalid job id specified", Target(job=str(job_id)))
        return job
