"""The agent's Prometheus metrics, in their own registry (one per Agent, so
tests and a reload never collide with a previous instance).

Every label has a bounded set of values: check and source names come from the
configuration, the rest from enums here. Those known in advance are
initialised (counters at 0) so a dashboard or an alert gets a series before the
first event (issue 12). hpr_agent_check_healthy is left unset until a check's
first pass: any value before it (1, 0, -1) would be a claim nobody checked."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Iterable, Set

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from ..action import NodeAction
from .actuator import Outcome
from .monitors.nvml import NvmlErrorKind


class Loop(str, enum.Enum):
    """The agent's loops, the `loop` label of hpr_agent_last_pass_timestamp_seconds."""
    CHECKS = "checks"          # the monitor thread: NVML and system checks
    KERNEL_LOG = "kernel_log"  # the main thread: kernel-log reading and decisions


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self._checks: Set[str] = set()     # what watch() was last given
        self._sources: Set[str] = set()
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
        self.log_errors = Counter("hpr_agent_kernel_log_errors_total", "Errors of a kernel-log source: I/O error, "
                                  "file missing or unreadable, journalctl failed to start or exited",
                                  ["source"], registry=r)
        self.nvml_errors = Counter("hpr_agent_nvml_errors_total", "NVML calls that failed, by kind", ["kind"],
                                   registry=r)
        self.last_pass = Gauge("hpr_agent_last_pass_timestamp_seconds", "Unix time the loop last completed a "
                               "pass (the agent's start until its first)", ["loop"], registry=r)
        self.loop_errors = Counter("hpr_agent_loop_errors_total", "Unexpected errors caught in the agent's loops",
                                   registry=r)
        self.pending_events = Gauge("hpr_agent_pending_events", "Kernel-log findings not yet applied to Slurm",
                                    registry=r)
        for kind in NvmlErrorKind:
            self.nvml_errors.labels(kind.value)
        for action in NodeAction:
            if action.reason_word:  # the actions a decision can take (no finding asks for none or power_cycle)
                for outcome in Outcome:
                    self.actions.labels(action.value, outcome.value)
        # From the start, not 0: `time() - hpr_agent_last_pass_timestamp_seconds > 300` then fires for a
        # loop that never completes its first pass, and not for an agent scraped before its first pass.
        started = time.time()
        for loop in Loop:
            self.last_pass.labels(loop.value).set(started)

    def watch(self, checks: Iterable[str], sources: Iterable[str]) -> None:
        """Initialises the series of the configured checks and sources, and after a reload removes
        those of checks and sources no longer configured: frozen at their last value, a check left
        at -1 or a source left lagging would keep an alert firing (issue 12 review)."""
        checks, sources = set(checks), set(sources)
        for gone in self._checks - checks:
            for metric in (self.check_errors, self.check_duration, self.check_healthy):
                _remove(metric, gone)
        for gone in self._sources - sources:
            for metric in (self.log_lines, self.log_errors, self.log_lag):
                _remove(metric, gone)
        self._checks, self._sources = checks, sources
        for check in checks:
            self.check_errors.labels(check)
            self.check_duration.labels(check)
        for source in sources:
            self.log_lines.labels(source)
            self.log_errors.labels(source)

    def nvml_error(self, kind: NvmlErrorKind) -> None:
        self.nvml_errors.labels(kind.value).inc()

    def passed(self, loop: Loop) -> None:
        self.last_pass.labels(loop.value).set(time.time())


def _remove(metric: MetricWrapperBase, label: str) -> None:
    try:
        metric.remove(label)
    except KeyError:   # never set (a check's health before its first pass)
        pass
