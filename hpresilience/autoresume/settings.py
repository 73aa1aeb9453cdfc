"""Auto-resume settings: defaults, an optional TOML file, then the environment.

    /etc/hpresilience/auto-resume.toml (or $HPR_AUTO_RESUME_CONFIG):
    [auto_resume]
    max_attempts = 3

Environment (wins over the file): HPR_AUTO_RESUME_MAX_ATTEMPTS,
HPR_AUTO_RESUME_MAX_REQUEUES, HPR_AUTO_RESUME_POLL_SECONDS, HPR_AUTO_RESUME_STOP_GRACE_SECONDS,
HPR_AUTO_RESUME_FAILURE_WAIT_SECONDS, HPR_AUTO_RESUME_STUCK_STEP_SECONDS, HPR_AUTO_RESUME_HANG_SECONDS,
HPR_AUTO_RESUME_HANG_STARTUP_SECONDS, HPR_AUTO_RESUME_NODE_CHECK_TIMEOUT_SECONDS,
HPR_AUTO_RESUME_NODE_CHECK_COMMAND, HPR_CHECKPOINT_DIR, HPR_STATE_DIR,
HPR_MASTER_PORT, HPR_REAL_SRUN.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional

from ..config import ConfigError, load_dataclass, read_toml

DEFAULT_FILE = Path("/etc/hpresilience/auto-resume.toml")


@dataclass
class AutoResumeSettings:
    max_attempts: int = 3                 # step attempts in all, across requeues (the first run counts)
    max_requeues: int = 6                 # requeues of the job in all, whatever its steps (a step whose argv
                                          # changes on every run gets a fresh budget each time: issue 11 review)
    poll_seconds: float = 1.0             # how often the job's nodes are read while a step runs
    stop_grace_seconds: float = 10.0      # SIGTERM → SIGKILL when a node of the step fails
    failure_wait_seconds: float = 30.0    # after a step failed, how long Slurm may take to show a bad node
    checkpoint_dir: Optional[str] = None  # when set: a retry that did not advance the newest checkpoint stops
    checkpoint_prefix: str = "step-"
    state_dir: Optional[str] = None       # default: $SLURM_SUBMIT_DIR/.hpresilience (must survive a requeue)
    master_port: int = 29500              # MASTER_PORT of attempt 1; +1 per attempt (no TIME_WAIT clash)
    real_srun: Optional[str] = None       # default: the first srun on PATH that is not this shim
    # A killed step still listed this long on a node the job lost without our releasing it is a
    # --no-kill job's ghost (Slurm 22.05 keeps it for good): the job is requeued (issue 11).
    stuck_step_seconds: float = 5.0
    # Hang detection (issue 11), opt-in: a step whose heartbeat and newest checkpoint both stay
    # still this long is stopped, its nodes get the quick check, and it is retried. With only
    # checkpoints as the signal, it must exceed the time between two checkpoints.
    hang_seconds: Optional[float] = None
    hang_startup_seconds: float = 600.0   # before the first progress signal of an attempt (imports, loading)
    node_check_timeout_seconds: float = 300.0
    node_check_command: Optional[str] = None   # shell words; default: hpresilience deepcheck --level quick --json

    def validate(self) -> None:
        if self.max_attempts < 1 or self.max_requeues < 0:
            raise ValueError("max_attempts must be >= 1 and max_requeues >= 0")
        if self.poll_seconds <= 0 or self.stop_grace_seconds < 0 or self.failure_wait_seconds < 0:
            raise ValueError("poll_seconds must be > 0, stop_grace_seconds and failure_wait_seconds >= 0")
        if not 1 <= self.master_port <= 65000:
            raise ValueError(f"master_port {self.master_port} is not a usable port")
        if self.hang_seconds is not None and not self.hang_seconds > 0:
            raise ValueError(f"hang_seconds must be > 0 (or unset: no hang detection), not {self.hang_seconds}")
        if not self.stuck_step_seconds >= 0:
            raise ValueError(f"stuck_step_seconds must be >= 0, not {self.stuck_step_seconds}")
        if not self.hang_startup_seconds > 0 or not self.node_check_timeout_seconds > 0:
            raise ValueError("hang_startup_seconds and node_check_timeout_seconds must be > 0")
        self.node_check_argv()

    def node_check_argv(self) -> Optional[List[str]]:
        """node_check_command split into words; None: the default command (node_check.default_command)."""
        if self.node_check_command is None:
            return None
        try:
            words = shlex.split(self.node_check_command)
        except ValueError as e:
            raise ValueError(f"node_check_command {self.node_check_command!r}: {e}") from None
        if not words:
            raise ValueError("node_check_command is empty (unset it for the default quick check)")
        return words


@dataclass
class _File:
    auto_resume: AutoResumeSettings = dataclasses.field(default_factory=AutoResumeSettings)


_ENV = {
    "HPR_AUTO_RESUME_MAX_ATTEMPTS": ("max_attempts", int),
    "HPR_AUTO_RESUME_MAX_REQUEUES": ("max_requeues", int),
    "HPR_AUTO_RESUME_POLL_SECONDS": ("poll_seconds", float),
    "HPR_AUTO_RESUME_STOP_GRACE_SECONDS": ("stop_grace_seconds", float),
    "HPR_AUTO_RESUME_FAILURE_WAIT_SECONDS": ("failure_wait_seconds", float),
    "HPR_AUTO_RESUME_STUCK_STEP_SECONDS": ("stuck_step_seconds", float),
    "HPR_AUTO_RESUME_HANG_SECONDS": ("hang_seconds", float),
    "HPR_AUTO_RESUME_HANG_STARTUP_SECONDS": ("hang_startup_seconds", float),
    "HPR_AUTO_RESUME_NODE_CHECK_TIMEOUT_SECONDS": ("node_check_timeout_seconds", float),
    "HPR_AUTO_RESUME_NODE_CHECK_COMMAND": ("node_check_command", str),
    "HPR_CHECKPOINT_DIR": ("checkpoint_dir", str),
    "HPR_STATE_DIR": ("state_dir", str),
    "HPR_MASTER_PORT": ("master_port", int),
    "HPR_REAL_SRUN": ("real_srun", str),
}


def load_settings(env: Mapping[str, str]) -> AutoResumeSettings:
    path = Path(env["HPR_AUTO_RESUME_CONFIG"]) if env.get("HPR_AUTO_RESUME_CONFIG") else DEFAULT_FILE
    settings = (load_dataclass(_File, read_toml(path), str(path)).auto_resume
                if env.get("HPR_AUTO_RESUME_CONFIG") or path.exists() else AutoResumeSettings())
    for var, (name, kind) in _ENV.items():
        if env.get(var):
            try:
                setattr(settings, name, kind(env[var]))
            except ValueError:
                raise ConfigError(var, "", f"expected {kind.__name__}, got {env[var]!r}") from None
    try:
        settings.validate()
    except ValueError as e:
        raise ConfigError("auto-resume settings", "", str(e)) from None
    return settings


def state_dir(settings: AutoResumeSettings, env: Mapping[str, str]) -> Path:
    if settings.state_dir:
        return Path(settings.state_dir)
    return Path(env.get("SLURM_SUBMIT_DIR") or os.getcwd()) / ".hpresilience"
