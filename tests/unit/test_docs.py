"""The configuration references in docs/ name every key the daemons accept
(docs/agent.md for the agent; docs/controller.md for the controller, with each key's default)."""
import dataclasses
import re
import sys
from pathlib import Path

from hpresilience.agent.config import AgentConfig
from hpresilience.controller.config import ControllerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC = DOCS / "agent.md"
CONTROLLER_DOC = DOCS / "controller.md"


def documented_keys() -> dict:
    reference = DOC.read_text().split("## Configuration reference", 1)[1]
    toml = reference.split("```toml", 1)[1].split("```", 1)[0]
    keys: dict = {}
    section = None
    for line in toml.splitlines():
        header = re.match(r"\[\[?([a-z_]+)(?:\.([a-z_]+)(?:\.\w+)?)?\]", line)   # [[...]]: an array of tables
        if header:
            section = header.group(1)
            if header.group(2):  # [policy.thresholds.CODE] documents the table key "thresholds"
                keys.setdefault(section, set()).add(header.group(2))
            continue
        key = re.match(r"([a-z_]+) =", line)
        if key and section:
            keys.setdefault(section, set()).add(key.group(1))
    return keys


def test_every_agent_config_key_is_documented():
    documented = documented_keys()
    config = AgentConfig()
    for section in dataclasses.fields(AgentConfig):
        fields = {f.name for f in dataclasses.fields(getattr(config, section.name))}
        assert fields <= documented.get(section.name, set()), \
            f"[{section.name}] keys missing from docs/agent.md: {sorted(fields - documented.get(section.name, set()))}"


def documented_controller_defaults() -> dict:
    """{section: {key: default}} from the tables under "### `[section]`" in the
    configuration reference; each default cell is a TOML value in backticks."""
    reference = CONTROLLER_DOC.read_text().split("## Configuration reference", 1)[1]
    reference = re.split(r"^## ", reference, maxsplit=1, flags=re.M)[0]
    defaults: dict = {}
    section = None
    for line in reference.splitlines():
        header = re.match(r"### `\[([a-z_]+)\]`", line)
        if header:
            section = header.group(1)
            defaults.setdefault(section, {})
            continue
        row = re.match(r"\| `([a-z_]+)` \| `([^`]*)` \|", line)
        if row and section:
            defaults[section][row.group(1)] = tomllib.loads(f"v = {row.group(2)}")["v"]
    return defaults


def test_every_controller_config_key_is_documented_with_its_default():
    documented = documented_controller_defaults()
    config = ControllerConfig()
    assert set(documented) == {s.name for s in dataclasses.fields(ControllerConfig)}, \
        f"docs/controller.md documents sections {sorted(documented)}"
    for section in dataclasses.fields(ControllerConfig):
        values = getattr(config, section.name)
        fields = {f.name for f in dataclasses.fields(values)}
        keys = set(documented[section.name])
        assert fields == keys, (f"[{section.name}] in docs/controller.md: missing {sorted(fields - keys)}, "
                                f"not in the code {sorted(keys - fields)}")
        for key, default in documented[section.name].items():
            assert default == getattr(values, key), \
                f"[{section.name}] {key}: docs/controller.md says {default!r}, the code {getattr(values, key)!r}"
