"""`hpresilience controller` (the daemon) and its operator subcommands."""
from __future__ import annotations

import getpass
import os
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Optional

import click

from ..log import configure
from .status_cmds import config_option, load_config, make_gateway, no_journal_note, open_journal


@click.group(invoke_without_command=True)
@config_option
@click.option("--dry-run", is_flag=True, help="Decide and log what would be done; change nothing.")
@click.option("--mode", type=click.Choice(["automatic", "manual"]), help="Override [controller] mode.")
@click.pass_context
def controller(ctx: click.Context, config_path: Optional[Path], dry_run: bool, mode: Optional[str]) -> None:
    """Run the remediation controller (a systemd Type=notify service next to slurmctld).

    Without a subcommand, runs the daemon."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    from ..controller.daemon import Controller
    config = load_config(config_path)

    def overrides(c) -> None:
        if dry_run:
            c.controller.dry_run = True
        if mode:
            c.controller.mode = mode

    configure(level=config.controller.log_level, json=True)
    try:
        daemon = Controller(config, config_path, overrides=overrides)
    except (sqlite3.Error, OSError) as e:
        # A damaged or unreadable journal: refuse to start (exit 2, which the unit does
        # not restart) rather than act without a record of what is in flight.
        click.echo(f"hpresilience controller: cannot open the journal {config.journal_path}: {e}", err=True)
        sys.exit(2)
    code = daemon.run()
    if any(t.name.startswith("hpr-step") and t.is_alive() for t in threading.enumerate()):
        os._exit(code)  # a provider or check still running: its step is journaled; don't wait for it
    sys.exit(code)


@controller.command()
@click.pass_obj
def resume(config_path: Optional[Path]) -> None:
    """Reset the circuit breaker: automatic action continues."""
    config = load_config(config_path)
    journal = open_journal(config)
    if journal is None:
        click.echo(no_journal_note(config), err=True)
        sys.exit(1)
    was = journal.breaker()
    journal.reset_breaker(by=getpass.getuser())
    if was.tripped:
        click.echo(f"circuit breaker reset (was tripped: {was.detail}); automatic action resumes on the next pass")
    else:
        click.echo("circuit breaker was not tripped; nothing paused")


@controller.command()
@click.argument("node")
@click.pass_obj
def repaired(config_path: Optional[Path], node: str) -> None:
    """spare-pool: NODE is repaired; put it back into the spare pool."""
    from ..controller.providers import SparePoolProvider
    from ..slurm import NodeState, ReasonOwner, SlurmError
    config = load_config(config_path)
    if config.provider.type != "spare-pool":
        click.echo(f"provider is {config.provider.type!r}, not spare-pool: resume the node with scontrol", err=True)
        sys.exit(2)
    gateway = make_gateway(config)
    try:
        current = gateway.node(node)
        if current.reason_owner is ReasonOwner.FOREIGN:
            click.echo(f"{node} has a reason we did not write ({current.reason!r}); clear it first", err=True)
            sys.exit(1)
        SparePoolProvider(config.provider, gateway).add(node)
        if current.reason:
            gateway.set_state(node, NodeState.RESUME)
    except SlurmError as e:
        click.echo(f"hpresilience: {e}", err=True)
        sys.exit(2)
    click.echo(f"{node} is back in spare reservation {config.provider.spare_reservation!r}")
