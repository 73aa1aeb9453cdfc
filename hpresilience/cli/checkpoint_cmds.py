"""`hpresilience checkpoint latest|list DIR`: the checkpoints `hpresilience.checkpoint` wrote, for sbatch scripts.

    ckpt=$(hpresilience checkpoint latest /shared/ckpt/run1) && resume="--resume $ckpt"

Only complete checkpoints are shown (see docs/checkpoints.md); skipped ones are logged on stderr."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

import click

from ..checkpoint import Checkpoint, CheckpointDir


def _as_dict(ckpt: Checkpoint) -> Dict[str, Any]:
    return {"step": ckpt.step, "path": os.path.abspath(ckpt.path), "time": ckpt.time}


def _open(directory: str, prefix: str) -> CheckpointDir:
    if os.path.exists(directory) and not os.path.isdir(directory):
        click.echo(f"hpresilience: {directory} is not a directory", err=True)
        sys.exit(2)
    try:
        return CheckpointDir(directory, keep=None, prefix=prefix)
    except ValueError as e:
        click.echo(f"hpresilience: {e}", err=True)
        sys.exit(2)


prefix_option = click.option("--prefix", default="step-", show_default=True,
                             help="Checkpoint names are PREFIX followed by the 9-digit step.")
json_option = click.option("--json", "as_json", is_flag=True, help="JSON instead of bare paths.")


@click.group()
def checkpoint() -> None:
    """Find complete checkpoints written by hpresilience.checkpoint."""


@checkpoint.command()
@click.argument("directory", metavar="DIR")
@json_option
@prefix_option
def latest(directory: str, as_json: bool, prefix: str) -> None:
    """Print the path of the newest complete checkpoint in DIR.

    Exits 1 with a message on stderr when there is none (or DIR does not exist yet)."""
    found = _open(directory, prefix).latest()
    if found is None:
        why = "does not exist" if not os.path.exists(directory) else "holds no complete checkpoint"
        click.echo(f"hpresilience: {directory} {why}", err=True)
        sys.exit(1)
    click.echo(json.dumps(_as_dict(found)) if as_json else os.path.abspath(found.path))


@checkpoint.command(name="list")
@click.argument("directory", metavar="DIR")
@json_option
@prefix_option
def list_(directory: str, as_json: bool, prefix: str) -> None:
    """Print the complete checkpoints in DIR, oldest first, one path a line (none: no output)."""
    found = _open(directory, prefix).list()
    if as_json:
        click.echo(json.dumps([_as_dict(c) for c in found]))
    else:
        for c in found:
            click.echo(os.path.abspath(c.path))
