"""Every deep check, by name: the registry the configuration and the suite use."""
from __future__ import annotations

from typing import Dict

from ..check import Check
from .cpu_memory import CpuMemoryCheck
from .dcgm import DcgmCheck
from .disk import DiskCheck
from .fabric import FabricCheck
from .gpu_burn import GpuBurnCheck
from .gpu_count import GpuCountCheck

CHECKS: Dict[str, Check] = {c.name: c for c in (GpuCountCheck(), DcgmCheck(), GpuBurnCheck(), CpuMemoryCheck(),
                                                DiskCheck(), FabricCheck())}
