"""The one action type: what a finding asks for, what a reason says, what the
actuator applies and what a controller workflow does (issue 9: finding, reason
codec, actuator and workflow each had their own spelling)."""
from __future__ import annotations

import enum
from typing import Optional


class NodeAction(str, enum.Enum):
    """Mildest first: NONE < REBOOT < POWER_CYCLE < REPLACE.

    POWER_CYCLE is the controller's remedy for a silent node (out-of-band power);
    no finding asks for it and no `Action:` reason names it."""
    NONE = "none"
    REBOOT = "reboot"
    POWER_CYCLE = "power_cycle"
    REPLACE = "replace"

    @property
    def rank(self) -> int:
        return list(NodeAction).index(self)

    @property
    def reason_word(self) -> Optional[str]:
        """The word after `Action: ` in a Slurm reason; None for actions no reason names.

        >>> NodeAction.REPLACE.reason_word, NodeAction.NONE.reason_word
        ('Replace', None)
        """
        return {NodeAction.REBOOT: "Reboot", NodeAction.REPLACE: "Replace"}.get(self)

    @classmethod
    def parse(cls, text: str) -> NodeAction:
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise ValueError(f"unknown action {text!r}: expected none, reboot or replace") from None
