"""Applies a policy Decision to this node's Slurm state, through the gateway.

The ownership rules live here: never overwrite a reason that is not an
`Action:` request (by writer and exact form: slurm.reason.reason_owner), never
resume a node, never touch a node already rebooting, and never downgrade (an
existing `Action: Replace` is not replaced by a Reboot). For faults that one
outside event can raise on many nodes at once, a cluster-wide budget is
consulted first (issue 9, defect 8): Slurm itself is the shared state.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import List, Optional

import structlog

from ..slurm import Node, NodeState, ReasonNotOurs, SlurmError, SlurmGateway, SlurmUnavailable
from .config import SharedCauseConfig
from .policy import Decision

log = structlog.get_logger(__name__)


class Outcome(str, enum.Enum):
    APPLIED = "applied"                  # we set the node's state and reason
    ALREADY = "already"                  # our reason with this action (or a stronger one) is there
    FOREIGN_REASON = "foreign_reason"    # someone else's reason: left alone
    REBOOTING = "rebooting"              # a reboot is already requested or in progress
    BUDGET_SPENT = "budget_spent"        # too many nodes of a partition already carry this fault: reported only
    DEFERRED = "deferred"                # Slurm unreachable: try again later
    DRY_RUN = "dry_run"
    FAILED = "failed"                    # Slurm refused (unknown node, permission, auth): logged, retried slowly

    @property
    def settled(self) -> bool:
        """The decision is done with: its events can be forgotten. A spent budget is
        settled: the fault is reported, not applied, and not retried into a storm."""
        return self in (Outcome.APPLIED, Outcome.ALREADY, Outcome.DRY_RUN, Outcome.BUDGET_SPENT)

    @property
    def waiting(self) -> bool:
        """Not ours to act on now (an admin's reason, a reboot in progress): keep the
        events and look again later; the fault may still need acting on after."""
        return self in (Outcome.FOREIGN_REASON, Outcome.REBOOTING)


def shared_cause_spent(nodes: List[Node], me: Node, code: str, max_percent: float) -> Optional[str]:
    """Why failing `me` for `code` would exceed the budget, or None. Per partition of
    `me`: nodes out of service whose Action: reason names `code`, against
    max(1, floor(size * max_percent / 100))."""
    for partition in me.partitions or ("",):
        members = [n for n in nodes if (partition in n.partitions if partition else True) and n.name != me.name]
        size = len(members) + 1
        cap = max(1, math.floor(size * max_percent / 100))
        carrying = [n.name for n in members
                    if (n.is_drained or n.is_down) and (r := n.action_reason) is not None
                    and r.fault is not None and r.fault.code == code]
        if len(carrying) >= cap:
            where = f"partition {partition}" if partition else "the cluster"
            return f"{len(carrying)} of {size} nodes of {where} already out for {code} (budget {cap})"
    return None


@dataclass
class Actuator:
    gateway: SlurmGateway
    node_name: str
    dry_run: bool = False
    shared_cause: SharedCauseConfig = field(default_factory=SharedCauseConfig)

    def apply(self, decision: Decision) -> Outcome:
        reason = decision.reason
        try:
            node = self.gateway.node(self.node_name)
            if node.reboot_pending:
                return Outcome.REBOOTING
            if node.reason_is_foreign:
                return Outcome.FOREIGN_REASON
            current = node.action_reason
            out_of_service = node.is_drained or node.is_down
            if current and out_of_service and current.action.rank >= decision.action.rank:
                return Outcome.ALREADY
            spent = self._budget_spent(node, decision)
            if spent is not None:
                log.warning("agent.action", outcome="budget_spent", node=self.node_name, reason=str(reason),
                            why=spent, hint="reported, not applied: one outside event must not fail a partition")
                return Outcome.BUDGET_SPENT
            state = NodeState(decision.slurm_state.upper())
            if self.dry_run:
                log.info("agent.action", outcome="dry_run", node=self.node_name, reason=str(reason),
                         state=decision.slurm_state)
                return Outcome.DRY_RUN
            self.gateway.mark_action(node, reason, state)  # the node just read: no second read
        except ReasonNotOurs:
            return Outcome.FOREIGN_REASON
        except SlurmUnavailable as e:
            log.warning("agent.action_deferred", node=self.node_name, error=str(e))
            return Outcome.DEFERRED
        except SlurmError as e:
            log.error("agent.action_failed", node=self.node_name, error=str(e))
            return Outcome.FAILED
        log.info("agent.action", outcome="applied", node=self.node_name, reason=str(reason),
                 state=decision.slurm_state, findings=[f.key for f in decision.findings])
        return Outcome.APPLIED

    def _budget_spent(self, node: Node, decision: Decision) -> Optional[str]:
        """Only when every finding behind the decision's action is of a shared-cause code:
        one local fault (an XID) among them is reason enough on its own."""
        top = [f for f in decision.findings if f.action is decision.action]
        codes = {f.code for f in top}
        if not codes or not codes <= set(self.shared_cause.codes):
            return None
        nodes = self.gateway.nodes()
        for code in sorted(codes):
            spent = shared_cause_spent(nodes, node, code, self.shared_cause.max_percent)
            if spent is None:
                return None  # one code still within its budget justifies the action
        return spent
