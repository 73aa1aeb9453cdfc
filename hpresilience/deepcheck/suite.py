"""Runs the checks of a level on this node and builds the report (issue 10).

A check that raises anything but Skip is ERROR: a bug in a check, like a hung
tool, says nothing about the node and must never drain it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Sequence, Tuple

import structlog

from .check import Check, Context, CouldNotRun, Skip
from .config import DeepCheckConfig
from .result import CheckResult, Level, Status, SuiteReport

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class NodeFacts:
    """What Slurm says about the node the suite runs on."""
    name: str
    partitions: Tuple[str, ...] = ()
    features: Tuple[str, ...] = ()
    gpu_count: Optional[int] = None
    jobs: Tuple[int, ...] = ()          # jobs on the node other than the one running the suite


def run_one(check: Check, ctx: Context, clock: Callable[[], float] = time.monotonic) -> CheckResult:
    began = clock()
    try:
        verdict = check.evaluate(check.collect(ctx), ctx.params)
        status, summary, evidence = verdict.status, verdict.summary, dict(verdict.evidence)
    except Skip as e:
        status, summary, evidence = Status.SKIP, str(e), {}
    except CouldNotRun as e:
        status, summary, evidence = Status.ERROR, str(e), {}
    except Exception as e:  # a broken check is "could not run", never "unhealthy"
        log.exception("deepcheck.check_crashed", check=check.name)
        status, summary, evidence = Status.ERROR, f"check crashed: {type(e).__name__}: {e}", {}
    return CheckResult(check.name, status, summary, evidence, clock() - began)


def run_suite(checks: Mapping[str, Check], names: Sequence[str], level: Level, facts: NodeFacts,
              config: DeepCheckConfig, state_dir: str, env: Optional[Mapping[str, str]] = None,
              clock: Callable[[], float] = time.monotonic) -> SuiteReport:
    started, began = time.time(), clock()
    results = []
    for name in names:
        params = config.params_for(name, facts.partitions, facts.features)
        ctx = Context(node=facts.name, level=level, params=params, gpu_count=facts.gpu_count,
                      state_dir=state_dir, env=dict(env or {}))
        result = run_one(checks[name], ctx, clock)
        if result.status is Status.SKIP and name in config.required:
            result = replace(result, status=Status.ERROR, summary=f"required, but skipped: {result.summary}")
        log.info("deepcheck.result", check=name, status=result.status.value, summary=result.summary,
                 seconds=round(result.duration_seconds, 2))
        results.append(result)
    return SuiteReport(node=facts.name, level=level, results=tuple(results), started_at=started,
                       duration_seconds=clock() - began)
