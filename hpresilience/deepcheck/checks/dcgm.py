"""DCGM diagnostics: `dcgmi diag -r LEVEL -j`, per test and per GPU (issue 10).

Rules, each taught by a capture in tests/fixtures/deep-checks/ (README.md there):

- The document is read whatever the exit status: dcgmi exits 226 while printing a full
  report (dcgmi-diag-dcgm4-format.json, dcgmi-diag-dcgm4-r2-skip-gated.json). No JSON at
  all is ERROR naming dcgmi, its exit status and its first line of output; a document the
  parser rejects is ERROR naming what was wrong.
- Any failed result is FAIL naming the test, the GPU and DCGM's warning with its error id
  and severity (the persistence-mode failure of dcgmi-diag-dcgm4-r1-fail-persistence.json).
  A 4.x test_summary Fail counts even with no per-GPU Fail (the parser makes it a result).
- Nothing ran (every plugin skipped, as the allowlist-gated plugins of
  dcgmi-diag-dcgm4-r2-skip-gated.json would be without the software test) is SKIP, so
  `required = ["dcgm"]` turns it into ERROR; never a pass.
- Some tests skipped (EUD Test in dcgmi-diag-r3-pass.json) is PASS with the skipped tests
  in the evidence: DCGM skips what a SKU or a build does not support.
- Warn results are not failures (DCGM's own verdict); their warnings go to the evidence.
- A status this check does not know, or a clean document with a non-zero exit status, is
  ERROR: no verdict either way, never a pass hiding a problem.
- `suggested_action` from DCGM's error severities (README, "DCGM levels, durations and
  actions"): 2 ISOLATE -> replace, 6 RESET -> reboot, 5 CONFIG -> fix the configuration,
  anything else -> investigate. The controller escalates on any FAIL regardless.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from ..check import Check, Context, CouldNotRun, per_level
from ..parsers import ParseError
from ..parsers.dcgm import DcgmReport, DcgmResult, DcgmWarning, parse_dcgm_diag
from ..result import Status, Verdict
from ..tool import run_tool

_KNOWN_STATUSES = frozenset({"pass", "fail", "warn", "skip"})
# DCGM error severities (the diagnostic errors page cited in the fixtures README), and the
# action each asks for, most drastic first.
SEVERITY_NAMES = {0: "NONE", 1: "MONITOR", 2: "ISOLATE", 3: "UNKNOWN", 4: "TRIAGE", 5: "CONFIG", 6: "RESET"}
_ACTIONS = ((2, "replace"), (6, "reboot"), (5, "fix_configuration"))
DEFAULT_ACTION = "investigate"


@dataclass(frozen=True)
class DcgmObservation:
    report: DcgmReport
    exit_status: int
    run_level: int


class DcgmCheck(Check):
    name = "dcgm"
    params = {
        "run_level": {"quick": 1, "standard": 2, "full": 3},  # dcgmi diag -r
        # Field figures (fixtures README): -r 1 seconds, -r 2 2-10.5 min, -r 3 10-15 min;
        # AWS HyperPod allows 30 min for level 2 and 60 min for level 3.
        "timeout_seconds": {"quick": 300.0, "standard": 1800.0, "full": 3600.0},
        "extra_args": [],   # e.g. ["--fail-early"] or ["-g", "0"]
    }

    def collect(self, ctx: Context) -> DcgmObservation:
        level = int(per_level(ctx.params["run_level"], ctx.level))
        argv = ["dcgmi", "diag", "-r", str(level), "-j", *[str(a) for a in ctx.params["extra_args"]]]
        out = run_tool(argv, float(per_level(ctx.params["timeout_seconds"], ctx.level)), ctx.env, "dcgmi")
        if "{" not in out.stdout:
            raise CouldNotRun(f"dcgmi exited {out.returncode} without a JSON report: "
                              f"{out.first_line()}")
        try:
            report = parse_dcgm_diag(out.stdout)
        except ParseError as e:
            raise CouldNotRun(f"{e} (dcgmi exit status {out.returncode})") from e
        return DcgmObservation(report, out.returncode, level)

    def evaluate(self, observed: DcgmObservation, params: Mapping[str, Any]) -> Verdict:
        report = observed.report
        tests = report.tests()
        skipped = sorted(t for t, s in tests.items() if s == "skip")
        evidence: Dict[str, Any] = {
            "run_level": observed.run_level, "version": report.version, "exit_status": observed.exit_status,
            "tests": tests, "skipped_tests": skipped, "warnings": [_warning(w) for w in report.warnings()],
        }
        where = f"dcgmi diag -r {observed.run_level}"
        failed = report.failed()
        if failed:
            failures = _failures(failed)
            evidence["failing"] = failures
            evidence["failing_entities"] = sorted({r.entity for r in failed if r.entity is not None})
            evidence["suggested_action"] = suggested_action(w.severity for r in failed for w in r.warnings)
            return Verdict(Status.FAIL, f"{where}: " + "; ".join(_describe(f) for f in failures), evidence)
        unknown = sorted({f"{r.test}: {r.status}" for r in report.results if r.status not in _KNOWN_STATUSES})
        if unknown:
            return Verdict(Status.ERROR, f"{where}: status not understood ({', '.join(unknown)})", evidence)
        if not report.ran_anything():
            return Verdict(Status.SKIP, "dcgmi ran no test (all skipped)", evidence)
        if observed.exit_status != 0:
            return Verdict(Status.ERROR, f"{where}: exited {observed.exit_status} although no test failed",
                           evidence)
        ran = len(tests) - len(skipped)
        summary = f"{where}: {ran} test(s) passed" + (f", skipped: {', '.join(skipped)}" if skipped else "")
        return Verdict(Status.PASS, summary, evidence)


def suggested_action(severities: Iterable[Optional[int]]) -> str:
    """The most drastic action any of DCGM's error severities asks for."""
    seen = set(severities)
    return next((action for severity, action in _ACTIONS if severity in seen), DEFAULT_ACTION)


def _failures(failed: Sequence[DcgmResult]) -> List[Dict[str, Any]]:
    """One entry per failing (test, GPU). A 4.x test_summary (entity None) is kept only for a
    test with no per-GPU failure: it repeats their warnings (dcgmi-diag-dcgm4-format.json)."""
    per_entity = {r.test for r in failed if r.entity is not None}
    return [{"test": r.test, "entity": r.entity, "info": r.info, "warnings": [_warning(w) for w in r.warnings]}
            for r in failed if r.entity is not None or r.test not in per_entity]


def _describe(failure: Mapping[str, Any]) -> str:
    where = f"{failure['test']} failed on {failure['entity']}" if failure["entity"] else f"{failure['test']} failed"
    details = [_warning_text(w) for w in failure["warnings"]] or ([failure["info"]] if failure["info"] else [])
    return f"{where}: {' | '.join(details)}" if details else where


def _warning(w: DcgmWarning) -> Dict[str, Any]:
    return {"text": w.text, "error_id": w.error_id, "severity": w.severity,
            "severity_name": SEVERITY_NAMES.get(w.severity) if w.severity is not None else None}


def _warning_text(w: Mapping[str, Any]) -> str:
    codes = [f"error {w['error_id']}"] if w["error_id"] is not None else []
    if w["severity"] is not None:
        codes.append(f"severity {w['severity']} {w['severity_name'] or ''}".rstrip())
    return f"{w['text']} ({', '.join(codes)})" if codes else w["text"]
