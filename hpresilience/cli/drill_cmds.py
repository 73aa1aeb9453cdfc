"""`hpresilience drill`: a resilience drill on a live cluster (issue 13). An admin's command, on the
controller host: it submits canary jobs and injects real faults on the nodes it is given."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

import click


@click.command()
@click.option("--nodes", help="Idle nodes to drill on (a Slurm hostlist, 3 or more).")
@click.option("--scenario", "scenarios", multiple=True, metavar="NAME",
              help="Run only these scenarios (repeat); default: all, in order.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Drill configuration (default /etc/hpresilience/drill.toml when it exists).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where the canaries run and the reports go; on a file system the nodes share. "
                   "Default: ./hpr-drill-<id>.")
@click.option("--id", "drill_id", help="The drill's id, in reasons, logs and history (default d-<date>-<time>).")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
def drill(nodes: Optional[str], scenarios: Tuple[str, ...], config_path: Optional[Path], out_dir: Optional[Path],
          drill_id: Optional[str], list_only: bool) -> None:
    """Inject faults under a canary `srun --auto-resume` job and report what was recovered, how fast,
    and that nothing was lost. Exit 0 when every scenario and invariant passed."""
    from ..config import ConfigError
    from ..drill.config import DrillConfig
    from ..drill.engine import SCENARIOS, Drill, DrillError
    from ..drill.report import render_markdown, write_reports
    from ..slurm import SlurmError, SlurmGateway
    from ..slurm.hostlist import expand
    if list_only:
        for s in SCENARIOS.values():
            click.echo(f"{s.name:20} {s.title}")
        return
    if not nodes:
        raise click.UsageError("--nodes is required (idle nodes to drill on, 3 or more)")
    try:
        config = DrillConfig.load(config_path)
        node_list = expand(nodes)
        engine = Drill(SlurmGateway(), config, node_list, Path("."), drill_id)
        engine.work = (out_dir or Path(f"hpr-drill-{engine.id}")).resolve()
        result = engine.run(list(scenarios) or list(SCENARIOS))
    except (ConfigError, DrillError, SlurmError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    paths = write_reports(result, engine.work)
    click.echo(render_markdown(result))
    click.echo(f"drill {result.drill}: {'PASSED' if result.passed else 'FAILED'}; reports: "
               + ", ".join(str(p) for p in paths))
    sys.exit(0 if result.passed else 1)
