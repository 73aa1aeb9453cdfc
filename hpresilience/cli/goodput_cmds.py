"""`hpresilience goodput`: project goodput, the best checkpoint interval and the spare count (issue 13).

A seeded simulation of a training run under the failure rates of a table (Llama 3's by default),
with the recovery times of a drill report when given; docs/goodput.md explains the method."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import click

from ..goodput.drill import DrillReportError, load_drill, with_measured
from ..goodput.optimise import daly, mean_nodes_out, mtbf, poisson_spares
from ..goodput.rates import RatesError, RateTable, llama3, load_rates
from ..goodput.report import NoOptimum, project, render_text
from ..goodput.sim import DEFAULT_CHECKPOINT_COST, DEFAULT_REMEDIES, DEFAULT_RESTART_COST, RemedyTimes, RunSetup

DEFAULT_DAYS = 54.0
POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)


def _table(rates: Optional[Path]) -> RateTable:
    try:
        return load_rates(rates) if rates is not None else llama3()
    except RatesError as e:
        raise click.BadParameter(str(e), param_hint="'--rates'") from None


def _remedies(drill_report: Optional[Path], overrides: Dict[str, Optional[float]]
              ) -> Tuple[Dict[str, RemedyTimes], Dict[str, str]]:
    """Remedy times: defaults, then the drill report's medians, then --detect/--resume/--repair."""
    measured: Dict[str, float] = {}
    sources = {name: "defaults" for name in overrides}
    if drill_report is not None:
        try:
            medians = load_drill(drill_report)
        except DrillReportError as e:
            raise click.BadParameter(str(e), param_hint="'--drill-report'") from None
        for name, median in medians.items():
            measured[name] = median.seconds
            sources[name] = f"{drill_report} (median of {median.scenarios} scenario(s))"
    for name, value in overrides.items():
        if value is not None:
            measured[name], sources[name] = value, f"--{name}"
    try:
        return with_measured(DEFAULT_REMEDIES, measured), sources
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@click.command()
@click.option("--gpus", type=click.IntRange(min=1), default=16384, show_default=True, help="GPUs in the job.")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--days", type=POSITIVE, help=f"Wall-clock days simulated  [default: {DEFAULT_DAYS:g}]")
@click.option("--work-days", type=POSITIVE,
              help="Instead of --days: run until this many days of training are saved (the wall-clock is the result).")
@click.option("--checkpoint-interval", type=POSITIVE, metavar="MINUTES",
              help="Training minutes between checkpoints  [default: the simulated optimum]")
@click.option("--checkpoint-cost", type=POSITIVE, default=DEFAULT_CHECKPOINT_COST, show_default=True,
              metavar="SECONDS", help="Seconds training stops for each checkpoint.")
@click.option("--restart-cost", type=NON_NEGATIVE, default=DEFAULT_RESTART_COST, show_default=True,
              metavar="SECONDS", help="Seconds from relaunch to training again (checkpoint load, start-up).")
@click.option("--detect", type=NON_NEGATIVE, metavar="SECONDS", help="Fault to node flagged (replace, reboot).")
@click.option("--resume", type=NON_NEGATIVE, metavar="SECONDS",
              help="Fault to job relaunched on healthy nodes (replace, reboot).")
@click.option("--repair", type=NON_NEGATIVE, metavar="SECONDS", help="Fault to node back in service (replace, reboot).")
@click.option("--rates", type=existing_file, help="Failure-rate table, TOML or JSON (default: Llama 3, Table 5).")
@click.option("--drill-report", type=existing_file,
              help="JSON report of `hpresilience drill`: its median detect/resume/repair times are used.")
@click.option("--spare-probability", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              default=0.99, show_default=True, help="Chance the run is at full size, for the spare count.")
@click.option("--spares", type=click.IntRange(min=0), help="Spare nodes simulated  [default: the Poisson count]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Monte Carlo runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the projection as one JSON object.")
def goodput(gpus: int, gpus_per_node: int, days: Optional[float], work_days: Optional[float],
            checkpoint_interval: Optional[float], checkpoint_cost: float, restart_cost: float,
            detect: Optional[float], resume: Optional[float], repair: Optional[float], rates: Optional[Path],
            drill_report: Optional[Path], spare_probability: float, spares: Optional[int], seed: int, runs: int,
            as_json: bool) -> None:
    """Project a training run's goodput under failures, the best checkpoint interval, and spares."""
    if gpus % gpus_per_node:
        raise click.UsageError(f"--gpus ({gpus}) must be a multiple of --gpus-per-node ({gpus_per_node})")
    if days is not None and work_days is not None:
        raise click.UsageError("give --days or --work-days, not both")
    table = _table(rates)
    remedies, sources = _remedies(drill_report, {"detect": detect, "resume": resume, "repair": repair})
    base = RunSetup(gpus=gpus, gpus_per_node=gpus_per_node, interval=1.0, checkpoint_cost=checkpoint_cost,
                    restart_cost=restart_cost, remedies=remedies, spares=0,
                    budget=None if work_days is not None else (days or DEFAULT_DAYS) * 86400,
                    work_target=None if work_days is None else work_days * 86400)
    if spares is None:
        spares = poisson_spares(mean_nodes_out(base, table), spare_probability)
    base = dataclasses.replace(base, spares=spares, interval=daly(checkpoint_cost, mtbf(base, table)))
    try:
        report = project(base, table, seed, runs, None if checkpoint_interval is None else checkpoint_interval * 60,
                         spare_probability, sources)
    except NoOptimum as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))
