"""The drill's configuration (TOML), e.g. /etc/hpresilience/drill.toml: how the drill reaches
what it must disturb on this site. Argument lists are argv, never a shell line; `{node}`,
`{code}` and `{drill}` in an argument are replaced by the node, the finding code and the drill id.

    [commands]
    inject = ["ssh", "{node}", "hpresilience", "agent", "inject", "{code}", "--drill", "{drill}"]
    power_off = ["ipmitool", "-H", "{node}-bmc", "-U", "admin", "-E", "chassis", "power", "off"]
    restart_slurmctld = ["systemctl", "restart", "slurmctld"]
    kill_controller = ["systemctl", "kill", "--signal=KILL", "hpresilience-controller"]
    start_controller = []        # empty: systemd's Restart= brings the controller back
    [canary]
    steps = 40
    step_seconds = 0.5

A scenario whose command is empty is reported "not run: not configured", never passed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..config import load_dataclass, read_toml

DEFAULT_CONFIG_PATH = Path("/etc/hpresilience/drill.toml")


def _inject_default() -> List[str]:
    return ["ssh", "{node}", "hpresilience", "agent", "inject", "{code}", "--drill", "{drill}"]


@dataclass
class DrillCommands:
    inject: List[str] = field(default_factory=_inject_default)
    power_off: List[str] = field(default_factory=list)     # the node loses power; the controller's provider
                                                           # power-cycles it back (its unresponsive path)
    restart_slurmctld: List[str] = field(default_factory=lambda: ["systemctl", "restart", "slurmctld"])
    kill_controller: List[str] = field(default_factory=lambda: ["systemctl", "kill", "--signal=KILL",
                                                                "hpresilience-controller"])
    start_controller: List[str] = field(default_factory=list)
    timeout_seconds: float = 60.0                           # each command

    def validate(self) -> None:
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        for name in ("inject", "power_off", "restart_slurmctld", "kill_controller", "start_controller"):
            argv = getattr(self, name)
            if argv and not argv[0].strip():
                raise ValueError(f"{name}[0] is empty")


@dataclass
class CanaryConfig:
    """The canary job: `srun --auto-resume` of the stand-in trainer (hpresilience.drill.canary)."""
    steps: int = 40
    step_seconds: float = 0.5
    checkpoint_every: int = 2
    python: str = sys.executable            # a python with hpresilience, on every node
    partition: Optional[str] = None
    # The admin's own batch script instead of the stand-in: it must run its training with
    # `srun --auto-resume`; the drill times its resume by the runner's events, and can check only
    # that the job completed (its steps are not known).
    sbatch: str = ""

    def validate(self) -> None:
        if self.steps < 10 or self.step_seconds <= 0 or not 1 <= self.checkpoint_every < self.steps:
            raise ValueError("steps must be >= 10, step_seconds > 0, 1 <= checkpoint_every < steps")
        if self.sbatch and not Path(self.sbatch).is_file():
            raise ValueError(f"sbatch {self.sbatch!r} is not a file")


@dataclass
class DrillConfig:
    commands: DrillCommands = field(default_factory=DrillCommands)
    canary: CanaryConfig = field(default_factory=CanaryConfig)
    scenario_timeout_seconds: float = 600.0     # fault to the canary's end and the node back in service

    def validate(self) -> None:
        if self.scenario_timeout_seconds <= 0:
            raise ValueError("scenario_timeout_seconds must be > 0")

    @classmethod
    def load(cls, path: Optional[Path]) -> DrillConfig:
        """The file at `path` (DEFAULT_CONFIG_PATH when None and it exists), else the defaults."""
        if path is None and not DEFAULT_CONFIG_PATH.exists():
            return cls()
        path = path or DEFAULT_CONFIG_PATH
        return load_dataclass(cls, read_toml(path), str(path))
