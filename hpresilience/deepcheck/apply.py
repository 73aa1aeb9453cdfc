"""`hpresilience deepcheck --apply`: a failed deep check takes the node out of service
the way the agent would (issue 10, the prolog/epilog pair in slurm_plugins/).

The finding is ``DEEPCHECK@<check>`` with the action the check suggests (dcgm's
error severity: ISOLATE is a replacement) and Reboot otherwise: the controller then
reboots and runs its gate, which escalates to a replacement if the node still fails.
A failure the check calls a configuration problem (DCGM's CONFIG severity, e.g.
persistence mode off) is not applied: neither a reboot nor new hardware fixes it.
It goes through the agent's Actuator: never over someone else's reason, never a
downgrade, and within the shared-cause budget when DEEPCHECK is listed there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

from ..action import NodeAction
from ..finding import Finding
from .result import SuiteReport, describe

if TYPE_CHECKING:
    from ..agent.config import AgentConfig
    from ..slurm import SlurmGateway

CODE = "DEEPCHECK"


def findings(report: SuiteReport) -> List[Finding]:
    """One finding per failed check, the harshest first."""
    out = []
    for result in report.failed():
        suggested = str(result.evidence.get("suggested_action", "reboot")).lower()
        if suggested == "fix_configuration":
            continue
        action = NodeAction.REPLACE if suggested == NodeAction.REPLACE.value else NodeAction.REBOOT
        out.append(Finding(monitor="deepcheck", code=CODE, action=action, message=f"deep check failed: "
                           f"{describe(result, 160)}", component="node", entity=result.name))
    return sorted(out, key=lambda f: -f.action.rank)


def apply_report(config: AgentConfig, report: SuiteReport, gateway: Optional[SlurmGateway] = None
                 ) -> Optional[str]:
    """Apply a failed report to this node; the Actuator's outcome, or None when nothing failed."""
    from ..agent.actuator import Actuator
    from ..agent.daemon import agent_gateway
    from ..agent.policy import Decision
    found = findings(report)
    if not found:
        return None
    decision = Decision(found[0].action, found, config.policy.slurm_state.get(CODE, config.policy.default_state))
    outcome = Actuator(gateway or agent_gateway(), report.node, config.agent.dry_run,
                       config.policy.shared_cause).apply(decision)
    return outcome.value
