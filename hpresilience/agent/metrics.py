"""The agent's Prometheus metrics, in their own registry (one per Agent, so
tests and a reload never collide with a previous instance)."""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.check_healthy = Gauge("hpr_agent_check_healthy", "1 if the check's last pass found no fault "
                                   "needing action, 0 if it did, -1 if the check itself failed", ["check"], registry=r)
        self.check_duration = Histogram("hpr_agent_check_duration_seconds", "Duration of one pass of a check",
                                        ["check"], registry=r,
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10))
        self.check_errors = Counter("hpr_agent_check_errors_total", "Passes where the check could not look",
                                    ["check"], registry=r)
        self.findings = Counter("hpr_agent_findings_total", "Findings by code and action", ["code", "action"],
                                registry=r)
        self.actions = Counter("hpr_agent_actions_total", "Node decisions by action and outcome",
                               ["action", "outcome"], registry=r)
        self.log_lines = Counter("hpr_agent_kernel_log_lines_total", "Kernel log lines read", ["source"],
                                 registry=r)
        self.log_lag = Gauge("hpr_agent_kernel_log_lag_bytes", "Bytes written to the kernel log not yet read",
                             ["source"], registry=r)
        self.loop_errors = Counter("hpr_agent_loop_errors_total", "Unexpected errors caught in the agent's loops",
                                   registry=r)
        self.pending_events = Gauge("hpr_agent_pending_events", "Kernel-log findings not yet applied to Slurm",
                                    registry=r)
