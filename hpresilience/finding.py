"""The one record every part of hpresilience shares.

A monitor turns what it observed into Findings; the agent's policy turns
Findings into one node decision; the controller and the auto-resume shim read
the same record back from logs, journals and the CLI. Detection never calls
remediation directly: it emits Findings.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from .action import NodeAction


@dataclass(frozen=True)
class Finding:
    """One observed fault (or noteworthy event) on one node.

    `code` is the stable key (e.g. "XID_74", "HUNG_TASK", "GPU_COUNT_LOW") used for
    de-duplication, thresholds and metrics; `message` is the short human text that
    goes after "Action: X; " in the Slurm reason."""
    monitor: str                       # which monitor saw it: kernel_log, nvml, system
    code: str
    action: NodeAction
    message: str
    component: str = "node"            # gpu, nvlink, memory, cpu, kernel, filesystem, nvme, nic, ...
    entity: Optional[str] = None       # which device: "GPU 3 (0000:b9:00.0)", "mlx5_0 port 1", "/scratch"
    evidence: str = ""                 # the raw line or value that triggered it
    rule: Optional[str] = None         # name of the rule that matched, when rule-driven
    slurm_state: Optional[str] = None  # fail/drain/down override for this finding; None = configured default
    observed_at: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        """Identity for de-duplication: the same fault on the same device."""
        return f"{self.code}@{self.entity or '-'}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["action"] = self.action.value
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> Finding:
        d = dict(d)
        d["action"] = NodeAction.parse(d["action"])
        return cls(**d)
