"""The one small interface every monitor implements.

A monitor separates *collection* (read the hardware/OS: NVML, sysfs, the kernel
log) from *evaluation* (pure functions from what was collected to Findings), so
evaluation is tested with plain data and collection with real inputs (the fake
NVML library, a temporary sysfs tree, a log file).

The daemon calls `check()` on every monitor on its own schedule; `check()`
must return within the monitor's own time bound even if the driver hangs.
"""
from __future__ import annotations

from typing import List, Protocol, runtime_checkable

from ..finding import Finding


@runtime_checkable
class Monitor(Protocol):
    name: str

    def check(self) -> List[Finding]:
        """One pass: collect, evaluate, return what is wrong now (may be empty).

        Raises MonitorError when the monitor itself could not look (a timeout, a
        missing device): "the checker failed" is kept apart from "the node is unhealthy"."""
        ...

    def close(self) -> None:
        ...


class MonitorError(Exception):
    """The monitor could not collect; says nothing about the node's health."""
