"""TOML configuration, validated strictly into dataclasses.

Unknown keys, wrong types and bad values are errors that name the file and the
key (``/etc/hpresilience/agent.toml: agent.interval_seconds: expected a number,
got 'fast'``). A daemon refuses to start on a bad file rather than running
half-configured; on SIGHUP it keeps the old configuration instead.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Optional, Type, TypeVar, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(Exception):
    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def read_toml(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "", f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read: {e.strerror}") from None


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a table, got {value!r}")
        return load_dataclass(tp, value, source, key)
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a table, got {value!r}")
        return {k: _coerce(v, args[1] if args else Any, source, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")
    return value


def load_dataclass(cls: Type[T], data: Dict[str, Any], source: str, prefix: str = "") -> T:
    """Build `cls` from a TOML table: unknown keys and wrong types are errors.

    A dataclass may define `validate(self) -> None` raising ValueError; its
    message is reported against the table's key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(source, where, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], source, f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            raise ConfigError(source, prefix or cls.__name__, str(e)) from None
    return obj


LOG_LEVELS = ("debug", "info", "warning", "error")


def validate_daemon_settings(metrics_port: int, log_level: str) -> None:
    """What every daemon section (agent, controller) checks alike."""
    if not 0 <= metrics_port <= 65535:
        raise ValueError(f"metrics_port {metrics_port} is not a port number")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level {log_level!r}: expected debug, info, warning or error")


def load_file(cls: Type[T], path: Optional[Path]) -> T:
    """`cls` from a TOML file, or its defaults when `path` is None."""
    if path is None:
        return cls()
    return load_dataclass(cls, read_toml(path), str(path))
