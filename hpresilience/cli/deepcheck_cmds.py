"""`hpresilience deepcheck`: the deep health checks on this node, or across nodes (issue 10)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import click

from .agent_cmds import _load, config_option

if TYPE_CHECKING:
    from ..agent.config import AgentConfig
    from ..deepcheck.suite import NodeFacts

# Outcomes of --apply after which the node is out of service with our reason.
APPLIED = ("applied", "already")


def node_facts(config: AgentConfig, no_slurm: bool) -> NodeFacts:
    """This node as Slurm sees it: partitions and features choose the parameters, jobs
    forbid the run. Without Slurm's answer the suite does not run (unless --no-slurm):
    we cannot tell whether jobs would be disturbed."""
    from ..agent.daemon import agent_gateway
    from ..agent.node import node_name
    from ..deepcheck.check import in_job_script
    from ..deepcheck.suite import NodeFacts
    name = node_name(config.agent.node_name)
    expected = config.nvml.expected_gpus
    if no_slurm:
        return NodeFacts(name=name, gpu_count=expected)
    # In a prolog or epilog the node is this job's: no need to list every job of the cluster from
    # every node at every job start (issue 10 review: slurmctld load).
    node = agent_gateway().node(name, with_jobs=not in_job_script(os.environ))
    own = os.environ.get("SLURM_JOB_ID")  # a prolog/epilog or an srun in our reservation: its own job
    jobs = tuple(j for j in node.jobs if str(j) != own)
    return NodeFacts(name=name, partitions=node.partitions, features=node.features,
                     gpu_count=expected if expected is not None else node.gpu_count, jobs=jobs)


@click.command()
@config_option
@click.option("--level", type=click.Choice(["quick", "standard", "full"]), default="standard", show_default=True)
@click.option("--only", "only", multiple=True, metavar="NAME", help="Run only these checks (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--nodes", "nodelist", metavar="NODELIST",
              help="Cluster level: an all-reduce bandwidth test across these nodes through srun; "
                   "names the culprit node(s) when the group fails.")
@click.option("--apply", "apply", is_flag=True,
              help="On a failure, take this node out of service with an Action: reason, as the agent would "
                   "(for the prolog/epilog in slurm_plugins/).")
@click.option("--no-slurm", is_flag=True,
              help="Do not ask Slurm for this node's partitions, features and jobs (an admin's run on a "
                   "node outside Slurm): default parameters, and no guard against running jobs.")
def deepcheck(config_path: Optional[Path], level: str, only: Tuple[str, ...], as_json: bool,
              nodelist: Optional[str], apply: bool, no_slurm: bool) -> None:
    """Active health checks that load the node: exit 0 pass, 1 fail, 2 could not run.

    Each check prints PASS, FAIL, SKIP (with why: no such device, tool not
    installed) or ERROR (could not run: timed out, unreadable output). Never runs
    on a node carrying jobs."""
    from ..deepcheck.checks import CHECKS
    from ..deepcheck.result import EXIT_NOT_RUN, Level
    from ..slurm import SlurmError
    if nodelist and (only or apply or no_slurm):
        raise click.UsageError("--nodes runs the cluster all-reduce check: --only, --apply and --no-slurm "
                               "are for the checks of this node")
    if apply and no_slurm:
        raise click.UsageError("--apply writes to Slurm: it cannot go with --no-slurm")
    config = _load(config_path)
    if nodelist:
        from ..deepcheck.cluster import run_cluster_check
        report = run_cluster_check(config.deepcheck, nodelist, Level(level))
        _print(report, as_json)
        sys.exit(report.exit_code)
    names = list(only) or config.deepcheck.names(Level(level))
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        click.echo(f"hpresilience deepcheck: unknown check(s) {', '.join(unknown)} "
                   f"(known: {', '.join(sorted(CHECKS))})", err=True)
        sys.exit(EXIT_NOT_RUN)
    try:
        facts = node_facts(config, no_slurm)
    except SlurmError as e:
        click.echo(f"hpresilience deepcheck: cannot tell whether jobs run on this node: {e}", err=True)
        sys.exit(EXIT_NOT_RUN)
    if facts.jobs:
        click.echo(f"hpresilience deepcheck: {facts.name} runs job(s) {', '.join(map(str, facts.jobs))}; "
                   "a deep check would disturb them, not running", err=True)
        sys.exit(EXIT_NOT_RUN)
    from ..deepcheck.suite import run_suite
    report = run_suite(CHECKS, names, Level(level), facts, config.deepcheck, config.agent.state_dir)
    _print(report, as_json)
    if apply and not no_slurm:
        from ..deepcheck.apply import apply_report
        try:
            outcome = apply_report(config, report)
        except SlurmError as e:
            click.echo(f"hpresilience deepcheck: could not apply: {e}", err=True)
            sys.exit(EXIT_NOT_RUN)
        if outcome is not None:
            click.echo(f"action: {outcome}", err=True)
            if outcome not in APPLIED:
                # Not applied (budget spent, dry run, someone else's reason): exit 1 would make a prolog
                # hold the job and Slurm drain the node itself, around our safeguards (issue 10 review).
                sys.exit(EXIT_NOT_RUN)
    sys.exit(report.exit_code)


def _print(report, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    for r in report.results:
        click.echo(f"{r.status.value.upper():5} {r.name:12} {r.duration_seconds:7.1f}s  {r.summary}")
    if report.culprits:
        click.echo(f"culprits: {','.join(report.culprits)}")
    click.echo(f"deepcheck {report.level.value} on {report.node}: {report.status.value} "
               f"in {report.duration_seconds:.1f}s")



