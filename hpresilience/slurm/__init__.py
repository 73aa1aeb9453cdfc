"""The Slurm gateway: every read and change of Slurm state goes through here."""
from .backend import ScontrolBackend, SlurmBackend
from .errors import (
                     InvalidNodeName,
                     JobNotFound,
                     NodeNotFound,
                     ParseError,
                     PermissionDenied,
                     SlurmCommandError,
                     SlurmError,
                     SlurmNotInstalled,
                     SlurmUnavailable,
                     StepNodeUnreachable,
)
from .gateway import NodeState, ReasonNotOurs, SlurmGateway
from .hostlist import expand, fold, nodeset
from .models import Job, Node
from .reason import ActionReason, Fault, ReasonOwner, format_reason, parse_reason, sanitize_reason
from .runner import CommandRunner

__all__ = [
    "ActionReason", "CommandRunner", "Fault", "InvalidNodeName", "Job", "JobNotFound", "Node", "NodeNotFound",
    "NodeState", "ParseError", "PermissionDenied", "ReasonNotOurs", "ReasonOwner", "ScontrolBackend", "SlurmBackend",
    "SlurmCommandError", "SlurmError", "SlurmGateway", "SlurmNotInstalled", "SlurmUnavailable",
    "StepNodeUnreachable", "expand", "fold",
    "format_reason", "nodeset", "parse_reason", "sanitize_reason",
]
