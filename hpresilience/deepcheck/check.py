"""The one interface every deep check implements (issue 10).

Collection apart from evaluation: `collect` runs the tool or the workload and
returns what it observed (parsed, raw numbers); `evaluate` is pure and compares
that with the parameters. Tests feed captured real outputs to `evaluate` without
running anything, and thresholds change without re-running a 15-minute tool.

A check's parameters (thresholds and settings) are data keyed by name: the
check declares them with their defaults in `params`; the configuration
overrides them per partition or node feature (config.py).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional

from .result import Level, Verdict


class Skip(Exception):
    """Not applicable here: no such device, tool not installed. Says why."""


class CouldNotRun(Exception):
    """The check could not run (tool hung, crashed, printed something unreadable):
    no verdict about the node. Names the tool and what was wrong."""


@dataclass(frozen=True)
class Context:
    """What a check may know about where it runs."""
    node: str
    level: Level
    params: Mapping[str, Any]
    gpu_count: Optional[int] = None         # expected GPUs (Slurm's Gres or the agent's config), if known
    state_dir: str = "/var/lib/hpresilience/agent"
    env: Mapping[str, str] = field(default_factory=dict)   # extra environment for tools


class Check(abc.ABC):
    """One deep check. Subclasses set `name` and `params`; which levels run it is
    configuration (config.DEFAULT_LEVELS)."""
    name: ClassVar[str]
    params: ClassVar[Mapping[str, Any]] = {}     # parameter name -> default (its type is the default's)

    @abc.abstractmethod
    def collect(self, ctx: Context) -> Any:
        """Run the test; return what was observed. Raise Skip or CouldNotRun."""

    @abc.abstractmethod
    def evaluate(self, observed: Any, params: Mapping[str, Any]) -> Verdict:
        """Pure: the verdict on `observed` under `params`."""


def in_job_script(env: Mapping[str, str]) -> bool:
    """Run by slurmd as a job's prolog or epilog: in slurmd's context, outside the job's cgroup,
    on a node that is this job's alone.

    >>> in_job_script({"SLURM_SCRIPT_CONTEXT": "epilog_slurmd"}), in_job_script({"SLURM_JOB_ID": "7"})
    (True, False)
    """
    return env.get("SLURM_SCRIPT_CONTEXT", "") in ("prolog_slurmd", "epilog_slurmd")


def per_level(value: Any, level: Level) -> Any:
    """A parameter given per level as a table {quick = .., standard = .., full = ..}, or one value for all.

    >>> per_level({"quick": 1, "standard": 2, "full": 3}, Level.STANDARD), per_level(5, Level.FULL)
    (2, 5)
    """
    return value[level.value] if isinstance(value, Mapping) else value


def defaults(check: Check) -> Dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in check.params.items()}
