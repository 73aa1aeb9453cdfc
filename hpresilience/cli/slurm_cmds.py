"""`hpresilience slurm ...`: what the gateway sees and does, for admins.

These commands go through the same SlurmGateway as the agent and controller,
so they show exactly what hpresilience would read and refuse what it would."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from typing import Any, Optional

import click

from ..action import NodeAction
from ..slurm import ActionReason, NodeState, SlurmError, SlurmGateway


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _as_dict(obj: Any) -> dict:
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "extra"}


def _fail(error: Exception) -> None:
    click.echo(f"hpresilience: {error}", err=True)
    sys.exit(2)


@click.group()
def slurm() -> None:
    """Read and change Slurm through hpresilience's gateway."""


@slurm.command()
@click.argument("nodes", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def nodes(nodes: Optional[str], as_json: bool) -> None:
    """Show NODES (a hostlist such as n[1-4]; default all) as hpresilience reads them."""
    try:
        found = SlurmGateway().nodes(nodes, with_jobs=True)
    except SlurmError as e:
        _fail(e)
    if as_json:
        for node in found:
            click.echo(json.dumps(_as_dict(node)))
        return
    click.echo(f"{'NODE':<10} {'STATE':<30} {'OURS':<5} {'BOOT':<20} {'JOBS':<10} REASON")
    for n in found:
        boot = n.boot_time.strftime("%Y-%m-%dT%H:%M:%S") if n.boot_time else "-"
        jobs = ",".join(map(str, n.jobs)) or "-"
        ours = "yes" if n.action_reason else ("no" if n.reason else "-")
        click.echo(f"{n.name:<10} {n.state_text:<30} {ours:<5} {boot:<20} {jobs:<10} {n.reason or ''}")


@slurm.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per job.")
def jobs(as_json: bool) -> None:
    """Show jobs as hpresilience reads them."""
    try:
        found = SlurmGateway().jobs()
    except SlurmError as e:
        _fail(e)
    if as_json:
        for job in found:
            click.echo(json.dumps(_as_dict(job)))
        return
    click.echo(f"{'JOBID':<8} {'STATE':<11} {'NODES':<14} {'EXCL':<5} {'REQUEUE':<8} {'RESTARTS':<9} NAME")
    for j in found:
        click.echo(f"{j.job_id:<8} {j.state:<11} {j.nodelist or '-':<14} {'yes' if j.exclusive else 'no':<5} "
                   f"{'yes' if j.requeue else 'no':<8} {j.restart_count:<9} {j.name}")


@slurm.command()
@click.argument("node")
@click.argument("action", type=click.Choice(["reboot", "replace"], case_sensitive=False))
@click.option("--detail", default="", help="Short human detail after 'Action: X; '.")
@click.option("--state", "state", default="fail", show_default=True,
              type=click.Choice(["fail", "drain", "down"], case_sensitive=False),
              help="fail/drain let running jobs finish; down kills them now.")
def mark(node: str, action: str, detail: str, state: str) -> None:
    """Take NODE out of service with an 'Action: Reboot|Replace' reason.

    Refuses when the node already carries a reason hpresilience did not write."""
    reason = ActionReason(NodeAction.parse(action), detail)
    try:
        SlurmGateway().mark_action(node, reason, NodeState(state.upper()))
    except SlurmError as e:
        _fail(e)
    click.echo(f"{node}: {state.upper()} reason={reason}")
