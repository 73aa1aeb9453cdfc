"""`hpresilience deepcheck --nodes NODELIST`: an all-reduce across nodes that names the bad node (issue 10).

One run is one srun over a group of nodes (`-N n --ntasks-per-node=1 -w GROUP`, plus
the site's `srun_args`) of the torch worker (allreduce_worker.py: NCCL on GPU nodes,
gloo on CPU nodes) or of the site's nccl-tests `all_reduce_perf`, with a timeout. The
group test runs across all the nodes and is held to `min_busbw_gbps`; when it fails,
or whenever the relative criterion is on (gloo's absolute numbers mean little), the
pair search of localise.py finds the culprits; its module docstring says what counts as
evidence against a node and what the search costs.

What a run says (interpret_worker, interpret_nccl; collection apart from evaluation):
- srun missing: the check is SKIP. A run that could not start (srun could not allocate
  a node: down, drained, busy, `--immediate` expired), that hung past `timeout_seconds`
  (killed), whose workers never met, or whose output is unreadable: NOT_RUN, no
  evidence about anyone; the report is ERROR for those nodes, never FAIL.
- The workers met and the collective raised, or summed wrong (nccl-tests' #wrong or
  out-of-bounds FAILED): FAILED, evidence against the group.
- Otherwise its bus bandwidth, graded by the criteria.

A node carrying jobs (other than this command's own) is never tested: ERROR naming it.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..slurm.hostlist import expand, fold
from .check import CouldNotRun, Skip
from .cluster_config import ClusterCheckConfig
from .config import DeepCheckConfig
from .localise import Criteria, Grade, Group, Localisation, Measurement, MeasureRound, Outcome, Trial, localise
from .parsers import ParseError
from .parsers.nccl import parse_all_reduce_perf
from .result import CheckResult, Level, Status, SuiteReport
from .tool import ToolOutput, find_tool, run_tool

CHECK = "allreduce"
WORKER_MODULE = "hpresilience.deepcheck.allreduce_worker"


# ------------------------------------------------------------------ what a run says


def _stderr_tail(out: ToolOutput) -> str:
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _not_run(out: ToolOutput, what: str) -> Measurement:
    return Measurement(Outcome.NOT_RUN, detail=f"{what} (srun exit {out.returncode}: {_stderr_tail(out)})")


def _worker_lines(stdout: str) -> List[Dict[str, Any]]:
    found = []
    for line in stdout.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue  # srun's and torch's own lines
        if isinstance(data, dict) and "ok" in data:
            found.append(data)
    return found


def _who(line: Mapping[str, Any]) -> str:
    return f"rank {line.get('rank')} on {line.get('node') or '?'}: {line.get('error')}"


def interpret_worker(out: ToolOutput) -> Measurement:
    """What the torch worker's srun says: a failed collective on any rank is evidence; a
    failed rendezvous, no result or an unreadable one is not."""
    lines = _worker_lines(out.stdout)
    collective = [d for d in lines if d.get("ok") is False and d.get("phase") == "collective"]
    if collective:
        return Measurement(Outcome.FAILED, detail="; ".join(_who(d) for d in collective))
    rendezvous = [d for d in lines if d.get("ok") is False]
    if rendezvous:
        return _not_run(out, "the workers never met: " + "; ".join(_who(d) for d in rendezvous))
    results = [d for d in lines if d.get("ok") is True and d.get("rank") == 0]
    if not results:
        return _not_run(out, "allreduce_worker printed no result")
    busbw = results[0].get("busbw_gbps")
    if isinstance(busbw, bool) or not isinstance(busbw, (int, float)) or not math.isfinite(busbw) or busbw < 0:
        return _not_run(out, f"allreduce_worker: malformed result, busbw_gbps={busbw!r}")
    return Measurement(Outcome.OK, float(busbw))


def interpret_nccl(out: ToolOutput) -> Measurement:
    """What nccl-tests' all_reduce_perf under srun says: wrong values are evidence; no table,
    or a crash after the table, is not."""
    try:
        report = parse_all_reduce_perf(out.stdout)
    except ParseError as e:
        return _not_run(out, str(e))
    wrong = report.wrong_total or 0
    if report.out_of_bounds_failed or wrong > 0:
        return Measurement(Outcome.FAILED, detail=f"all_reduce_perf: {wrong:g} wrong values (out of bounds: "
                                                  f"{report.out_of_bounds})")
    busbw = report.max_busbw if report.rows else report.avg_busbw
    if out.returncode != 0 or busbw is None:
        return _not_run(out, "all_reduce_perf did not finish")
    return Measurement(Outcome.OK, busbw)


# ------------------------------------------------------------------ running it


def program(cfg: ClusterCheckConfig, addresses: Mapping[str, str], group: Group) -> List[str]:
    if cfg.nccl_tests:
        return list(cfg.nccl_tests)
    argv = [cfg.python or sys.executable, "-m", WORKER_MODULE, "--sizes", ",".join(map(str, cfg.sizes_bytes)),
            "--iterations", str(cfg.iterations), "--warmup", str(cfg.warmup), "--backend", cfg.backend,
            "--timeout", f"{cfg.collective_timeout_seconds:g}", "--port-base", str(cfg.port_base)]
    for node in group:
        if node in addresses:
            argv += ["--address", f"{node}={addresses[node]}"]
    return argv


def srun_argv(cfg: ClusterCheckConfig, group: Group, command: Sequence[str]) -> List[str]:
    # --exclusive: never beside a job; --immediate: a node that cannot be had is "could not
    # run", not a wait; --kill-on-bad-exit: one worker's failure ends the run at once.
    return ["srun", "-N", str(len(group)), f"--ntasks-per-node={cfg.ntasks_per_node}", "-w", fold(group),
            "--exclusive", f"--immediate={cfg.immediate_seconds}", "--kill-on-bad-exit=1",
            "--job-name=hpr-deepcheck", *cfg.srun_args, *command]


class Runner:
    """Runs groups through srun, a round's groups at the same time (at most max_parallel)."""

    def __init__(self, cfg: ClusterCheckConfig, addresses: Mapping[str, str]):
        self.cfg, self.addresses = cfg, addresses
        self.interpret = interpret_nccl if cfg.nccl_tests else interpret_worker

    def one(self, group: Group) -> Measurement:
        argv = srun_argv(self.cfg, group, program(self.cfg, self.addresses, group))
        try:
            out = run_tool(argv, self.cfg.timeout_seconds, env=self.cfg.env, tool="srun")
        except (CouldNotRun, Skip) as e:   # a hung run is killed: no verdict on anyone
            return Measurement(Outcome.NOT_RUN, detail=str(e))
        return self.interpret(out)

    def round(self, groups: Sequence[Group]) -> List[Measurement]:
        if not groups:
            return []
        with ThreadPoolExecutor(max_workers=min(len(groups), self.cfg.max_parallel)) as pool:
            return list(pool.map(self.one, groups))


# ------------------------------------------------------------------ the verdict


def describe_measurement(m: Measurement) -> str:
    if m.outcome is Outcome.OK:
        return f"{m.busbw_gbps:.3g} GB/s"
    return f"{'failed' if m.outcome is Outcome.FAILED else 'could not run'}: {m.detail}"


def _last_trial(found: Localisation, node: str) -> Optional[Trial]:
    tests = [t for r in found.rounds for t in r.tests if node in t.group]
    return tests[-1] if tests else None


def _about(found: Localisation, nodes: Sequence[str]) -> str:
    parts = []
    for node in nodes:
        test = _last_trial(found, node)
        if test is None:
            parts.append(f"{node}: never tested (round limit)")
        else:
            partner = ",".join(n for n in test.group if n != node)
            parts.append(f"{node} with {partner}: {describe_measurement(test.measurement)}")
    return "; ".join(parts)


def verdict(nodes: Sequence[str], group: Optional[Trial], found: Optional[Localisation],
            criteria: Criteria) -> Tuple[Status, str]:
    """Pure: the check's status and summary from the group test and the search."""
    if found is not None and found.culprits:
        reference = next((r.reference_gbps for r in reversed(found.rounds) if r.reference_gbps), None)
        best = f" (best pair {reference:.3g} GB/s, min_relative {criteria.min_relative:g})" if reference else ""
        return Status.FAIL, f"culprit(s) {fold(found.culprits)}: {_about(found, found.culprits)}{best}"
    if group is not None and group.grade is Grade.BAD:
        return Status.FAIL, (f"all-reduce across {fold(nodes)} {describe_measurement(group.measurement)} "
                             f"(min {criteria.min_busbw_gbps:g} GB/s); no node singled out")
    if found is not None and found.undetermined:
        return Status.ERROR, f"could not test {fold(found.undetermined)}: {_about(found, found.undetermined)}"
    if group is not None and group.grade is Grade.UNKNOWN:
        return Status.ERROR, f"all-reduce across {fold(nodes)} {describe_measurement(group.measurement)}"
    shown = f"{describe_measurement(group.measurement)} across {fold(nodes)}" if group else f"{fold(nodes)}"
    pairs = "; every pair within the criteria" if found is not None else ""
    return Status.PASS, f"{shown}{pairs}"


def evaluate(nodes: Sequence[str], cfg: ClusterCheckConfig,
             measure_round: MeasureRound) -> Tuple[CheckResult, Tuple[str, ...]]:
    """The group test, then the search when it is needed; the result and the culprits."""
    began = time.monotonic()
    criteria = Criteria(cfg.min_busbw_gbps, cfg.min_relative)
    group: Optional[Trial] = None
    if cfg.group_test:
        whole = tuple(nodes)
        measured = measure_round([whole])[0]
        group = Trial(whole, measured, criteria.grade(measured))
    found: Optional[Localisation] = None
    # Two nodes: the group is the only pair, and nobody is left to compare it with.
    if group is None or (len(nodes) > 2 and (group.grade is not Grade.GOOD or cfg.min_relative > 0)):
        found = localise(nodes, measure_round, criteria, cfg.max_rounds)
    status, summary = verdict(nodes, group, found, criteria)
    evidence: Dict[str, Any] = {"tool": "all_reduce_perf" if cfg.nccl_tests else "allreduce_worker",
                                "backend": None if cfg.nccl_tests else cfg.backend,
                                "criteria": {"min_busbw_gbps": cfg.min_busbw_gbps, "min_relative": cfg.min_relative}}
    if group is not None:
        evidence["group"] = group.to_dict()
    if found is not None:
        evidence.update(rounds=[r.to_dict() for r in found.rounds], culprits=list(found.culprits),
                        cleared=list(found.cleared), undetermined=list(found.undetermined))
    culprits = found.culprits if found is not None else ()
    return CheckResult(CHECK, status, summary, evidence, time.monotonic() - began), culprits


def _facts(nodes: Sequence[str], gateway: Any) -> Tuple[Dict[str, str], str]:
    """Slurm's address of each node, and why not to run ("" when fine): unknown nodes or jobs on them."""
    from ..slurm import SlurmError
    own = os.environ.get("SLURM_JOB_ID")
    try:
        found = gateway.nodes(list(nodes), with_jobs=True)
    except SlurmError as e:
        return {}, f"cannot read the nodes from Slurm: {e}"
    busy = {n.name: [j for j in n.jobs if str(j) != own] for n in found}
    busy = {name: jobs for name, jobs in busy.items() if jobs}
    if busy:
        return {}, "never on nodes carrying jobs: " + "; ".join(
            f"{name} runs job(s) {','.join(map(str, jobs))}" for name, jobs in sorted(busy.items()))
    return {n.name: n.address for n in found if n.address}, ""


def run_cluster_check(config: DeepCheckConfig, nodelist: str, level: Level, gateway: Any = None) -> SuiteReport:
    started, began = time.time(), time.monotonic()
    cfg = config.cluster
    nodes: Tuple[str, ...] = ()

    def report(result: CheckResult, culprits: Tuple[str, ...] = ()) -> SuiteReport:
        return SuiteReport(node=fold(nodes) if nodes else nodelist, level=level,
                           results=(result,), started_at=started, duration_seconds=time.monotonic() - began,
                           nodes=nodes or (nodelist,), culprits=culprits)

    try:
        nodes = tuple(expand(nodelist))
    except ValueError as e:
        return report(CheckResult(CHECK, Status.ERROR, f"bad node list {nodelist!r}: {e}"))
    if len(nodes) < 2:
        return report(CheckResult(CHECK, Status.ERROR, f"an all-reduce test needs two nodes or more, got {nodelist}"))
    try:
        find_tool("srun", {**os.environ, **cfg.env})
    except Skip as e:
        return report(CheckResult(CHECK, Status.SKIP, str(e)))
    if gateway is None:
        from ..slurm import SlurmGateway
        gateway = SlurmGateway()
    addresses, refusal = _facts(nodes, gateway)
    if refusal:
        return report(CheckResult(CHECK, Status.ERROR, refusal))
    result, culprits = evaluate(nodes, cfg, Runner(cfg, addresses).round)
    return report(result, culprits)
