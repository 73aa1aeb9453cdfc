"""The controller's Prometheus metrics, in their own registry.

Labels are bounded sets only: actions, steps, statuses, checks, partitions and node names (the
cluster's inventory), never reason text or job ids (issue 12). Labelled series whose values are
known in advance are created at 0, so a dashboard or alert sees 0 before the first event rather
than no data (Prometheus' own advice)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Set, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..action import NodeAction
from ..deepcheck.checks import CHECKS
from .config import LEVELS

ADMIT = "admit"   # the workflow action holding a new node until its deep check passes (issue 10)
REPAIR_ACTIONS = tuple(a.value for a in NodeAction if a is not NodeAction.NONE)
ACTIONS = REPAIR_ACTIONS + (ADMIT,)
FINISHED_STATUSES = ("done", "failed", "abandoned")
UNATTENDED_WHY = ("paused", "recommend_only", "gave_up", "unresponsive")
RESUME_PATHS = ("in_allocation", "requeue")
# Detection to back in service: a reboot takes minutes, a replacement hours.
REPAIR_BUCKETS = (10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
# The runner's fault -> next attempt: under a second in the allocation; requeued, seconds when
# expedited, up to hours when the job waits in a full queue (issue 12 review).
RESUME_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # The label sets each re-set-whole gauge showed after the last pass (fleet_metrics._show).
        self.shown: Dict[int, Set[Tuple[str, ...]]] = {}
        self.leader = Gauge("hpr_controller_leader", "1 on the active controller, 0 on a standby", registry=r)
        self.breaker = Gauge("hpr_controller_breaker_tripped", "1 while the circuit breaker pauses automatic action",
                             registry=r)
        self.pass_seconds = Histogram("hpr_controller_pass_seconds", "Duration of one reconcile pass", registry=r,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.pass_errors = Counter("hpr_controller_pass_errors_total", "Passes that failed (Slurm, journal)",
                                   ["kind"], registry=r)
        self.last_pass = Gauge("hpr_controller_last_pass_timestamp_seconds",
                               "Unix time of the last complete reconcile pass", registry=r)
        self.nodes = Gauge("hpr_controller_nodes", "Nodes Slurm reported in the last pass", registry=r)
        self.nodes_by_state = Gauge("hpr_controller_partition_nodes",
                                    "Nodes of each partition by state in the last pass (idle, allocated, mixed, "
                                    "drained, failed, down, other)", ["partition", "state"], registry=r)
        self.flagged = Gauge("hpr_controller_flagged_nodes",
                             "Nodes carrying an Action: reason or in an active workflow, by action", ["action"],
                             registry=r)
        self.unattended = Gauge("hpr_controller_unattended_nodes",
                                "Nodes needing repair with no active workflow, by why (paused, recommend_only, "
                                "gave_up, unresponsive)", ["why"], registry=r)
        self.unattended_oldest = Gauge("hpr_controller_unattended_oldest_seconds",
                                       "Age of the oldest node needing repair with no active workflow (0: none)",
                                       registry=r)
        self.active = Gauge("hpr_controller_workflows_active", "Active workflows by step", ["step"], registry=r)
        self.step_oldest = Gauge("hpr_controller_workflow_step_oldest_seconds",
                                 "Time in its current step of the oldest active workflow in each step (0: none)",
                                 ["step"], registry=r)
        self.started = Counter("hpr_controller_workflows_started_total", "Workflows started", ["action"], registry=r)
        self.finished = Counter("hpr_controller_workflows_finished_total", "Workflows finished",
                                ["action", "status"], registry=r)
        self.escalations = Counter("hpr_controller_escalations_total",
                                   "Workflows escalated to replace, by the action escalated from", ["action"],
                                   registry=r)
        self.rechecks = Counter("hpr_controller_restarts_after_checks_total",
                                "Nodes that restarted on their own after their checks passed, before release "
                                "(checked again on the new boot, or given to a human)", registry=r)
        self.node_recent = Gauge("hpr_controller_node_recent_workflows",
                                 "Repair workflows opened in the last 24 hours, per node (nodes with one or more) "
                                 "and status", ["node", "status"], registry=r)
        self.deepcheck_runs = Counter("hpr_controller_deepcheck_runs_total", "Deep-check gate runs with a verdict",
                                      ["level", "status"], registry=r)
        self.deepcheck_failures = Counter("hpr_controller_deepcheck_failures_total",
                                          "Failed checks in deep-check gate runs", ["check"], registry=r)
        self.time_to_service = Histogram("hpr_controller_time_to_service_seconds",
                                         "Detection to back in service, per completed workflow", ["action"],
                                         registry=r, buckets=REPAIR_BUCKETS)
        self.expedited = Counter("hpr_controller_requeues_expedited_total",
                                 "Requeued auto-resume jobs made eligible at once", registry=r)
        self.resumes = Counter("hpr_autoresume_recoveries_total",
                               "srun --auto-resume attempts started after a fault, by path (read from the events "
                               "files in [controller] autoresume_state_dir)", ["path"], registry=r)
        self.resume_seconds = Histogram("hpr_autoresume_recovery_seconds",
                                        "srun --auto-resume: fault seen by the runner to the next attempt started",
                                        ["path"], registry=r, buckets=RESUME_BUCKETS)
        self.resume_gave_up = Counter("hpr_autoresume_gave_up_total",
                                      "srun --auto-resume steps that gave up (attempts or requeues used up, no "
                                      "progress)", registry=r)
        self._initialise()

    def _initialise(self) -> None:
        for action in ACTIONS:
            self.flagged.labels(action)
            self.started.labels(action)
            self.time_to_service.labels(action)
            for status in FINISHED_STATUSES:
                self.finished.labels(action, status)
        for action in REPAIR_ACTIONS:
            if action != "replace":
                self.escalations.labels(action)
        for why in UNATTENDED_WHY:
            self.unattended.labels(why)
        for level in LEVELS:
            for status in ("pass", "fail"):
                self.deepcheck_runs.labels(level, status)
        for check in (*CHECKS, "other"):
            self.deepcheck_failures.labels(check)
        for kind in ("slurm", "journal", "bug"):
            self.pass_errors.labels(kind)
        for path in RESUME_PATHS:
            self.resumes.labels(path)
            self.resume_seconds.labels(path)
