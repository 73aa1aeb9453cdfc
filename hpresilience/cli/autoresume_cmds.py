"""`hpresilience _srun` (behind the srun shim) and `hpresilience nodes`."""
from __future__ import annotations

import json
import os
import sys
from typing import Optional, Tuple

import click


@click.command("_srun", hidden=True, context_settings={"ignore_unknown_options": True,
                                                       "allow_interspersed_args": False,
                                                       "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def srun_shim(args: Tuple[str, ...]) -> None:
    """srun with --auto-resume (called by scripts/srun)."""
    from ..autoresume.shim import main
    sys.exit(main(list(args)))


@click.command()
@click.option("--job", "job_id", type=int, help="Job id (default: $SLURM_JOB_ID).")
@click.option("--master-addr", "what", flag_value="master", help="The first healthy node's address.")
@click.option("--list", "what", flag_value="list", help="Healthy nodes as a Slurm hostlist (n[1-3]).")
@click.option("--count", "what", flag_value="count", help="How many healthy nodes.")
@click.option("--hostfile", "what", flag_value="hostfile", help="Healthy nodes, one per line.")
@click.option("--json", "what", flag_value="json", help="Everything as JSON.")
def nodes(job_id: Optional[int], what: Optional[str]) -> None:
    """The job's healthy nodes as Slurm sees them now (not the stale $SLURM_JOB_NODELIST).

    Without an option, prints shell assignments: eval "$(hpresilience nodes)"."""
    from ..autoresume.allocation import Allocation
    from ..slurm import SlurmError, SlurmGateway
    from ..slurm.hostlist import fold
    job_id = job_id or int(os.environ.get("SLURM_JOB_ID") or 0)
    if not job_id:
        raise click.UsageError("no job: run inside an allocation or pass --job")
    try:
        alloc = Allocation.read(SlurmGateway(), job_id)
    except SlurmError as e:
        click.echo(f"hpresilience nodes: {e}", err=True)
        sys.exit(2)
    healthy = alloc.healthy
    if not healthy:
        click.echo(f"hpresilience nodes: job {job_id} has no healthy nodes", err=True)
        sys.exit(1)
    master = alloc.address(healthy[0])
    if what == "master":
        click.echo(master)
    elif what == "list":
        click.echo(fold(healthy))
    elif what == "count":
        click.echo(len(healthy))
    elif what == "hostfile":
        click.echo("\n".join(healthy))
    elif what == "json":
        click.echo(json.dumps({"job": job_id, "nodes": healthy, "nodelist": fold(healthy), "count": len(healthy),
                               "master_addr": master, "bad": alloc.bad}))
    else:
        click.echo(f"HPR_NODELIST={fold(healthy)}\nHPR_NNODES={len(healthy)}\nMASTER_ADDR={master}")
