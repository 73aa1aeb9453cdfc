"""The goodput projection as one JSON-ready dict, and its text rendering (issue 13).

`project` runs everything (Monte Carlo runs at the chosen interval, the interval search, the
spare count); `render_text` prints that same dict, so the text and `--json` never disagree.
The JSON schema is "hpresilience.goodput/1": its keys are fixed (tests/unit/test_goodput.py).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Dict, List, Mapping, Optional

from .optimise import (
    arrivals,
    best_interval,
    daly,
    daly_goodput,
    mean_goodput,
    mean_nodes_out,
    mtbf,
    poisson_spares,
    simulate_all,
    simulated_spares,
    young,
)
from .rates import LLAMA3_INTERRUPTIONS, RateTable
from .sim import RunResult, RunSetup

SCHEMA = "hpresilience.goodput/1"


class NoOptimum(ValueError):
    """Nothing in the table loses work: no interval is best, the caller must give one."""


def _mean(values: List[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _by_cause(table: RateTable, results: List[RunResult]) -> Dict[str, Dict[str, float]]:
    return {c.name: {"interruptions": _mean([r.interruptions.get(c.name, 0) for r in results]),
                     "redone_seconds": _mean([r.redone.get(c.name, 0.0) for r in results]),
                     "down_seconds": _mean([r.down.get(c.name, 0.0) for r in results])}
            for c in table.causes}


def _inputs(setup: RunSetup, table: RateTable, seed: int, runs: int, interval_from: str,
            spare_probability: float, time_sources: Mapping[str, str]) -> Dict[str, Any]:
    return {
        "gpus": setup.gpus, "gpus_per_node": setup.gpus_per_node, "nodes": setup.nodes,
        "budget_seconds": setup.budget, "work_target_seconds": setup.work_target,
        "seed": seed, "runs": runs,
        "checkpoint_interval_seconds": setup.interval, "checkpoint_interval_from": interval_from,
        "checkpoint_cost_seconds": setup.checkpoint_cost, "restart_cost_seconds": setup.restart_cost,
        "spares": setup.spares, "spare_probability": spare_probability,
        "remedies": {name: {"detect_seconds": t.detect, "resume_seconds": t.resume, "repair_seconds": t.repair}
                     for name, t in setup.remedies.items()},
        "time_sources": dict(time_sources),
        "rates": {"source": table.source,
                  "causes": [{"name": c.name, "remedy": c.remedy, "rate_per_gpu_hour": c.rate_per_gpu_hour,
                              "count": c.count} for c in table.causes]},
    }


def project(base: RunSetup, table: RateTable, seed: int, runs: int, interval: Optional[float],
            spare_probability: float, time_sources: Mapping[str, str]) -> Dict[str, Any]:
    """The whole projection. `interval` None: the simulated optimum (base.interval is ignored)."""
    streams = arrivals(table, base.gpus, seed, runs)
    m = mtbf(base, table)
    optimum = best_interval(base, table, streams)
    if interval is None and optimum is None:
        raise NoOptimum("nothing in the rates table loses work, so no checkpoint interval is best: "
                        "give --checkpoint-interval")
    setup = dataclasses.replace(base, interval=interval if interval is not None else optimum.interval)
    results = simulate_all(setup, streams)
    wall = _mean([r.wall for r in results])
    formulas = {}
    if optimum is not None:
        for name, formula in (("young", young), ("daly", daly)):
            at = formula(setup.checkpoint_cost, m)
            formulas.update({f"{name}_seconds": at,
                             f"{name}_goodput": mean_goodput(dataclasses.replace(setup, interval=at), streams)})
    nodes_out = mean_nodes_out(setup, table)
    return {
        "schema": SCHEMA,
        "inputs": _inputs(setup, table, seed, runs, "given" if interval is not None else "optimum",
                          spare_probability, time_sources),
        "goodput": {"mean": _mean([r.goodput for r in results]), "min": min(r.goodput for r in results),
                    "max": max(r.goodput for r in results), "daly_model": daly_goodput(setup, table)},
        "wall_seconds": wall,
        "interruptions": {"mean": _mean([sum(r.interruptions.values()) for r in results]),
                          "expected": table.rate(setup.gpus) * wall},
        "lost_seconds": {"by_cause": _by_cause(table, results),
                         "checkpoints": _mean([r.checkpoint for r in results]),
                         "waiting_for_spares": _mean([r.waiting for r in results])},
        "interval": {"mtbf_seconds": None if optimum is None else m,
                     "optimum_seconds": None if optimum is None else optimum.interval,
                     "optimum_goodput": None if optimum is None else optimum.goodput,
                     "young_seconds": formulas.get("young_seconds"), "young_goodput": formulas.get("young_goodput"),
                     "daly_seconds": formulas.get("daly_seconds"), "daly_goodput": formulas.get("daly_goodput")},
        "spares": {"probability": spare_probability, "mean_nodes_out": nodes_out,
                   "poisson": poisson_spares(nodes_out, spare_probability),
                   "simulated": simulated_spares(setup, streams, wall, spare_probability)},
    }


# ------------------------------------------------------------------ text
def _dur(seconds: Optional[float]) -> str:
    """
    >>> [_dur(s) for s in (None, 9.5, 447.2, 11135.0, 300000.0)]
    ['-', '9.5 s', '7.5 min', '3.09 h', '3.47 d']
    """
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 86400:.2f} d"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _header(p: Dict[str, Any]) -> List[str]:
    i = p["inputs"]
    span = (f"{i['budget_seconds'] / 86400:g} days" if i["budget_seconds"] is not None
            else f"{i['work_target_seconds'] / 86400:g} days of training")
    lines = [f"goodput projection: {i['gpus']:,} GPUs ({i['nodes']:,} nodes of {i['gpus_per_node']}), {span}, "
             f"{i['runs']} runs from seed {i['seed']}",
             f"failure rates: {i['rates']['source']}",
             f"checkpoint every {_dur(i['checkpoint_interval_seconds'])} ({i['checkpoint_interval_from']}), "
             f"checkpoint cost {_dur(i['checkpoint_cost_seconds'])}, restart cost {_dur(i['restart_cost_seconds'])}, "
             f"{i['spares']} spare nodes",
             "remedy   detect     resume     repair     (seconds from the fault)"]
    for name, t in i["remedies"].items():
        lines.append(f"{name:<8} {_dur(t['detect_seconds']):<10} {_dur(t['resume_seconds']):<10} "
                     f"{_dur(t['repair_seconds']):<10}")
    lines.append("replace/reboot times from: " + "; ".join(f"{k}: {v}" for k, v in i["time_sources"].items()))
    return lines


def _losses(p: Dict[str, Any]) -> List[str]:
    lost = p["lost_seconds"]
    lines = ["time lost per run (mean)        count   redone     down       share"]
    rows = sorted(lost["by_cause"].items(), key=lambda kv: -(kv[1]["redone_seconds"] + kv[1]["down_seconds"]))
    for name, c in rows:
        share = (c["redone_seconds"] + c["down_seconds"]) / p["wall_seconds"]
        lines.append(f"  {name:<30} {c['interruptions']:>5.1f}   {_dur(c['redone_seconds']):<10} "
                     f"{_dur(c['down_seconds']):<10} {_pct(share)}")
    for name, key in (("checkpoints", "checkpoints"), ("waiting for spares", "waiting_for_spares")):
        lines.append(f"  {name:<30} {'':>5}   {'':<10} {_dur(lost[key]):<10} {_pct(lost[key] / p['wall_seconds'])}")
    return lines


def render_text(p: Dict[str, Any]) -> str:
    g, iv, sp = p["goodput"], p["interval"], p["spares"]
    lines = _header(p) + [
        "",
        f"goodput: {_pct(g['mean'])} (runs {_pct(g['min'])} .. {_pct(g['max'])}; "
        f"Daly's model, spares enough: {_pct(g['daly_model'])})",
        f"interruptions: {p['interruptions']['mean']:.1f} per run (expected {p['interruptions']['expected']:.1f}; "
        f"Llama 3 reported {LLAMA3_INTERRUPTIONS} at 16,384 GPUs in 54 days)",
        "",
        *_losses(p),
        "",
        f"checkpoint interval (mean time between work-losing interruptions {_dur(iv['mtbf_seconds'])}):",
        f"  simulated optimum   {_dur(iv['optimum_seconds']):<10} goodput {_pct(iv['optimum_goodput'])}",
        f"  Young (1974)        {_dur(iv['young_seconds']):<10} goodput {_pct(iv['young_goodput'])}",
        f"  Daly (2006)         {_dur(iv['daly_seconds']):<10} goodput {_pct(iv['daly_goodput'])}",
        "",
        f"spare nodes for full size {_pct(sp['probability'])} of the time: {sp['poisson']} "
        f"(Poisson, mean {sp['mean_nodes_out']:.1f} nodes out at once); simulated: {sp['simulated']}",
    ]
    return "\n".join(lines)
