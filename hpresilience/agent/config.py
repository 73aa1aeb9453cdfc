"""The agent's configuration file (TOML), e.g. /etc/hpresilience/agent.toml.

    [agent]
    state_dir = "/var/lib/hpresilience/agent"
    [kernel_log]
    sources = ["kmsg"]                 # or "journal", or file paths like "/var/log/messages"
    [policy]
    default_state = "fail"
    [policy.thresholds.OOM_SYSTEM]
    count = 3
    window_seconds = 600
    [nvml]
    startup_grace_seconds = 300
    [system]
    writable_mounts = ["/", "/scratch"]       # real mount points only

Every key is optional; docs/agent.md lists them all with their defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..config import load_file, validate_daemon_settings
from ..deepcheck.config import DeepCheckConfig
from .monitors.nvml import NvmlConfig
from .monitors.system import SystemConfig

SLURM_STATES = ("fail", "drain", "down")
MAX_SOCKET_PATH = 107   # Linux's sun_path holds 108 bytes with the closing NUL


@dataclass
class AgentSection:
    node_name: Optional[str] = None          # default: $SLURMD_NODENAME, else the short hostname
    state_dir: str = "/var/lib/hpresilience/agent"
    check_interval_seconds: float = 1.0      # NVML and system checks
    dry_run: bool = False                    # decide and log, never change Slurm
    reverify_seconds: float = 60.0           # a settled decision for a persisting fault is re-checked this often
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 9464                 # 0 turns the Prometheus endpoint off
    log_level: str = "info"
    # The root-only drill injection socket (issue 13, hpresilience/agent/control.py); "" turns it off.
    control_socket: str = "/run/hpresilience/agent.sock"

    def validate(self) -> None:
        if self.check_interval_seconds <= 0:
            raise ValueError("check_interval_seconds must be > 0")
        if self.control_socket and not Path(self.control_socket).is_absolute():
            raise ValueError(f"control_socket {self.control_socket!r}: expected an absolute path, or \"\" for none")
        if len(os.fsencode(self.control_socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"control_socket {self.control_socket!r}: longer than a Unix socket's "
                             f"{MAX_SOCKET_PATH} bytes")
        validate_daemon_settings(self.metrics_port, self.log_level)


@dataclass
class KernelLogConfig:
    sources: List[str] = field(default_factory=lambda: ["kmsg"])
    rules_file: Optional[str] = None          # admin rules merged over the shipped ones, by rule name
    poll_interval_seconds: float = 0.1        # how often new lines are looked for (detection latency)
    max_bytes_per_poll: int = 4 * 1024 * 1024  # bounds memory and CPU per poll in a flood

    def validate(self) -> None:
        if not 0 < self.poll_interval_seconds <= 10:
            raise ValueError("poll_interval_seconds must be in (0, 10]")
        if self.max_bytes_per_poll < 64 * 1024:
            raise ValueError("max_bytes_per_poll must be at least 65536")


@dataclass
class Threshold:
    """A finding counts only after `count` occurrences within `window_seconds`."""
    count: int = 1
    window_seconds: float = 600.0

    def validate(self) -> None:
        if self.count < 1 or self.window_seconds <= 0:
            raise ValueError("count must be >= 1 and window_seconds > 0")


def _default_thresholds() -> Dict[str, Threshold]:
    # BRIEF §6: a system OOM is a node fault only when it repeats. A hung task too:
    # a stalled NFS/Lustre server makes every client log one, and one line each must
    # not fail the whole cluster (NHC's batch drains).
    return {"OOM_SYSTEM": Threshold(count=3, window_seconds=600),
            "HUNG_TASK": Threshold(count=3, window_seconds=900)}


def _default_shared_cause_codes() -> List[str]:
    # Faults one outside event raises on many nodes at once: a storage server stall (hung
    # tasks, filesystems gone or read-only), a leaf switch reboot (IB ports), one user's job
    # exhausting memory on every node it runs on (system OOM). Issue 9, defect 8.
    return ["HUNG_TASK", "OOM_SYSTEM", "FS_ERROR", "FS_READONLY", "FS_READ_ONLY", "FS_MISSING",
            "IB_PORT_DOWN", "IB_PORT_MISSING", "IB_LINK_FLAPPING"]


@dataclass
class SharedCauseConfig:
    """The cluster-wide budget for faults with a possible outside cause: before failing
    its node for one of `codes`, an agent counts the nodes of its partitions that already
    carry the same code in their Action: reason (Slurm is the shared state) and only
    reports when `max_percent` of a partition (at least one node) already does."""
    codes: List[str] = field(default_factory=_default_shared_cause_codes)
    max_percent: float = 10.0

    def validate(self) -> None:
        if not 0 < self.max_percent <= 100:
            raise ValueError("shared_cause.max_percent must be in (0, 100]")


@dataclass
class PolicyConfig:
    default_state: str = "fail"               # fail (jobs finish) | drain | down (jobs killed now)
    log_repeat_seconds: float = 300           # the same finding is logged at most once per this
    thresholds: Dict[str, Threshold] = field(default_factory=_default_thresholds)
    slurm_state: Dict[str, str] = field(default_factory=dict)  # finding code -> fail|drain|down
    shared_cause: SharedCauseConfig = field(default_factory=SharedCauseConfig)

    def validate(self) -> None:
        for where, state in [("default_state", self.default_state)] + [
                (f"slurm_state.{code}", s) for code, s in self.slurm_state.items()]:
            if state not in SLURM_STATES:
                raise ValueError(f"{where} {state!r}: expected one of {', '.join(SLURM_STATES)}")


@dataclass
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    kernel_log: KernelLogConfig = field(default_factory=KernelLogConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    nvml: NvmlConfig = field(default_factory=NvmlConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    deepcheck: DeepCheckConfig = field(default_factory=DeepCheckConfig)   # `hpresilience deepcheck` (issue 10)

    @classmethod
    def load(cls, path: Optional[Path]) -> AgentConfig:
        config = load_file(cls, path)
        # Thresholds given in the file replace the defaults one code at a time, not wholesale.
        merged = _default_thresholds()
        merged.update(config.policy.thresholds)
        config.policy.thresholds = merged
        return config
