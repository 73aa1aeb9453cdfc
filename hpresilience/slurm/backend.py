"""The backend seam: how the gateway talks to Slurm.

`ScontrolBackend` (Slurm's CLI tools) is the default and the one tested. A
pyslurm backend can implement the same protocol later; PyPI's pyslurm only
builds against Slurm 25.11 and has no reboot call, so it cannot be the only
path on the 22.05-24.x clusters people run today."""
from __future__ import annotations

from typing import List, Optional, Protocol, Tuple

from .models import Job, Node
from .runner import CommandRunner, Target
from .scontrol_parse import parse_jobs, parse_nodes, parse_version


class SlurmBackend(Protocol):
    def version(self) -> Tuple[int, int, int]: ...
    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]: ...
    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]: ...
    def update_nodes(self, nodes: str, state: str, reason: Optional[str]) -> None: ...
    def reboot_nodes(self, nodes: str, asap: bool, next_state: Optional[str], reason: Optional[str]) -> None: ...
    def requeue_job(self, job_id: int) -> None: ...
    def update_job(self, job_id: int, fields: List[Tuple[str, str]]) -> None: ...


class ScontrolBackend:
    """Reads with `scontrol -o show` (see scontrol_parse for why), writes with
    `scontrol update|reboot|requeue`. argv lists only: nothing passes a shell."""

    def __init__(self, runner: Optional[CommandRunner] = None, scontrol: str = "scontrol"):
        self.runner = runner or CommandRunner()
        self.scontrol = scontrol

    def _run(self, *args: str, target: Optional[Target] = None) -> str:
        return self.runner.run([self.scontrol, *args], target or Target())

    def version(self) -> Tuple[int, int, int]:
        return parse_version(self._run("--version"))

    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]:
        args = ["-o", "show", "node"] + ([nodes] if nodes else [])
        return parse_nodes(self._run(*args, target=Target(node=nodes)))

    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]:
        args = ["-o", "show", "job"] + ([str(job_id)] if job_id is not None else [])
        out = self._run(*args, target=Target(job=str(job_id) if job_id is not None else None))
        if out.strip() == "No jobs in the system":
            return []
        return parse_jobs(out)

    def update_nodes(self, nodes: str, state: str, reason: Optional[str]) -> None:
        args = ["update", f"nodename={nodes}", f"state={state}"] + ([f"reason={reason}"] if reason else [])
        self._run(*args, target=Target(node=nodes))

    def reboot_nodes(self, nodes: str, asap: bool, next_state: Optional[str], reason: Optional[str]) -> None:
        args = ["reboot"] + (["ASAP"] if asap else [])
        args += [f"nextstate={next_state}"] if next_state else []
        args += [f"reason={reason}"] if reason else []
        self._run(*args, nodes, target=Target(node=nodes))

    def requeue_job(self, job_id: int) -> None:
        self._run("requeue", str(job_id), target=Target(job=str(job_id)))

    def update_job(self, job_id: int, fields: List[Tuple[str, str]]) -> None:
        self._run("update", f"jobid={job_id}", *(f"{k}={v}" for k, v in fields), target=Target(job=str(job_id)))
