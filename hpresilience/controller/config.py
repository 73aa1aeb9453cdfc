"""The controller's configuration file (TOML), e.g. /etc/hpresilience/controller.toml.

    [controller]
    mode = "automatic"                  # or "manual": report and recommend, change nothing
    state_dir = "/var/lib/hpresilience/controller"
    [limits]
    max_concurrent = 10
    max_percent = 10.0
    [breaker]
    max_new = 20
    window_seconds = 300
    [verify]
    command = ["hpresilience", "check"]
    [provider]
    type = "command"
    replace = ["/usr/local/sbin/replace-node", "{node}"]

Every key is optional; docs/controller.md lists them all with their defaults.
Argument lists are argv, never a shell line; ``{node}`` and ``{reason}`` in an
argument are replaced by the node name and its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..config import load_file, validate_daemon_settings

DEFAULT_CONFIG_PATH = Path("/etc/hpresilience/controller.toml")
MODES = ("automatic", "manual")
PROVIDERS = ("none", "command", "power-save", "spare-pool")
PLACEHOLDERS = ("{node}", "{reason}", "{action}", "{level}")
LEVELS = ("quick", "standard", "full")


def expand_argv(argv: List[str], **values: str) -> List[str]:
    """Fill ``{node}``-style placeholders in each argument; nothing else is interpreted.

    >>> expand_argv(["ipmi-cycle", "--host", "{node}-bmc"], node="gpu7")
    ['ipmi-cycle', '--host', 'gpu7-bmc']
    """
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", value)
        out.append(arg)
    return out


def _check_argv(name: str, argv: List[str], required: bool) -> None:
    if required and not argv:
        raise ValueError(f"{name} must name a program to run")
    if argv and not argv[0].strip():
        raise ValueError(f"{name}[0] is empty")


@dataclass
class ControllerSection:
    mode: str = "automatic"                 # automatic | manual
    dry_run: bool = False                   # decide, journal and log; never change Slurm or run a provider
    state_dir: str = "/var/lib/hpresilience/controller"   # journal.sqlite, controller.lock
    poll_interval_seconds: float = 2.0      # one reconcile pass per interval
    slurm_timeout_seconds: float = 15.0     # per scontrol call; a pass retries on the next interval
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 9465                # 0 turns the Prometheus endpoint off
    # srun --auto-resume's state_dir when it is set cluster-wide to a directory shared with this
    # host: its events files feed hpr_autoresume_* (issue 12). Empty: no auto-resume metrics.
    autoresume_state_dir: str = ""
    log_level: str = "info"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0 < self.poll_interval_seconds <= 60:
            raise ValueError("poll_interval_seconds must be in (0, 60]")
        if self.slurm_timeout_seconds <= 0:
            raise ValueError("slurm_timeout_seconds must be > 0")
        validate_daemon_settings(self.metrics_port, self.log_level)


@dataclass
class LimitsConfig:
    """Remediations in flight at once (reboots, replacements, power cycles).
    Both limits apply; a partition's share is at least one node."""
    max_concurrent: int = 10
    max_percent: float = 10.0               # of the nodes of any partition the node is in

    def validate(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if not 0 < self.max_percent <= 100:
            raise ValueError("max_percent must be in (0, 100]")


@dataclass
class BreakerConfig:
    """More than `max_new` nodes flagged within `window_seconds` looks like a
    driver, network or controller event rather than that many hardware faults:
    automatic action pauses until an admin runs `hpresilience controller resume`."""
    enabled: bool = True
    max_new: int = 20
    window_seconds: float = 300.0

    def validate(self) -> None:
        if self.max_new < 1 or self.window_seconds <= 0:
            raise ValueError("max_new must be >= 1 and window_seconds > 0")


@dataclass
class WorkflowConfig:
    drain_timeout_seconds: float = 0.0          # 0: wait for jobs as long as they run
    reboot_timeout_seconds: float = 900.0       # no new BootTime after a reboot or power cycle → escalate to Replace
    register_timeout_seconds: float = 3600.0    # a replaced node must register (new BootTime) by then
    refault_window_seconds: float = 3600.0      # the same fault flagged for Reboot again within this → Replace
    unresponsive_grace_seconds: float = 600.0   # NOT_RESPONDING this long → power cycle (if the provider can)
    power_cycle_unresponsive: bool = True

    def validate(self) -> None:
        for name in ("drain_timeout_seconds", "reboot_timeout_seconds", "register_timeout_seconds",
                     "refault_window_seconds", "unresponsive_grace_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass
class VerifyConfig:
    """Before a node returns to service, its own check runs on it through Slurm
    (`srun -w NODE` inside a maintenance reservation that keeps users off)."""
    enabled: bool = True
    command: List[str] = field(default_factory=lambda: ["hpresilience", "check"])
    timeout_seconds: float = 300.0
    reservation_prefix: str = "hpr_verify_"
    srun: List[str] = field(default_factory=lambda: ["srun"])   # e.g. ["srun", "--account=ops"]

    def validate(self) -> None:
        _check_argv("verify.command", self.command, required=self.enabled)
        _check_argv("verify.srun", self.srun, required=self.enabled)
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be > 0")
        if not self.reservation_prefix or not self.reservation_prefix.replace("_", "").replace("-", "").isalnum():
            raise ValueError("reservation_prefix must be letters, digits, '_' or '-'")


def _default_gate_timeouts() -> Dict[str, float]:
    # DCGM's own figures: level 1 seconds, 2 about 2 minutes, 3 about 15 (HyperPod allows 30/60/180 min).
    return {"quick": 900.0, "standard": 3600.0, "full": 14400.0}


@dataclass
class GateConfig:
    """Deep checks (`hpresilience deepcheck`) run on the node in the maintenance
    reservation after its own check passed and before it is released (issue 10).
    A failure escalates (reboot -> replace -> a human); "none" turns a gate off."""
    after_reboot: str = "quick"
    after_power_cycle: str = "quick"
    after_replace: str = "full"
    command: List[str] = field(default_factory=lambda: ["hpresilience", "deepcheck", "--json", "--level", "{level}"])
    timeout_seconds: Dict[str, float] = field(default_factory=_default_gate_timeouts)
    hold_new_nodes: bool = False            # nodes that never passed a deep check are held until they do
    new_node_level: str = "full"

    def level_after(self, action: str) -> Optional[str]:
        """The level the gate runs after `action` (a NodeAction value, or "admit"), None when off."""
        level = {"reboot": self.after_reboot, "power_cycle": self.after_power_cycle,
                 "replace": self.after_replace, "admit": self.new_node_level}.get(action, "none")
        return None if level == "none" else level

    def validate(self) -> None:
        for name in ("after_reboot", "after_power_cycle", "after_replace", "new_node_level"):
            if getattr(self, name) not in (*LEVELS, "none"):
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(LEVELS)} or none")
        _check_argv("deepcheck.command", self.command, required=True)
        if "{level}" not in self.command or "--json" not in self.command:
            raise ValueError("command must pass --json and {level} (the gate reads the JSON report of that level)")
        for level, seconds in self.timeout_seconds.items():
            if level not in LEVELS or seconds <= 0:
                raise ValueError(f"timeout_seconds.{level}: expected quick, standard or full with seconds > 0")
        # A partial table overrides those levels only.
        self.timeout_seconds = {**_default_gate_timeouts(), **self.timeout_seconds}
        if self.hold_new_nodes and self.new_node_level == "none":
            raise ValueError("hold_new_nodes needs a new_node_level (holding nodes for no check admits them unchecked)")


@dataclass
class ProviderConfig:
    """How a node is replaced or power-cycled.

    - none: Replace leaves the node out for an admin (reason says so).
    - command: run `replace` / `power_cycle` (argv) with the node name.
    - power-save: Slurm POWER_DOWN_FORCE then POWER_UP; ResumeProgram brings
      up a fresh instance under the same name (cloud).
    - spare-pool: release an idle node from `spare_reservation` into service
      and keep the broken one out until it is repaired."""
    type: str = "none"
    replace: List[str] = field(default_factory=list)
    power_cycle: List[str] = field(default_factory=list)
    timeout_seconds: float = 600.0
    attempts: int = 3
    retry_delay_seconds: float = 10.0
    spare_reservation: str = "hpr_spares"
    power_down_timeout_seconds: float = 300.0   # power-save: POWERED_DOWN must be reached by then

    def validate(self) -> None:
        if self.type not in PROVIDERS:
            raise ValueError(f"type {self.type!r}: expected one of {', '.join(PROVIDERS)}")
        _check_argv("provider.replace", self.replace, required=self.type == "command")
        _check_argv("provider.power_cycle", self.power_cycle, required=False)
        if self.timeout_seconds <= 0 or self.attempts < 1 or self.retry_delay_seconds < 0:
            raise ValueError("timeout_seconds must be > 0, attempts >= 1, retry_delay_seconds >= 0")


@dataclass
class ControllerConfig:
    controller: ControllerSection = field(default_factory=ControllerSection)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    deepcheck: GateConfig = field(default_factory=GateConfig)

    @classmethod
    def load(cls, path: Optional[Path]) -> ControllerConfig:
        return load_file(cls, path)

    @property
    def journal_path(self) -> Path:
        return Path(self.controller.state_dir) / "journal.sqlite"

    @property
    def lock_path(self) -> Path:
        return Path(self.controller.state_dir) / "controller.lock"
