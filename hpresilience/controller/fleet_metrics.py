"""What each reconcile pass exports about the fleet: the gauges an operator's dashboard and alerts
read (issue 12). Computed from what the pass already read (nodes, journal), set here only, and
re-set whole every pass so a node, partition or step that went away leaves no stale series."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Tuple

from prometheus_client import Gauge

from ..slurm import Node
from ..slurm.models import NODE_CATEGORIES
from .journal import Workflow
from .metrics import ACTIONS, REPAIR_ACTIONS, UNATTENDED_WHY, ControllerMetrics

# "Repairs failing repeatedly on one node" looks this far back (hpr_controller_node_recent_workflows).
RECENT_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Unattended:
    """A node that needs a repair and has no active workflow: why, and since when."""
    node: str
    why: str        # one of metrics.UNATTENDED_WHY
    since: float


def export_nodes(metrics: ControllerMetrics, nodes: List[Node]) -> None:
    """hpr_controller_partition_nodes{partition,state}: every state of every partition, 0 included
    (an alert divides by the partition's total)."""
    counts = collections.Counter((p, n.category) for n in nodes for p in n.partitions)
    metrics.nodes.set(len(nodes))
    _show(metrics, metrics.nodes_by_state, {(p, state): counts[(p, state)]
                                            for p in {p for n in nodes for p in n.partitions}
                                            for state in NODE_CATEGORIES})


def export_repairs(metrics: ControllerMetrics, nodes: List[Node], active: List[Workflow],
                   unattended: List[Unattended], recent: Iterable[Workflow], steps: Iterable[str],
                   now: float) -> None:
    """Flagged nodes by action, unattended nodes, workflows by step with the oldest's time in it,
    and each node's repairs of the last RECENT_SECONDS."""
    in_workflow = {wf.node: wf.action for wf in active}
    flagged = collections.Counter(in_workflow.values())
    for n in nodes:
        ours = n.action_reason
        if n.name not in in_workflow and ours is not None and (n.is_drained or n.is_down):
            flagged[ours.action.value] += 1
    for action in ACTIONS:
        metrics.flagged.labels(action).set(flagged[action])
    why = collections.Counter(u.why for u in unattended)
    for w in UNATTENDED_WHY:
        metrics.unattended.labels(w).set(why[w])
    metrics.unattended_oldest.set(max((now - u.since for u in unattended), default=0.0))
    per_step = collections.defaultdict(list)
    for wf in active:
        per_step[wf.step].append(now - float(wf.data.get("step_at", wf.updated_at)))
    for step in steps:
        metrics.active.labels(step).set(len(per_step[step]))
        metrics.step_oldest.labels(step).set(max(per_step[step], default=0.0))
    _show(metrics, metrics.node_recent,
          collections.Counter((wf.node, wf.status) for wf in recent if wf.action in REPAIR_ACTIONS))


def _show(metrics: ControllerMetrics, gauge: Gauge, values: Mapping[Tuple[str, ...], float]) -> None:
    """Set the series in `values`, then remove those of the last pass not among them: never
    cleared first, as a scrape between the two would see the series gone (a staleness marker,
    which restarts an alert's `for:`; issue 12 review)."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    shown = metrics.shown.setdefault(id(gauge), set())
    for labels in shown - values.keys():
        gauge.remove(*labels)
    shown.clear()
    shown.update(values)
