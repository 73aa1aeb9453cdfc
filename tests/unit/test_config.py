from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from hpresilience.config import ConfigError, load_dataclass, read_toml


@dataclass
class Inner:
    count: int = 1
    ratio: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    enabled: bool = True
    paths: List[str] = field(default_factory=list)
    limit: Optional[int] = None
    inner: Inner = field(default_factory=Inner)
    table: Dict[str, Inner] = field(default_factory=dict)

    def validate(self) -> None:
        if self.name == "bad":
            raise ValueError("name must not be 'bad'")


def test_defaults_and_values():
    o = load_dataclass(Outer, {"paths": ["/a"], "limit": 3, "inner": {"ratio": 2}, "table": {"k": {"count": 4}}},
                       "f.toml")
    assert o.paths == ["/a"] and o.limit == 3 and o.inner.ratio == 2.0 and o.table["k"].count == 4
    assert o.name == "x" and o.enabled is True


@pytest.mark.parametrize("data, key, problem", [
    ({"nmae": "x"}, "nmae", "unknown key"),
    ({"inner": {"cuont": 1}}, "inner.cuont", "unknown key"),
    ({"enabled": "yes"}, "enabled", "expected true or false"),
    ({"limit": "3"}, "limit", "expected an integer"),
    ({"limit": True}, "limit", "expected an integer"),
    ({"inner": {"ratio": "fast"}}, "inner.ratio", "expected a number"),
    ({"paths": "/a"}, "paths", "expected a list"),
    ({"paths": ["/a", 3]}, "paths[1]", "expected a string"),
    ({"table": {"k": {"count": "x"}}}, "table.k.count", "expected an integer"),
    ({"name": "bad"}, "Outer", "name must not be 'bad'"),
])
def test_errors_name_file_and_key(data, key, problem):
    with pytest.raises(ConfigError) as err:
        load_dataclass(Outer, data, "/etc/x.toml")
    assert str(err.value).startswith(f"/etc/x.toml: {key}: ")
    assert problem in str(err.value)


def test_read_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [1,\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="missing.toml: file not found"):
        read_toml(tmp_path / "missing.toml")
