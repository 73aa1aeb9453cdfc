"""The configuration reference in docs/agent.md names every key the agent accepts."""
import dataclasses
import re
from pathlib import Path

from hpresilience.agent.config import AgentConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


def documented_keys() -> dict:
    reference = DOC.read_text().split("## Configuration reference", 1)[1]
    toml = reference.split("```toml", 1)[1].split("```", 1)[0]
    keys: dict = {}
    section = None
    for line in toml.splitlines():
        header = re.match(r"\[([a-z_]+)(?:\.([a-z_]+)(?:\.\w+)?)?\]", line)
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
