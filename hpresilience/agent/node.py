"""Facts about the node the agent runs on."""
from __future__ import annotations

import os
import socket
import time
from typing import Optional


def node_name(configured: Optional[str] = None) -> str:
    """The Slurm node name: configured, else $SLURMD_NODENAME, else the short hostname."""
    return configured or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def boot_time() -> float:
    """Wall-clock time of this boot, from /proc/uptime.

    Not /proc/sys/kernel/random/boot_id: uptime is per time namespace, so an
    emulated reboot in the test cluster (a fresh time namespace) is a new boot
    here exactly as a real reboot is on a real node."""
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime
