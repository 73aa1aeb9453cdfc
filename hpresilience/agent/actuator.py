"""Applies a policy Decision to this node's Slurm state, through the gateway.

The ownership rules live here: never overwrite a reason the agent did not
write, never resume a node, never touch a node already rebooting, and never
downgrade (an existing `Action: Replace` is not replaced by a Reboot).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import structlog

from ..finding import NodeAction
from ..slurm import ActionReason, NodeState, ReasonNotOurs, SlurmError, SlurmGateway, SlurmUnavailable
from .policy import Decision

log = structlog.get_logger(__name__)


class Outcome(str, enum.Enum):
    APPLIED = "applied"                  # we set the node's state and reason
    ALREADY = "already"                  # our reason with this action (or a stronger one) is there
    FOREIGN_REASON = "foreign_reason"    # someone else's reason: left alone
    REBOOTING = "rebooting"              # a reboot is already requested or in progress
    DEFERRED = "deferred"                # Slurm unreachable: try again later
    DRY_RUN = "dry_run"
    FAILED = "failed"                    # Slurm refused (unknown node, permission, auth): logged, retried slowly

    @property
    def settled(self) -> bool:
        """The decision is done with: its events can be forgotten."""
        return self in (Outcome.APPLIED, Outcome.ALREADY, Outcome.DRY_RUN)

    @property
    def waiting(self) -> bool:
        """Not ours to act on now (an admin's reason, a reboot in progress): keep the
        events and look again later; the fault may still need acting on after."""
        return self in (Outcome.FOREIGN_REASON, Outcome.REBOOTING)


@dataclass
class Actuator:
    gateway: SlurmGateway
    node_name: str
    dry_run: bool = False

    def apply(self, decision: Decision) -> Outcome:
        reason = ActionReason(decision.action.reason_action, decision.detail)
        try:
            node = self.gateway.node(self.node_name)
            if node.reboot_pending:
                return Outcome.REBOOTING
            if node.reason_is_foreign:
                return Outcome.FOREIGN_REASON
            current = node.action_reason
            out_of_service = node.is_drained or node.is_down
            if current and out_of_service and NodeAction.parse(current.action.value).rank >= decision.action.rank:
                return Outcome.ALREADY
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
                 state=decision.slurm_state, escalated=decision.escalated,
                 findings=[f.key for f in decision.findings])
        return Outcome.APPLIED

