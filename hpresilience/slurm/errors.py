"""Typed errors of the Slurm gateway.

Transient errors (the controller is unreachable or slow) are retried by the
gateway; every other error is permanent and raised at once, naming what it was
about, so callers can tell "Slurm said no" from "Slurm did not answer"."""
from __future__ import annotations

from typing import Optional, Sequence


class SlurmError(Exception):
    """Base of every error the gateway raises."""


class SlurmNotInstalled(SlurmError):
    def __init__(self, program: str):
        super().__init__(
            f"{program} not found on PATH: install the Slurm client tools "
            f"(Debian/Ubuntu: apt-get install slurm-client; RHEL: dnf install slurm)"
        )
        self.program = program


class SlurmCommandError(SlurmError):
    """Slurm refused a command; retrying would not help."""

    def __init__(self, argv: Sequence[str], returncode: Optional[int], stderr: str, what: str = ""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.what = what
        about = f" ({what})" if what else ""
        super().__init__(f"{' '.join(self.argv)} failed{about}: {self.stderr or f'exit {returncode}'}")


class SlurmUnavailable(SlurmCommandError):
    """slurmctld could not be reached or timed out: transient, retried."""


class NodeNotFound(SlurmCommandError):
    def __init__(self, node: str, argv: Sequence[str], stderr: str):
        super().__init__(argv, 1, stderr, what=f"unknown node {node}")
        self.node = node


class JobNotFound(SlurmCommandError):
    def __init__(self, job_id: str, argv: Sequence[str], stderr: str):
        super().__init__(argv, 1, stderr, what=f"unknown job {job_id}")
        self.job_id = job_id


class PermissionDenied(SlurmCommandError):
    pass


class StepNodeUnreachable(SlurmCommandError):
    """slurmctld signalled a step but one of its nodes did not answer (a dead node): the
    step's other nodes got the signal (seen on 22.05, issue 11), and retrying cannot help."""


class InvalidNodeName(SlurmError, ValueError):
    """A node name or hostlist expression that cannot be valid."""

    def __init__(self, text: str, why: str):
        super().__init__(f"invalid node name or hostlist {text!r}: {why}")
        self.text = text


class ParseError(SlurmError):
    """Slurm printed something this gateway cannot read."""

    def __init__(self, what: str, text: str):
        super().__init__(f"cannot parse {what}: {text[:200]!r}")
        self.text = text
