"""Failure rates per GPU-hour, by cause: the table the goodput simulation draws from (issue 13).

The default is the Llama 3 405B pre-training snapshot: 16,384 H100 GPUs, 54 days, 466 job
interruptions (Dubey et al., "The Llama 3 Herd of Models", 2024, section 3.3.4 and Table 5).
Each count becomes a rate per GPU-hour (count / (GPUs * hours)), so the table scales to any
cluster size and duration. An admin's own table is a TOML or JSON file (docs/goodput.md):

    source = "our incident log, 2025 H1"
    gpus = 4096                       # the run the counts were observed on
    hours = 4344
    [causes."faulty GPU"]
    count = 31                        # or rate_per_gpu_hour = 1.7e-6 (then gpus/hours are not needed)
    remedy = "replace"                # optional for the default table's cause names
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

# What brings the job back after a cause, and whether a node leaves service meanwhile:
# replace/reboot take the node out until it is repaired; restart (software) only relaunches the
# job; planned stops the job at an on-demand checkpoint, so no training work is lost.
REMEDIES = ("replace", "reboot", "restart", "planned")

LLAMA3_SOURCE = ('Llama 3 405B pre-training, 16,384 H100 GPUs, 54 days: "The Llama 3 Herd of Models" '
                 "(Meta, 2024), section 3.3.4, Table 5")
LLAMA3_GPUS = 16384
LLAMA3_HOURS = 54 * 24.0
LLAMA3_INTERRUPTIONS = 466

# (cause, count in the 54 days, remedy). The counts are Table 5's; the remedies are our reading of
# each cause (docs/goodput.md says why), overridable in an admin's table.
LLAMA3_TABLE: Tuple[Tuple[str, int, str], ...] = (
    ("faulty GPU", 148, "replace"),
    ("GPU HBM3 memory", 72, "reboot"),           # row remapping needs a GPU reset; repeat offenders get replaced
    ("software bug", 54, "restart"),
    ("network switch/cable", 35, "replace"),     # the node stays out until the link is fixed
    ("host maintenance (unplanned)", 32, "reboot"),
    ("GPU SRAM memory", 19, "reboot"),
    ("GPU system processor", 17, "reboot"),
    ("NIC", 7, "replace"),
    ("NCCL watchdog timeouts", 7, "restart"),
    ("silent data corruption", 6, "replace"),
    ("GPU thermal interface + sensor", 6, "replace"),
    ("SSD", 3, "replace"),
    ("power supply", 3, "replace"),
    ("server chassis", 2, "replace"),
    ("IO expansion board", 2, "replace"),
    ("dependency", 2, "restart"),
    ("CPU", 2, "replace"),
    ("system memory", 2, "replace"),
    ("planned maintenance", 47, "planned"),      # firmware upgrades, configuration or dataset updates
)
DEFAULT_REMEDY = {name: remedy for name, _, remedy in LLAMA3_TABLE}


class RatesError(ValueError):
    """A rates table that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Cause:
    name: str
    rate_per_gpu_hour: float
    remedy: str
    count: Optional[float] = None   # the observed count the rate came from, when it came from one


@dataclass(frozen=True)
class RateTable:
    source: str
    causes: Tuple[Cause, ...]

    def rate(self, gpus: int, lossy_only: bool = False) -> float:
        """Interruptions per second of wall-clock for a job on `gpus` GPUs.

        >>> round(llama3().rate(16384) * 54 * 86400, 6)
        466.0
        """
        return sum(c.rate_per_gpu_hour for c in self.causes
                   if not lossy_only or c.remedy != "planned") * gpus / 3600.0


def llama3() -> RateTable:
    """The default table: Llama 3's counts as rates per GPU-hour."""
    exposure = LLAMA3_GPUS * LLAMA3_HOURS
    return RateTable(LLAMA3_SOURCE, tuple(Cause(name, count / exposure, remedy, count)
                                          for name, count, remedy in LLAMA3_TABLE))


def _number(value: Any, where: str, positive: bool = False) -> float:
    # bool is an int in Python: `count = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RatesError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise RatesError(f"{where}: must be {'greater than 0' if positive else '0 or more'}, got {value!r}")
    return float(value)


def _exposure(data: Mapping[str, Any], where: str) -> float:
    if "gpus" not in data or "hours" not in data:
        raise RatesError(f"{where}: a count needs the observed run's top-level gpus and hours "
                         "(or give rate_per_gpu_hour instead)")
    return _number(data["gpus"], f"{where}: gpus", positive=True) * _number(data["hours"], f"{where}: hours",
                                                                            positive=True)


def _cause(name: str, entry: Any, data: Mapping[str, Any], source: str) -> Cause:
    where = f"{source}: causes.{name}"
    if not isinstance(entry, dict):
        raise RatesError(f"{where}: expected a table with count or rate_per_gpu_hour")
    unknown = set(entry) - {"count", "rate_per_gpu_hour", "remedy"}
    if unknown:
        raise RatesError(f"{where}: unknown keys {sorted(unknown)} (count, rate_per_gpu_hour, remedy)")
    if ("count" in entry) == ("rate_per_gpu_hour" in entry):
        raise RatesError(f"{where}: give exactly one of count and rate_per_gpu_hour")
    remedy = entry.get("remedy", DEFAULT_REMEDY.get(name))
    if remedy is None:
        raise RatesError(f"{where}: unknown cause: give its remedy ({', '.join(REMEDIES)})")
    if remedy not in REMEDIES:
        raise RatesError(f"{where}: remedy: expected one of {', '.join(REMEDIES)}, got {remedy!r}")
    if "count" in entry:
        count = _number(entry["count"], f"{where}: count")
        return Cause(name, count / _exposure(data, f"{source}: causes.{name}"), remedy, count)
    return Cause(name, _number(entry["rate_per_gpu_hour"], f"{where}: rate_per_gpu_hour"), remedy)


def parse_rates(data: Any, source: str) -> RateTable:
    """A table from a parsed TOML/JSON document; `source` (a file name) prefixes every error."""
    if not isinstance(data, dict):
        raise RatesError(f"{source}: expected a table with source and causes")
    unknown = set(data) - {"source", "gpus", "hours", "causes"}
    if unknown:
        raise RatesError(f"{source}: unknown keys {sorted(unknown)} (source, gpus, hours, causes)")
    text = data.get("source")
    if not isinstance(text, str) or not text.strip():
        raise RatesError(f"{source}: source: say where the numbers come from (a non-empty string)")
    causes = data.get("causes")
    if not isinstance(causes, dict) or not causes:
        raise RatesError(f"{source}: causes: expected at least one cause")
    return RateTable(text.strip(), tuple(_cause(name, entry, data, source) for name, entry in causes.items()))


def load_rates(path: Path) -> RateTable:
    """An admin's table: JSON when the file ends in .json, TOML otherwise."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise RatesError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data: Dict[str, Any] = json.loads(raw) if str(path).endswith(".json") else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise RatesError(f"{path}: not valid {'JSON' if str(path).endswith('.json') else 'TOML'}: {e}") from None
    return parse_rates(data, str(path))
