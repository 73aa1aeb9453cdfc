"""Deep-check configuration: the `[deepcheck]` section of the agent's file (issue 10).

    [deepcheck]
    required = ["dcgm"]                       # a required check that is skipped is ERROR
    [deepcheck.levels]
    quick = ["gpu_count", "dcgm", "disk"]
    [deepcheck.checks.gpu_burn]               # parameters over the check's defaults
    min_tflops = 400.0
    [[deepcheck.overrides]]                   # per partition or node feature, in file order
    feature = "h100"
    checks.gpu_burn.min_tflops = 600.0

Parameters are data keyed by name: each check declares them with defaults
(checks/*.py, listed in docs/deep-checks.md); an unknown check or parameter, or
a value of the wrong type, is an error naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .check import defaults
from .cluster_config import ClusterCheckConfig
from .result import Level

# Which checks each level runs. The levels differ also in how long each check runs
# (per-level parameters such as dcgm's run_level, stress-ng's seconds).
DEFAULT_LEVELS: Dict[str, List[str]] = {
    Level.QUICK.value: ["gpu_count", "dcgm", "disk"],
    Level.STANDARD.value: ["gpu_count", "dcgm", "gpu_burn", "cpu_memory", "disk", "fabric"],
    Level.FULL.value: ["gpu_count", "dcgm", "gpu_burn", "cpu_memory", "disk", "fabric"],
}


def _default_levels() -> Dict[str, List[str]]:
    return {k: list(v) for k, v in DEFAULT_LEVELS.items()}


def _registry() -> Mapping[str, Any]:
    from .checks import CHECKS  # the checks import config's types only through here
    return CHECKS


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def validate_params(check: str, params: Mapping[str, Any], where: str) -> None:
    """Raise ValueError naming `where.check.key` for an unknown check, key or a wrongly typed value."""
    registry = _registry()
    if check not in registry:
        raise ValueError(f"{where}.{check}: unknown check (known: {', '.join(sorted(registry))})")
    known = defaults(registry[check])
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"{where}.{check}.{key}: unknown parameter (known: {', '.join(sorted(known))})")
        default = known[key]
        if isinstance(default, dict):
            if not isinstance(value, Mapping):
                if not _same_type(next(iter(default.values())), value):
                    raise ValueError(f"{where}.{check}.{key}: expected a value or a table per level, got {value!r}")
                continue
            for level, v in value.items():
                if level not in default or not _same_type(default[level], v):
                    raise ValueError(f"{where}.{check}.{key}.{level}: expected one of "
                                     f"{', '.join(default)} with a value like {default[next(iter(default))]!r}")
        elif not _same_type(default, value):
            raise ValueError(f"{where}.{check}.{key}: expected a value like {default!r}, got {value!r}")


@dataclass
class Override:
    """Parameters for the nodes of one partition or with one feature."""
    partition: Optional[str] = None
    feature: Optional[str] = None
    checks: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def matches(self, partitions: Sequence[str], features: Sequence[str]) -> bool:
        return (self.partition in partitions) if self.partition is not None else self.feature in features

    def validate(self) -> None:
        if (self.partition is None) == (self.feature is None):
            raise ValueError("an override names exactly one of partition or feature")
        for name, params in self.checks.items():
            validate_params(name, params, "checks")


@dataclass
class DeepCheckConfig:
    levels: Dict[str, List[str]] = field(default_factory=_default_levels)
    required: List[str] = field(default_factory=list)
    checks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    overrides: List[Override] = field(default_factory=list)
    cluster: ClusterCheckConfig = field(default_factory=ClusterCheckConfig)   # `deepcheck --nodes`

    def validate(self) -> None:
        known = _registry()
        for level, names in self.levels.items():
            if level not in {lv.value for lv in Level}:
                raise ValueError(f"levels.{level}: expected quick, standard or full")
            for name in names:
                if name not in known:
                    raise ValueError(f"levels.{level}: unknown check {name!r} (known: {', '.join(sorted(known))})")
        for name in self.required:
            if name not in known:
                raise ValueError(f"required: unknown check {name!r}")
        for name, params in self.checks.items():
            validate_params(name, params, "checks")

    def names(self, level: Level) -> List[str]:
        return list(self.levels.get(level.value, DEFAULT_LEVELS[level.value]))

    def params_for(self, check: str, partitions: Sequence[str] = (), features: Sequence[str] = ()) -> Dict[str, Any]:
        """The check's defaults, then `[deepcheck.checks.NAME]`, then each matching override in order."""
        params = defaults(_registry()[check])
        layers = [self.checks.get(check, {})] + [o.checks.get(check, {}) for o in self.overrides
                                                  if o.matches(partitions, features)]
        for layer in layers:
            for key, value in layer.items():
                if isinstance(params.get(key), dict) and isinstance(value, Mapping):
                    params[key] = {**params[key], **value}
                else:
                    params[key] = value
        return params
