"""The checkpoint interval that maximises goodput, the classic formulas, and the spare count (issue 13).

Young (1974): tau = sqrt(2 * C * M). Daly (2006), the higher-order estimate:
tau = sqrt(2CM) * (1 + sqrt(C/2M)/3 + (C/2M)/9) - C for C < 2M, else M, where C is the
checkpoint cost and M the mean time between work-losing interruptions. Daly's model also gives
the expected wall-clock per unit of training, used here as an analytic cross-check of the simulation.
Spares: nodes out of service at once form an M/G/infinity queue (Poisson arrivals, any repair-time
distribution), so their number at a random time is Poisson with mean sum(rate * repair time).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .rates import RateTable
from .sim import Arrivals, RunResult, RunSetup, simulate

GRID_POINTS = 25          # log-spaced intervals tried, from Daly's / SPAN to Daly's * SPAN ...
GRID_SPAN = 5.0
GOLDEN_STEPS = 20         # ... then a golden-section search between the best one's neighbours
GOLDEN = (math.sqrt(5) - 1) / 2


def young(checkpoint_cost: float, mtbf: float) -> float:
    """Young 1974.

    >>> young(10.0, 10000.0)
    447.21359549995793
    """
    return math.sqrt(2 * checkpoint_cost * mtbf)


def daly(checkpoint_cost: float, mtbf: float) -> float:
    """Daly 2006, eq. 37: Young's interval with higher-order terms, less the checkpoint itself.

    >>> round(daly(600.0, 10800.0), 1)
    3211.1
    """
    if checkpoint_cost >= 2 * mtbf:
        return mtbf
    x = checkpoint_cost / (2 * mtbf)
    return young(checkpoint_cost, mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - checkpoint_cost


def mtbf(setup: RunSetup, table: RateTable) -> float:
    """Mean seconds between work-losing interruptions (planned stops checkpoint first); inf if none."""
    rate = table.rate(setup.gpus, lossy_only=True)
    return 1 / rate if rate else math.inf


def _mean_downtime(setup: RunSetup, table: RateTable, planned: bool) -> float:
    causes = [c for c in table.causes if (c.remedy == "planned") == planned]
    weight = sum(c.rate_per_gpu_hour for c in causes)
    return sum(c.rate_per_gpu_hour * setup.downtime(c.remedy) for c in causes) / weight if weight else 0.0


def daly_goodput(setup: RunSetup, table: RateTable) -> float:
    """Expected goodput in Daly's model: wall per unit of training M e^(R/M) (e^((tau+C)/M) - 1) / tau
    for the work-losing interruptions (R their rate-weighted mean downtime), stretched by the
    planned stops' share of the wall-clock. Spares are taken to be enough."""
    m = mtbf(setup, table)
    tau, cost = setup.interval, setup.checkpoint_cost
    if math.isinf(m):
        wall_per_work = (tau + cost) / tau
    else:
        r = _mean_downtime(setup, table, planned=False)
        wall_per_work = m * math.exp(r / m) * math.expm1((tau + cost) / m) / tau
    planned_rate = table.rate(setup.gpus) - table.rate(setup.gpus, lossy_only=True)
    return (1 - planned_rate * _mean_downtime(setup, table, planned=True)) / wall_per_work


def arrivals(table: RateTable, gpus: int, seed: int, runs: int) -> List[Arrivals]:
    return [Arrivals(table, gpus, seed, run) for run in range(runs)]


def simulate_all(setup: RunSetup, streams: Sequence[Arrivals]) -> List[RunResult]:
    return [simulate(setup, stream) for stream in streams]


def mean_goodput(setup: RunSetup, streams: Sequence[Arrivals]) -> float:
    return sum(r.goodput for r in simulate_all(setup, streams)) / len(streams)


@dataclass(frozen=True)
class Optimum:
    interval: float
    goodput: float


def _golden(f: Callable[[float], float], lo: float, hi: float) -> float:
    """The maximum of f over [lo, hi] (f unimodal there), on a log scale."""
    a, b = math.log(lo), math.log(hi)
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(GOLDEN_STEPS):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)


def best_interval(setup: RunSetup, table: RateTable, streams: Sequence[Arrivals]) -> Optional[Optimum]:
    """The interval with the highest mean simulated goodput over `streams` (the same failures for
    every interval tried); None when nothing loses work, so no interval is best."""
    m = mtbf(setup, table)
    if math.isinf(m):
        return None

    def goodput(interval: float) -> float:
        return mean_goodput(dataclasses.replace(setup, interval=interval), streams)

    centre = daly(setup.checkpoint_cost, m)
    grid = [centre * GRID_SPAN ** (2 * i / (GRID_POINTS - 1) - 1) for i in range(GRID_POINTS)]
    values = [goodput(x) for x in grid]
    best = max(range(GRID_POINTS), key=values.__getitem__)
    interval = _golden(goodput, grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)])
    found = Optimum(interval, goodput(interval))
    return found if found.goodput >= values[best] else Optimum(grid[best], values[best])


def mean_nodes_out(setup: RunSetup, table: RateTable) -> float:
    """Expected nodes out of service at once: the sum over causes of arrival rate x repair time."""
    return sum(c.rate_per_gpu_hour * setup.gpus / 3600 * setup.remedies[c.remedy].repair for c in table.causes)


def poisson_spares(mean: float, probability: float) -> int:
    """The fewest spares s with P(Poisson(mean) <= s) >= probability.

    >>> poisson_spares(0.0, 0.99), poisson_spares(1.0, 0.5), poisson_spares(10.0, 0.99)
    (0, 1, 18)
    """
    if mean == 0:
        return 0
    total, k = 0.0, 0
    while True:
        total += math.exp(-mean + k * math.log(mean) - math.lgamma(k + 1))
        if total >= probability or total >= 1 - 1e-12:
            return k
        k += 1


def simulated_spares(setup: RunSetup, streams: Sequence[Arrivals], horizon: float, probability: float) -> int:
    """The fewest spares that cover the nodes out at once for `probability` of the time, over
    [0, horizon] of every run (all start with every node in service)."""
    time_at: List[float] = []
    for stream in streams:
        changes = []
        for t, _cause, remedy in stream.until(horizon):
            repair = setup.remedies[remedy].repair
            if repair > 0:
                changes += [(t, 1), (min(t + repair, horizon), -1)]
        changes.sort()
        level, last = 0, 0.0
        for t, step in changes + [(horizon, 0)]:
            while len(time_at) <= level:
                time_at.append(0.0)
            time_at[level] += t - last
            level, last = level + step, t
    whole = sum(time_at)
    covered = 0.0
    for spares, seconds in enumerate(time_at):
        covered += seconds
        if covered >= probability * whole:
            return spares
    return len(time_at) - 1
