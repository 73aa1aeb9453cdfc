"""Parser for `dcgmi diag -r N -j` of DCGM 3.x and 4.x (issue 10).

NVIDIA publishes no stable schema for this JSON, so the parser reads only what the
captures in tests/fixtures/deep-checks/ show and rejects any other shape:

- Root: 3.x "DCGM GPU Diagnostic" with "version" inside it
  (dcgmi-diag-dcgm3.1-8gpu-quirks.txt); 4.x "DCGM Diagnostic" with the version under
  the top-level "metadata" (dcgmi-diag-dcgm4-format.json). Both hold test_categories[]
  -> tests[] -> results[].
- Text before the JSON ("WARNING: THIS SHOULD NOT HAPPEN", 3.1 quirks file): the
  document is read from the first '{'; dcgmi exits 226 while still printing a full
  document, so the caller parses whatever the exit status.
- null entries inside lists (3.1 quirks file): skipped.
- Entity: 3.x "gpu_ids" as the string "0" or the integer 0 -> "GPU 0"; a list such as
  "0,1,2,3,4,5,6,7" marks a system-wide test, as does no id at all (Deployment tests of
  dcgmi-diag-r2-pass.json) -> None. 4.x entity_group + entity_id -> "GPU 0".
- "info": one string (3.x), a list of strings (4.x, joined with "; "), or absent
  (GPUs 3-7 of dcgmi-diag-dcgm4-8gpu-test-excerpt.json).
- "warnings": objects with "warning", "error_id", "error_severity" (4.x files).
- Status in any case ("PASS" in 3.1.0, "Pass" elsewhere): lower-cased.
- 4.x "test_summary" carries the test-level verdict: it becomes one more result with
  entity None, so a test whose summary says Fail is failed even with no per-entity Fail.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from . import ParseError

_TOOL = "dcgmi diag"
_ROOTS = ("DCGM GPU Diagnostic", "DCGM Diagnostic")  # 3.x, 4.x
_RAN = frozenset({"pass", "fail", "warn"})
# Overall verdict of a test across its results: the most severe wins. A status we
# do not know ranks right after fail, so it is never hidden behind a pass.
_RANK = {"fail": 0, "warn": 2, "pass": 3, "skip": 4}
_UNKNOWN_RANK = 1
_GPU_IDS = re.compile(r"[0-9]+(?:,[0-9]+)*")


@dataclass(frozen=True)
class DcgmWarning:
    text: str
    error_id: Optional[int]
    severity: Optional[int]  # DCGM error severity: 2 ISOLATE, 5 CONFIG, 6 RESET, ...


@dataclass(frozen=True)
class DcgmResult:
    category: str
    test: str
    entity: Optional[str]  # "GPU 3"; None = system-wide, or a 4.x test_summary
    status: str            # lower-case: pass, fail, skip, warn, ...
    info: str
    warnings: Tuple[DcgmWarning, ...]


@dataclass(frozen=True)
class DcgmReport:
    version: Optional[str]  # None when the JSON states none (3.x without "version")
    results: Tuple[DcgmResult, ...]

    def failed(self) -> Tuple[DcgmResult, ...]:
        return tuple(r for r in self.results if r.status == "fail")

    def tests(self) -> Dict[str, str]:
        """Test name -> overall status: fail if any result failed, else warn, else
        pass, else skip (an unknown status ranks right after fail)."""
        overall: Dict[str, str] = {}
        for r in self.results:
            seen = overall.get(r.test)
            if seen is None or _rank(r.status) < _rank(seen):
                overall[r.test] = r.status
        return overall

    def ran_anything(self) -> bool:
        """False when no result passed, failed or warned: every plugin skipped (or
        was gated off, dcgmi-diag-dcgm4-r2-skip-gated.json) must not read as a pass."""
        return any(r.status in _RAN for r in self.results)

    def warnings(self) -> Tuple[DcgmWarning, ...]:
        """Every distinct warning, in order; 4.5.2 repeats the per-entity warnings in
        test_summary (dcgmi-diag-dcgm4-format.json), counted once here."""
        return tuple(dict.fromkeys(w for r in self.results for w in r.warnings))


def parse_dcgm_diag(text: str) -> DcgmReport:
    start = text.find("{")
    if start < 0:
        raise ParseError(_TOOL, "no JSON object in the output")
    try:
        doc, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError) as e:
        raise ParseError(_TOOL, f"invalid JSON: {e}") from e
    root_key = next((k for k in _ROOTS if k in doc), None) if isinstance(doc, dict) else None
    if root_key is None:
        keys = sorted(doc)[:5] if isinstance(doc, dict) else type(doc).__name__
        raise ParseError(_TOOL, f"unknown JSON root {keys}, expected one of {list(_ROOTS)}")
    root = _mapping(doc[root_key], root_key)
    if "test_categories" not in root:
        raise ParseError(_TOOL, f"{root_key!r} holds no test_categories (keys: {sorted(root)[:5]})")
    results: List[DcgmResult] = []
    for category in _entries(root["test_categories"], "test_categories"):
        name = _string(category, "category", "test category")
        for test in _entries(category.get("tests"), f"category {name!r} tests"):
            results.extend(_test_results(name, test))
    if not results:
        raise ParseError(_TOOL, "the document holds no test results")
    return DcgmReport(version=_version(doc, root), results=tuple(results))


def _test_results(category: str, test: Dict[str, Any]) -> List[DcgmResult]:
    name = _string(test, "name", f"a test of category {category!r}")
    where = f"test {name!r}"
    raws = _entries(test.get("results"), f"{where} results")
    if "test_summary" in test:
        raws.append(_mapping(test["test_summary"], f"{where} test_summary"))
    return [
        DcgmResult(category, name, _entity(raw, where), _string(raw, "status", where).strip().lower(),
                   _info(raw.get("info"), where), _warnings(raw.get("warnings"), where))
        for raw in raws
    ]


def _entity(raw: Dict[str, Any], where: str) -> Optional[str]:
    if "entity_id" in raw:  # 4.x
        entity_id = raw["entity_id"]
        if not _is_int(entity_id):
            raise ParseError(_TOOL, f"{where}: entity_id is {_show(entity_id)}, expected an integer")
        return f"{_string(raw, 'entity_group', where)} {entity_id}"
    ids = raw.get("gpu_ids")
    if ids is None:
        return None
    if _is_int(ids):
        return f"GPU {ids}"
    if isinstance(ids, str) and _GPU_IDS.fullmatch(ids.replace(" ", "")):
        parts = ids.split(",")
        return f"GPU {parts[0].strip()}" if len(parts) == 1 else None
    raise ParseError(_TOOL, f"{where}: gpu_ids is {_show(ids)}, expected an id or a list of ids")


def _info(info: Any, where: str) -> str:
    if info is None:
        return ""
    if isinstance(info, str):
        return info
    if isinstance(info, list) and all(isinstance(line, str) for line in info):
        return "; ".join(info)
    raise ParseError(_TOOL, f"{where}: info is {type(info).__name__}, expected text")


def _warnings(raw: Any, where: str) -> Tuple[DcgmWarning, ...]:
    if raw is None:
        return ()
    return tuple(
        DcgmWarning(_string(w, "warning", f"{where} warning"),
                    _optional_int(w, "error_id", where), _optional_int(w, "error_severity", where))
        for w in _entries(raw, f"{where} warnings")
    )


def _version(doc: Dict[str, Any], root: Dict[str, Any]) -> Optional[str]:
    metadata = doc.get("metadata")
    version = root.get("version") or (metadata.get("version") if isinstance(metadata, dict) else None)
    if version is not None and not isinstance(version, str):
        raise ParseError(_TOOL, f"version is {_show(version)}, expected text")
    return version


def _entries(value: Any, where: str) -> List[Dict[str, Any]]:
    """The objects of a JSON list, null entries dropped (3.1 quirks file)."""
    if not isinstance(value, list):
        raise ParseError(_TOOL, f"{where} is {type(value).__name__}, expected a list")
    return [_mapping(item, where) for item in value if item is not None]


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ParseError(_TOOL, f"{where}: found {type(value).__name__}, expected an object")
    return value


def _string(obj: Dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ParseError(_TOOL, f"{where}: {key!r} is {_show(value)}, expected text")
    return value


def _optional_int(obj: Dict[str, Any], key: str, where: str) -> Optional[int]:
    value = obj.get(key)
    if value is not None and not _is_int(value):
        raise ParseError(_TOOL, f"{where}: {key!r} is {_show(value)}, expected an integer")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rank(status: str) -> int:
    return _RANK.get(status, _UNKNOWN_RANK)


def _show(value: Any) -> str:
    """A JSON value for an error message, cut short: the message ends up in a node's evidence."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
