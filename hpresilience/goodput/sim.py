"""A seeded discrete-event simulation of one training run under failures (issue 13).

Event-driven over failure arrivals, not stepped per GPU-hour: interruptions arrive in wall-clock
time as a Poisson process at the table's total rate for the job's GPUs, the cause drawn by its
weight. Between two arrivals the run's time is split analytically into training segments of
`interval` seconds, each followed by a checkpoint of `checkpoint_cost` seconds. A work-losing
interruption throws away the training (and any checkpoint) since the last completed checkpoint;
the job is then down for the remedy's resume time plus the restart cost (loading the checkpoint),
counted from the fault. A failure during that recovery starts the recovery over from the new fault
(Daly's model). Nodes taken out by replace/reboot stay out for the remedy's repair time; when
more are out than there are spares, the job waits for one to come back before it starts.
"""
from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Protocol, Tuple

from .rates import RateTable


@dataclass(frozen=True)
class RemedyTimes:
    """Seconds counted from the fault, as a drill measures them (docs/goodput.md)."""
    detect: float   # -> the node is flagged (reported; part of resume)
    resume: float   # -> the job is relaunched on healthy nodes, before it loads its checkpoint
    repair: float   # -> the node is back in service; 0: no node leaves service

    @property
    def takes_node(self) -> bool:
        return self.repair > 0


# An automated set-up at 16k GPUs (hpresilience's agent, controller and srun --auto-resume);
# docs/goodput.md gives the reasoning for each number. A drill report or --detect/--resume/--repair
# replace the replace and reboot times: those remedies are what the drill measures.
DEFAULT_REMEDIES: Mapping[str, RemedyTimes] = {
    "replace": RemedyTimes(detect=30.0, resume=180.0, repair=3 * 86400.0),
    "reboot": RemedyTimes(detect=30.0, resume=180.0, repair=1800.0),
    "restart": RemedyTimes(detect=300.0, resume=420.0, repair=0.0),
    "planned": RemedyTimes(detect=0.0, resume=120.0, repair=0.0),
}
DRILLED_REMEDIES = ("replace", "reboot")
DEFAULT_CHECKPOINT_COST = 10.0    # the blocking part of an asynchronous checkpoint
DEFAULT_RESTART_COST = 120.0      # checkpoint load and communicator set-up at 16k GPUs


@dataclass(frozen=True)
class RunSetup:
    gpus: int
    gpus_per_node: int
    interval: float            # seconds of training between checkpoints
    checkpoint_cost: float     # seconds the training stops for each checkpoint
    restart_cost: float        # seconds from relaunch to training again: checkpoint load, start-up
    remedies: Mapping[str, RemedyTimes]
    spares: int
    budget: Optional[float] = None        # wall-clock seconds simulated, or ...
    work_target: Optional[float] = None   # ... run until this many seconds of training are saved

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.work_target is None):
            raise ValueError("give exactly one of budget and work_target")

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    def relaunch(self, remedy: str) -> float:
        """Fault to the job relaunched. A planned stop takes a checkpoint first instead of losing work."""
        extra = self.checkpoint_cost if remedy == "planned" else 0.0
        return extra + self.remedies[remedy].resume

    def downtime(self, remedy: str) -> float:
        """Fault to training again, when spares are enough."""
        return self.relaunch(remedy) + self.restart_cost


class Failures(Protocol):
    def __getitem__(self, i: int) -> Tuple[float, str, str]:
        """The i-th failure in time order: (time, cause, remedy); time infinite past the last."""


class Arrivals:
    """The failure arrivals of one seeded run, generated on demand and kept, so every checkpoint
    interval tried is judged against the same failures (common random numbers)."""

    def __init__(self, table: RateTable, gpus: int, seed: int, run: int):
        self._rng = random.Random(f"hpresilience-goodput:{seed}:{run}")
        self._rate = table.rate(gpus)
        self._names = [c.name for c in table.causes]
        self._remedies = [c.remedy for c in table.causes]
        total = 0.0
        self._cum: List[float] = []
        for cause in table.causes:
            total += cause.rate_per_gpu_hour
            self._cum.append(total)
        self._events: List[Tuple[float, int]] = []

    def __getitem__(self, i: int) -> Tuple[float, str, str]:
        """The i-th arrival: (time, cause, remedy); time is infinite when the table has no failures."""
        if self._rate == 0:
            return math.inf, "", ""
        while len(self._events) <= i:
            last = self._events[-1][0] if self._events else 0.0
            when = last + self._rng.expovariate(self._rate)
            which = bisect.bisect_right(self._cum, self._rng.random() * self._cum[-1])
            self._events.append((when, min(which, len(self._cum) - 1)))
        when, which = self._events[i]
        return when, self._names[which], self._remedies[which]

    def until(self, end: float) -> List[Tuple[float, str, str]]:
        out = []
        i = 0
        while self[i][0] < end:
            out.append(self[i])
            i += 1
        return out


@dataclass
class RunResult:
    wall: float = 0.0
    useful: float = 0.0          # training kept: saved by a checkpoint, or in progress at the end
    checkpoint: float = 0.0      # time spent writing checkpoints that was not lost
    waiting: float = 0.0         # ready to run but more nodes out than spares
    redone: Dict[str, float] = field(default_factory=dict)   # training (and checkpoint) lost, by cause
    down: Dict[str, float] = field(default_factory=dict)     # fault to training again, by cause
    interruptions: Dict[str, int] = field(default_factory=dict)

    @property
    def goodput(self) -> float:
        return self.useful / self.wall if self.wall else 1.0

    def add(self, table: Dict[str, float], cause: str, seconds: float) -> None:
        table[cause] = table.get(cause, 0.0) + seconds


def _segments(span: float, setup: RunSetup) -> Tuple[float, float, float]:
    """(training saved, checkpoint time, remainder) of `span` seconds of running from a fresh start.

    >>> s = RunSetup(8, 8, 100.0, 10.0, 0.0, {}, 0, budget=1.0)
    >>> _segments(250.0, s)
    (200.0, 20.0, 30.0)
    """
    period = setup.interval + setup.checkpoint_cost
    k = math.floor(span / period)
    return k * setup.interval, k * setup.checkpoint_cost, span - k * period


def _time_to_save(work: float, setup: RunSetup) -> float:
    """Running time that trains and checkpoints `work` more seconds of training."""
    n = math.ceil(work / setup.interval)
    return work + n * setup.checkpoint_cost


RUNNING, RECOVERING, WAITING, RESTARTING = "running", "recovering", "waiting", "restarting"


class _Run:
    """One run's state machine. After a fault the job is recovering (until it can be relaunched),
    then waiting (while more nodes are out than there are spares), then restarting (loading its
    checkpoint), then running again. Each phase's time is accounted when the phase ends."""

    def __init__(self, setup: RunSetup):
        self.setup = setup
        self.result = RunResult()
        self.end = setup.budget if setup.budget is not None else math.inf
        self.saved = 0.0
        self.phase = RUNNING
        self.since = 0.0      # the phase began
        self.until = 0.0      # recovering or restarting: the phase ends
        self.cause = ""       # the fault being recovered from
        self.out: List[float] = []   # heap: when each node out of service returns

    def clip(self, t: float) -> float:
        return min(t, self.end)

    def _down(self, until: float) -> None:
        self.result.add(self.result.down, self.cause, self.clip(until) - self.clip(self.since))

    def _capacity(self, before: float) -> Optional[float]:
        """The first time from `since` on when no more nodes are out than spares, if before `before`."""
        t = self.since
        while self.out and self.out[0] <= t:
            heapq.heappop(self.out)
        while len(self.out) > self.setup.spares:
            if self.out[0] >= before:
                return None
            t = heapq.heappop(self.out)
            while self.out and self.out[0] <= t:
                heapq.heappop(self.out)
        return t

    def advance(self, before: float) -> None:
        """Move a down job through its phases up to `before`."""
        while self.phase != RUNNING:
            if self.phase == WAITING:
                ready = self._capacity(before)
                self.result.waiting += self.clip(before if ready is None else ready) - self.clip(self.since)
                if ready is None:
                    self.since = before
                    return
                self.phase, self.since, self.until = RESTARTING, ready, ready + self.setup.restart_cost
                continue
            if self.until >= before:
                return
            self._down(self.until)
            self.phase, self.since = (WAITING if self.phase == RECOVERING else RUNNING), self.until

    def finish_work(self, before: float) -> bool:
        """In a work-target run: whether the target is saved before `before` (and account it)."""
        if self.setup.work_target is None or self.phase != RUNNING:
            return False
        left = self.setup.work_target - self.saved
        needed = _time_to_save(left, self.setup)
        if self.since + needed > before:
            return False
        self.result.useful += left
        self.result.checkpoint += needed - left
        self.result.wall = self.since + needed
        return True

    def _stop(self, t: float, keep_progress: bool, cause: str) -> None:
        """The running job stops at `t`: account its time since it started."""
        saved, ckpt, rest = _segments(self.clip(t) - self.since, self.setup)
        if keep_progress:  # the end of the budget, or a planned stop behind a checkpoint
            progress = min(rest, self.setup.interval)
            saved, ckpt = saved + progress, ckpt + rest - progress
        else:
            self.result.add(self.result.redone, cause, rest)
        self.saved += saved
        self.result.useful += saved
        self.result.checkpoint += ckpt

    def fail(self, t: float, cause: str, remedy: str) -> None:
        r = self.result
        r.interruptions[cause] = r.interruptions.get(cause, 0) + 1
        relaunch = t + self.setup.relaunch(remedy)
        if self.phase == RUNNING:
            self._stop(t, keep_progress=remedy == "planned", cause=cause)
            self.phase, self.since, self.until, self.cause = RECOVERING, t, relaunch, cause
        elif self.phase == RESTARTING or (self.phase == RECOVERING and relaunch > self.until):
            self._down(t)  # a fault during recovery starts it over (Daly's model)
            self.phase, self.since, self.until, self.cause = RECOVERING, t, relaunch, cause
        # While the job waits for nodes, or when the recovery under way outlasts this fault's own,
        # the fault only takes its node out.
        times = self.setup.remedies[remedy]
        if times.takes_node:
            heapq.heappush(self.out, t + times.repair)

    def close(self) -> RunResult:
        self.advance(self.end)
        if self.phase == RUNNING:
            self._stop(self.end, keep_progress=True, cause="")
        elif self.phase != WAITING:
            self._down(self.end)
        self.result.wall = self.end
        return self.result


def simulate(setup: RunSetup, arrivals: Failures) -> RunResult:
    """One run: the time split into training kept, checkpoints, work redone, down time and waiting."""
    run = _Run(setup)
    i = 0
    while True:
        t, cause, remedy = arrivals[i]
        horizon = run.clip(t)
        run.advance(horizon)
        if run.finish_work(horizon):
            return run.result
        if t >= run.end:
            return run.close()
        run.fail(t, cause, remedy)
        i += 1
