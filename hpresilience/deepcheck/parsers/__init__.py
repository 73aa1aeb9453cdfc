"""Pure parsers for the text the deep-check tools print (issue 10).

Each parser takes the tool's captured output and returns a frozen report, or
raises ParseError naming the tool and what was wrong: a malformed output is an
ERROR (the check could not run), never a verdict about the node. Reference
captures with their provenance: tests/fixtures/deep-checks/README.md.
"""
from __future__ import annotations

import math


class ParseError(ValueError):
    """A tool's output could not be read; str() is "<tool>: <what>"."""

    def __init__(self, tool: str, what: str):
        super().__init__(f"{tool}: {what}")
        self.tool = tool
        self.what = what


def finite_number(text: str) -> float:
    """A number field of a tool's table; ValueError for anything else, nan and inf included,
    so a row of another kind is told apart from a measurement."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text}")
    return value
