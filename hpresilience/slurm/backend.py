"""The backend seam: how the gateway talks to Slurm.

`ScontrolBackend` (Slurm's CLI tools) is the default and the one tested. A
pyslurm backend can implement the same protocol later; PyPI's pyslurm only
builds against Slurm 25.11 and has no reboot call, so it cannot be the only
path on the 22.05-24.x clusters people run today."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import structlog

from .errors import JobNotFound, SlurmCommandError, SlurmError, SlurmNotInstalled
from .models import Job, Node, RequeuedJob, Reservation, Step, StepResult
from .runner import CommandRunner, Target
from .scontrol_parse import (
    JOB_TABLE_FIELDS,
    PENDING_JOB_FIELDS,
    USER_TEXT_FIELDS,
    has_expedited_requeue,
    job_from_record,
    parse_job_table,
    parse_nodes,
    parse_pending_jobs,
    parse_reservations,
    parse_slurm_user,
    parse_steps,
    parse_user_text_one,
    parse_user_text_table,
    parse_version,
    squeue_format,
)

log = structlog.get_logger(__name__)

STEP_OUTPUT_LIMIT = 64 * 1024  # a check's output is a few lines; garbage is cut, not buffered


class SlurmBackend(Protocol):
    def version(self) -> Tuple[int, int, int]: ...
    def slurm_user(self) -> str: ...
    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]: ...
    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]: ...
    def update_nodes(self, nodes: str, state: str, reason: Optional[str]) -> None: ...
    def reboot_nodes(self, nodes: str, asap: bool, next_state: Optional[str], reason: Optional[str]) -> None: ...
    def requeue_job(self, job_id: int) -> None: ...
    def job_comment(self, job_id: int) -> str: ...
    def expedited_requeue(self, job_id: int) -> bool: ...
    def update_job(self, job_id: int, fields: List[Tuple[str, str]]) -> None: ...
    def show_reservations(self) -> List[Reservation]: ...
    def create_reservation(self, fields: List[Tuple[str, str]]) -> None: ...
    def update_reservation(self, name: str, fields: List[Tuple[str, str]]) -> None: ...
    def delete_reservation(self, name: str) -> None: ...
    def run_step(self, srun_argv: Sequence[str], timeout: float) -> StepResult: ...
    def show_steps(self, job_id: int) -> List[Step]: ...
    def requeued_jobs(self) -> List[RequeuedJob]: ...
    def signal_step(self, step_id: str, signal_name: str) -> None: ...
    def submit_batch(self, argv: Sequence[str], name: str) -> int: ...
    def job_ids_named(self, name: str) -> List[int]: ...
    def cancel_job(self, job_id: int) -> None: ...


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

    def slurm_user(self) -> str:
        """SlurmUser from `scontrol show config` ("SlurmUser = slurm(64030)"): the writer
        of the reasons slurmctld sets itself."""
        return parse_slurm_user(self._run("show", "config"))

    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]:
        args = ["-o", "show", "node"] + ([nodes] if nodes else [])
        return parse_nodes(self._run(*args, target=Target(node=nodes)))

    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]:
        """Jobs in any state, read so that no user text can forge a field (issue 11, deliverable 6):
        what only Slurm writes from one `squeue` table, then the job name, and for one job also its
        Comment, WorkDir and StdOut, each field in a read of its own (see
        scontrol_parse.parse_user_text_table). All jobs come without Comment, WorkDir and StdOut:
        a busy cluster's comments are megabytes that no caller of jobs() reads."""
        records = parse_job_table(self._squeue([f for f, _ in JOB_TABLE_FIELDS], job_id))
        job_ids = [int(r["JobId"]) for r in records]
        for field in ["Name"] if job_id is None else list(USER_TEXT_FIELDS):
            values = self._user_text(field, job_ids, shared=job_id is None)
            for record, one in zip(records, job_ids):
                if one in values:
                    record[USER_TEXT_FIELDS[field]] = values[one]
        return [job_from_record(r) for r in records]

    def _squeue(self, fields: List[str], job_id: Optional[int]) -> str:
        args = ["squeue", "--noheader", "--all", "--states=all", squeue_format(fields)]
        args += [f"--jobs={job_id}"] if job_id is not None else []
        return self.runner.run(args, Target(job=str(job_id) if job_id is not None else None))

    def _user_text(self, field: str, job_ids: List[int], shared: bool) -> Dict[int, str]:
        """One user-text field of these jobs: from one table of all jobs where no other job's text
        can have forged a line (shared), and alone for each job left (newlines in its own value, a
        line forged for it)."""
        found = parse_user_text_table(self._squeue(["JobID", field], None), set(job_ids)) if shared else {}
        for job_id in (j for j in job_ids if j not in found):
            try:
                found[job_id] = parse_user_text_one(self._squeue(["JobID", field], job_id), job_id)
            except JobNotFound:
                continue  # gone meanwhile
        return found

    def job_comment(self, job_id: int) -> str:
        """The job's own Comment, all of it ("" for none)."""
        return parse_user_text_one(self._squeue(["JobID", "Comment"], job_id), job_id)

    def expedited_requeue(self, job_id: int) -> bool:
        """Submitted with --requeue=expedite: Slurm 25.11+ shows ExpeditedRequeue=Yes in `scontrol show job`."""
        out = self._run("-o", "show", "job", str(job_id), target=Target(job=str(job_id)))
        return has_expedited_requeue(out)

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

    def show_reservations(self) -> List[Reservation]:
        return parse_reservations(self._run("-o", "show", "reservation"))

    def create_reservation(self, fields: List[Tuple[str, str]]) -> None:
        self._run("create", "reservation", *(f"{k}={v}" for k, v in fields))

    def update_reservation(self, name: str, fields: List[Tuple[str, str]]) -> None:
        self._run("update", f"reservationname={name}", *(f"{k}={v}" for k, v in fields))

    def delete_reservation(self, name: str) -> None:
        self._run("delete", f"reservationname={name}")

    def run_step(self, srun_argv: Sequence[str], timeout: float) -> StepResult:
        """Run srun to completion or `timeout`; on timeout the whole process group
        (srun and what it started locally) is killed, and Slurm ends the step."""
        try:
            proc = subprocess.Popen(list(srun_argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=self.runner.env)
        except FileNotFoundError as e:
            raise SlurmNotInstalled(srun_argv[0]) from e
        try:
            out, _ = proc.communicate(timeout=timeout)
            returncode: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            returncode = None
        return StepResult(returncode, out[-STEP_OUTPUT_LIMIT:].decode("utf-8", "replace"))

    def show_steps(self, job_id: int) -> List[Step]:
        try:
            return parse_steps(self._run("-o", "show", "step", str(job_id), target=Target(job=str(job_id))))
        except SlurmCommandError as e:
            if "not found" in e.stderr.lower():  # "Job step 12. not found": none (left)
                return []
            raise

    def signal_step(self, step_id: str, signal_name: str) -> None:
        self.runner.run(["scancel", f"--signal={signal_name}", step_id], Target(job=step_id))

    def submit_batch(self, argv: Sequence[str], name: str) -> int:
        """`sbatch --parsable --job-name=NAME ARGV...`: the new job's id ("ID" or "ID;CLUSTER").

        Never retried blindly: an sbatch that timed out may have submitted the job all the same, and
        a second one would run it twice (issue 13's known limit, fixed in the issue 14 session). Before
        each retry the job is looked for by its name, which the caller makes unique; a submission still
        in a busy slurmctld's backlog can escape that look, so after a retry the jobs of that name are
        counted again and all but the oldest cancelled: at most one is left. The look-up before a
        retry is a single try, so one retry policy bounds the time until the job is found or sbatch
        runs again."""
        tried = False

        def attempt() -> int:
            nonlocal tried
            if tried:
                found = self.job_ids_named(name, retry=False)
                if found:
                    log.warning("slurm.submit_found", name=name, job=found[0],
                                detail="an sbatch that failed had submitted the job: not submitted again")
                    return found[0]
            retry, tried = tried, True
            out = self.runner.once(["sbatch", "--parsable", f"--job-name={name}", *argv], Target())
            job_id = int(out.strip().split(";")[0])
            if retry:
                job_id = self._keep_oldest(name, job_id)
            return job_id
        return self.runner.retrying(["sbatch", name])(attempt)

    def _keep_oldest(self, name: str, submitted: int) -> int:
        found = self.job_ids_named(name)
        for twin in found[1:]:
            log.warning("slurm.submit_twin_cancelled", name=name, kept=found[0], cancelled=twin)
            self.cancel_job(twin)
        return found[0] if found else submitted

    def job_ids_named(self, name: str, retry: bool = True) -> List[int]:
        """Ids of the jobs called `name`, in any state and partition Slurm still shows, oldest first.
        squeue's %i is "123", an array task "123_4" or "123_[5-9]", a heterogeneous job's part "123+0"."""
        # --all: jobs in hidden partitions and other clusters' federated jobs are shown too.
        argv = ["squeue", "--noheader", "--all", "--states=all", f"--name={name}", "--format=%i"]
        out = (self.runner.run if retry else self.runner.once)(argv, Target())
        return sorted({int(m.group(1)) for m in (re.match(r"(\d+)", word) for word in out.split()) if m})

    def cancel_job(self, job_id: int) -> None:
        self.runner.run(["scancel", str(job_id)], Target(job=str(job_id)))

    def requeued_jobs(self) -> List[RequeuedJob]:
        """Requeued jobs that wait for their BeginTime, with their comments.

        One small `squeue` read of fields users cannot write (id, pending reason, restart
        count: a full `scontrol show job` of a busy cluster is megabytes), then each such
        job's Comment read on its own: a comment may hold newlines and separators, and in
        a shared table it could forge another job's record, which the root controller
        would then update (issue 9, defect 12). Alone, whatever it holds is that job's."""
        out = self.runner.run(["squeue", "--noheader", "--states=PD", PENDING_JOB_FIELDS], Target())
        found = []
        for job_id, reason, restarts, submitted in parse_pending_jobs(out):
            if reason != "BeginTime" or restarts < 1:
                continue
            try:
                comment = self.job_comment(job_id)
            except SlurmError:
                continue  # gone meanwhile (purged), or this one read failed: the others still count
            found.append(RequeuedJob(job_id, restarts, comment, submitted))
        return found
