"""The `hpresilience` command."""
from __future__ import annotations

import click

from .. import __version__
from ..log import configure
from .agent_cmds import agent, check, classify
from .autoresume_cmds import nodes, srun_shim
from .checkpoint_cmds import checkpoint
from .controller_cmds import controller
from .deepcheck_cmds import deepcheck
from .drill_cmds import drill
from .goodput_cmds import goodput
from .slurm_cmds import slurm
from .status_cmds import history, status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpresilience")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Log events at or above this level.")
@click.option("--log-format", default="json", show_default=True, type=click.Choice(["json", "console"]))
def main(log_level: str, log_format: str) -> None:
    """Resiliency for Slurm GPU clusters: detect, remediate, auto-resume."""
    configure(level=log_level, json=log_format == "json")


for command in (slurm, agent, check, classify, deepcheck, controller, status, history, checkpoint, nodes, srun_shim,
                drill, goodput):
    main.add_command(command)
