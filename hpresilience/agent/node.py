"""Facts about the node the agent runs on."""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

# A kernel-log line stamped more than this before the current boot belongs to an
# earlier boot. Syslog stamps have 1 s resolution and boot_time() is exact to
# about a second; anything larger would count a fault logged just before a
# reboot as current after it (and fail the node's post-reboot verification).
STAMP_SLACK_SECONDS = 2.0


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
