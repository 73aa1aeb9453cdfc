"""The controller's Prometheus metrics, in their own registry."""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.leader = Gauge("hpr_controller_leader", "1 on the active controller, 0 on a standby", registry=r)
        self.breaker = Gauge("hpr_controller_breaker_tripped", "1 while the circuit breaker pauses automatic action",
                             registry=r)
        self.pass_seconds = Histogram("hpr_controller_pass_seconds", "Duration of one reconcile pass", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.pass_errors = Counter("hpr_controller_pass_errors_total", "Passes that failed (Slurm, journal)",
                                   ["kind"], registry=r)
        self.nodes = Gauge("hpr_controller_nodes", "Nodes Slurm reported in the last pass", registry=r)
        self.nodes_by_state = Gauge("hpr_controller_partition_nodes",
                                    "Nodes of each partition by state in the last pass (idle, allocated, mixed, "
                                    "drained, failed, down, other)", ["partition", "state"], registry=r)
        self.active = Gauge("hpr_controller_workflows_active", "Active workflows by step", ["step"], registry=r)
        self.started = Counter("hpr_controller_workflows_started_total", "Workflows started", ["action"], registry=r)
        self.finished = Counter("hpr_controller_workflows_finished_total", "Workflows finished",
                                ["action", "status"], registry=r)
        self.deepcheck_runs = Counter("hpr_controller_deepcheck_runs_total", "Deep-check gate runs with a verdict",
                                      ["level", "status"], registry=r)
        self.deepcheck_failures = Counter("hpr_controller_deepcheck_failures_total",
                                          "Failed checks in deep-check gate runs", ["check"], registry=r)
        self.time_to_service = Histogram("hpr_controller_time_to_service_seconds",
                                         "Detection to back in service, per completed workflow", ["action"],
                                         registry=r, buckets=(10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200))
