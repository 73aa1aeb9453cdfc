"""The deep-check parsers on every captured tool output in tests/fixtures/deep-checks/
(provenance and quirks in its README.md), plus malformed inputs (issue 10)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpresilience.deepcheck.parsers import ParseError
from hpresilience.deepcheck.parsers.dcgm import DcgmWarning, parse_dcgm_diag
from hpresilience.deepcheck.parsers.nccl import parse_all_reduce_perf
from hpresilience.deepcheck.parsers.perftest import parse_fi_pingpong, parse_ib_write_bw
from hpresilience.deepcheck.parsers.stress_ng import parse_stress_ng

FIXTURES = Path(__file__).parents[1] / "fixtures" / "deep-checks"
PERSISTENCE = DcgmWarning(
    'Persistence Mode: Persistence mode for GPU 0 is disabled. Enable persistence mode by running '
    '"nvidia-smi -i <gpuId> -pm 1 " as root.', error_id=29, severity=5)
MIB_PER_S_IN_GBITS = 1048576 * 8 / 1e9


def load(name: str) -> str:
    return (FIXTURES / name).read_text()


def load_json(name: str) -> Any:
    return json.loads(load(name))


# --- DCGM -----------------------------------------------------------------------------

def test_dcgm3_level2_pass():
    report = parse_dcgm_diag(load("dcgmi-diag-r2-pass.json"))
    assert report.version is None  # the 3.x capture states none
    assert len(report.results) == 11
    assert set(report.tests().values()) == {"pass"} and report.failed() == ()
    assert report.ran_anything() and report.warnings() == ()
    deployment = [r for r in report.results if r.category == "Deployment"]
    assert len(deployment) == 9 and all(r.entity is None for r in deployment)  # system-wide
    (pcie,) = [r for r in report.results if r.test == "PCIe"]
    assert (pcie.category, pcie.entity, pcie.status) == ("Integration", "GPU 0", "pass")
    assert "bidirectional bandwidth:\t22.49 GB/s" in pcie.info
    (memory,) = [r for r in report.results if r.test == "GPU Memory"]
    assert memory.info == "GPU 0 Allocated 15206918958 bytes (97.3%)"


def test_dcgm3_level3_pass_with_skipped_eud():
    report = parse_dcgm_diag(load("dcgmi-diag-r3-pass.json"))
    tests = report.tests()
    assert len(tests) == 16 and tests["EUD Test"] == "skip"
    assert {name for name, status in tests.items() if status != "pass"} == {"EUD Test"}
    assert {r.category for r in report.results} == {"Deployment", "Integration", "Hardware", "Stress"}
    (diag,) = [r for r in report.results if r.test == "Diagnostic"]
    assert diag.entity == "GPU 0" and "11103.02 gigaflops" in diag.info
    assert tests["Targeted Power"] == "pass" and report.failed() == ()


def test_dcgm31_quirks_preamble_nulls_int_ids_upper_case():
    report = parse_dcgm_diag(load("dcgmi-diag-dcgm3.1-8gpu-quirks.txt"))
    assert report.version == "3.1.0"
    assert len(report.results) == 9 + 8  # the eight nulls in tests[] are skipped
    assert {r.status for r in report.results} == {"pass"}  # "PASS" lower-cased
    # "gpu_ids": "0,1,...,7" marks a system-wide test; an integer id names one GPU.
    assert all(r.entity is None for r in report.results if r.category == "Deployment")
    custom = [r.entity for r in report.results if r.category == "Custom"]
    assert custom == [f"GPU {i}" for i in range(8)]
    assert report.tests()["software"] == "pass" and report.failed() == ()


def test_dcgm4_format_software_fails_on_persistence_mode():
    report = parse_dcgm_diag(load("dcgmi-diag-dcgm4-format.json"))
    assert report.version == "4.5.2"
    assert report.tests() == {"software": "fail", "memory": "pass", "pcie": "pass"}
    # The per-entity Fail and the test_summary Fail; the summary repeats the warning.
    assert [(r.test, r.entity) for r in report.failed()] == [("software", "GPU 0"), ("software", None)]
    assert report.warnings() == (PERSISTENCE,)
    (pcie,) = [r for r in report.results if r.test == "pcie" and r.entity == "GPU 0"]
    assert "bidirectional bandwidth:\t58.69 GB/s" in pcie.info and pcie.category == "Integration"
    (memory,) = [r for r in report.results if r.test == "memory" and r.entity == "GPU 0"]
    assert memory.info == "Allocated 112427837082 bytes (87.5%)"
    summary = report.failed()[1]
    assert "SRAM Threshold checking was skipped" in summary.info


def test_dcgm4_level1_fail_without_summary_warnings():
    report = parse_dcgm_diag(load("dcgmi-diag-dcgm4-r1-fail-persistence.json"))
    assert report.version == "4.2.3"
    assert report.tests() == {"software": "fail"}
    entity_fail, summary_fail = report.failed()
    assert entity_fail.entity == "GPU 0" and entity_fail.warnings == (PERSISTENCE,)
    assert summary_fail.entity is None and summary_fail.warnings == ()  # 4.2.3 has no copy
    assert report.warnings() == (PERSISTENCE,)


def test_dcgm4_gated_plugins_skip():
    report = parse_dcgm_diag(load("dcgmi-diag-dcgm4-r2-skip-gated.json"))
    assert report.version == "4.5.2"
    assert report.tests() == {"software": "fail", "memory": "skip", "pcie": "skip"}
    memory = [r for r in report.results if r.test == "memory"]
    assert all(r.info == "" and r.warnings == () for r in memory)
    assert report.ran_anything()  # software ran (and failed)


def test_dcgm_every_test_skipped_did_not_run():
    doc = load_json("dcgmi-diag-dcgm4-r2-skip-gated.json")
    categories = doc["DCGM Diagnostic"]["test_categories"]
    doc["DCGM Diagnostic"]["test_categories"] = [c for c in categories if c["category"] != "Deployment"]
    report = parse_dcgm_diag(json.dumps(doc))
    assert report.tests() == {"memory": "skip", "pcie": "skip"}
    assert report.failed() == () and not report.ran_anything()


def test_dcgm4_summary_fail_counts_without_entity_fail():
    doc = load_json("dcgmi-diag-dcgm4-format.json")
    memory = doc["DCGM Diagnostic"]["test_categories"][1]["tests"][0]
    memory["test_summary"]["status"] = "Fail"
    report = parse_dcgm_diag(json.dumps(doc))
    assert [r.status for r in report.results if r.test == "memory" and r.entity] == ["pass"]
    assert report.tests()["memory"] == "fail"
    assert ("memory", None) in [(r.test, r.entity) for r in report.failed()]


def test_dcgm4_eight_gpu_excerpt_info_only_on_some_gpus():
    excerpt = load_json("dcgmi-diag-dcgm4-8gpu-test-excerpt.json")
    with pytest.raises(ParseError, match="unknown JSON root"):  # one tests[] element, not a document
        parse_dcgm_diag(json.dumps(excerpt))
    doc = {"DCGM Diagnostic": {"test_categories": [{"category": "Hardware", "tests": [excerpt]}]}}
    report = parse_dcgm_diag(json.dumps(doc))
    per_gpu = [r for r in report.results if r.entity is not None]
    assert [r.entity for r in per_gpu] == [f"GPU {i}" for i in range(8)]
    assert report.tests() == {"diagnostic": "pass"} and report.version is None
    assert "859.08 gigaflops" in per_gpu[0].info
    assert [bool(r.info) for r in per_gpu] == [True] * 3 + [False] * 5


@pytest.mark.parametrize("text, what", [
    ("", "no JSON object"),
    ("dcgmi: command not found\n", "no JSON object"),
    ('{"DCGM Diagnostic": {"test_categories": [', "invalid JSON"),
    ('{"DCGM Diagnostic": {"test_categories": []}}', "no test results"),
    ('{"Something Else": {}}', "unknown JSON root"),
    ("[1, 2]", "no JSON object"),
    ('{"DCGM GPU Diagnostic": {"version": "3.1.0"}}', "holds no test_categories (keys: ['version'])"),
    ('{"DCGM Diagnostic": {"test_categories": {}}}', "test_categories is dict, expected a list"),
    ('{"DCGM Diagnostic": {"test_categories": [{"category": "X", "tests": [{"name": "t", "results": [{}]}]}]}}',
     "'status' is None"),
    ('{"DCGM GPU Diagnostic": {"test_categories": [{"category": "X", "tests": [{"name": "t", "results": '
     '[{"gpu_ids": "zero", "status": "Pass"}]}]}]}}', "gpu_ids is 'zero'"),
    ('{"DCGM Diagnostic": {"test_categories": [{"category": "X", "tests": [{"name": "t", "results": '
     '[{"status": "Pass", "warnings": [{"warning": "w", "error_id": "29"}]}]}]}]}}', "'error_id' is '29'"),
])
def test_dcgm_malformed(text, what):
    with pytest.raises(ParseError) as caught:
        parse_dcgm_diag(text)
    assert caught.value.tool == "dcgmi diag" and what in caught.value.what
    assert str(caught.value) == f"dcgmi diag: {caught.value.what}" and isinstance(caught.value, ValueError)


def test_dcgm_truncated_capture():
    text = load("dcgmi-diag-dcgm4-format.json")
    with pytest.raises(ParseError, match="^dcgmi diag: invalid JSON"):
        parse_dcgm_diag(text[: len(text) // 2])


def _json_paths(node: Any, path: tuple = ()) -> List[tuple]:
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [path] + [p for key, child in children for p in _json_paths(child, path + (key,))]


_DCGM_DOCS = [load_json(name) for name in ("dcgmi-diag-dcgm4-format.json", "dcgmi-diag-r3-pass.json")]
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@given(data=st.data())
def test_dcgm_any_damaged_document_is_a_result_or_parse_error(data):
    doc = copy.deepcopy(data.draw(st.sampled_from(_DCGM_DOCS)))
    path = data.draw(st.sampled_from(_json_paths(doc)[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(_JSON_VALUES)
    _result_or_parse_error(parse_dcgm_diag, json.dumps(doc), "dcgmi diag")


# --- nccl-tests all_reduce_perf -------------------------------------------------------

def test_nccl_8gpu():
    report = parse_all_reduce_perf(load("all_reduce_perf-8gpu.txt"))
    assert report.version == "2.16.2+cuda11.6"
    assert [r.size for r in report.rows] == [33554432 << i for i in range(6)]
    assert (report.avg_busbw, report.out_of_bounds, report.out_of_bounds_failed) == (210.99, 0, False)
    assert report.max_busbw == 231.72 and report.wrong_total == 0
    first = report.rows[0]
    assert (first.oop_algbw, first.oop_busbw, first.ip_algbw, first.ip_busbw) == (97.32, 170.31, 95.99, 167.99)
    assert (first.oop_wrong, first.ip_wrong) == (0, 0)


def test_nccl_legacy_layout_error_column_and_info_line():
    report = parse_all_reduce_perf(load("all_reduce_perf-8gpu-legacy-format.txt"))
    assert len(report.rows) == 34  # the NCCL INFO line inside the table is not a row
    assert [r.size for r in report.rows[:3]] == [0, 0, 4] and report.rows[-1].size == 8589934592
    assert all(r.oop_wrong is None and r.ip_wrong is None for r in report.rows)  # N/A: validation off
    assert report.wrong_total is None
    assert report.max_busbw == 235.26 and report.avg_busbw == 68.4048
    assert report.rows[-1].ip_busbw == 235.03 and report.version is None


def test_nccl_2node():
    report = parse_all_reduce_perf(load("all_reduce_perf-2node.txt"))
    assert report.version == "2.12.12+cuda11.6" and len(report.rows) == 6
    assert (report.avg_busbw, report.max_busbw, report.out_of_bounds) == (150.209, 182.8, 0)
    assert report.rows[-1].ip_busbw == 181.39 and report.wrong_total == 0


def test_nccl_open_mpi_prefixed():
    report = parse_all_reduce_perf(load("all_reduce_perf-2node-p5-mpirun-prefixed.txt"))
    assert len(report.rows) == 32 and report.rows[0].size == 8 and report.rows[-1].size == 17179869184
    assert (report.avg_busbw, report.out_of_bounds, report.out_of_bounds_failed) == (156.742, 0, False)
    assert report.max_busbw == 483.35 and report.rows[-1].oop_busbw == 483.05


@pytest.mark.parametrize("name, rows, last_size, max_busbw", [
    ("all_reduce_perf-2node-p5-srun-label.txt", 32, 17179869184, 487.26),
    ("all_reduce_perf-2node-p4de-srun-label.txt", 29, 2147483648, 78.33),
])
def test_nccl_srun_label_without_summary(name, rows, last_size, max_busbw):
    report = parse_all_reduce_perf(load(name))
    assert len(report.rows) == rows and report.rows[-1].size == last_size
    assert report.max_busbw == max_busbw and report.wrong_total == 0
    assert (report.avg_busbw, report.out_of_bounds, report.out_of_bounds_failed) == (None, None, False)


def test_nccl_wrong_counts_and_failed_bounds():
    report = parse_all_reduce_perf(load("all_reduce_perf-2node-wrong-fail.txt"))
    assert (report.out_of_bounds, report.out_of_bounds_failed, report.avg_busbw) == (108, True, 3.02663)
    assert len(report.rows) == 27 and all(r.oop_wrong > 0 and r.ip_wrong > 0 for r in report.rows)
    (row,) = [r for r in report.rows if r.size == 2097152]
    assert row.oop_wrong == row.ip_wrong == 1.04858e06  # printed in scientific notation
    assert report.rows[-1].oop_wrong == 2.68435e08 and report.max_busbw == 7.64
    assert report.wrong_total > 1e9


@pytest.mark.parametrize("prefix", ["[1,0]<stdout>:", "0: ", "12: "])
def test_nccl_launcher_prefixes_change_nothing(prefix):
    text = load("all_reduce_perf-2node.txt")
    prefixed = "".join(prefix + line for line in text.splitlines(keepends=True))
    assert parse_all_reduce_perf(prefixed) == parse_all_reduce_perf(text)


@pytest.mark.parametrize("text, what", [
    (load("all_reduce_perf-2node-mpirun-slots-error.txt"), "no result table"),
    ("", "no result table"),
    ("# nThread 1 nGpus 1\n#       size         count      type\n", "no result table"),
    ("# Avg bus bandwidth    : nan\n", "unreadable average bus bandwidth 'nan'"),
])
def test_nccl_malformed(text, what):
    with pytest.raises(ParseError) as caught:
        parse_all_reduce_perf(text)
    assert caught.value.tool == "all_reduce_perf" and what in caught.value.what


# --- perftest ib_write_bw and libfabric fi_pingpong ---------------------------------------

def test_ib_write_bw_gbits_sweep():
    report = parse_ib_write_bw(load("ib_write_bw.txt"))
    assert report.tool == "ib_write_bw" and len(report.rows) == 23
    assert [r.size for r in report.rows] == [2 << i for i in range(23)]
    assert {r.iterations for r in report.rows} == {5000}
    assert report.peak_gbits == 92.46  # the 16384-byte row's average
    last = report.rows[-1]
    assert last.size == 8388608 and last.gbits == 92.39 and last.usec_per_xfer is None
    # Cross-check against the MsgRate column (0.001377 Mpps): units were read right.
    assert last.gbits == pytest.approx(8388608 * 8 * 0.001377e6 / 1e9, rel=1e-3)


def test_ib_write_bw_loopback_mb_per_sec_interleaved():
    report = parse_ib_write_bw(load("ib_write_bw-loopback-superbench.txt"))
    assert len(report.rows) == 2  # the server's table and the client's
    assert {(r.size, r.iterations) for r in report.rows} == {(8388608, 20000)}
    # perftest's MB/sec is MiB/s: 24056.72 MiB/s = 201.8 Gbit/s, which the MsgRate
    # column (0.003007 Mpps of 8 MiB) confirms.
    assert report.peak_gbits == pytest.approx(24056.72 * MIB_PER_S_IN_GBITS)
    assert report.peak_gbits == pytest.approx(8388608 * 8 * 0.003007e6 / 1e9, rel=1e-3)


def test_fi_pingpong_sweep():
    report = parse_fi_pingpong(load("fi_pingpong.txt"))
    assert report.tool == "fi_pingpong"
    assert [r.size for r in report.rows] == [64, 256, 1024, 4096, 65536, 1048576]
    assert {r.iterations for r in report.rows} == {10}
    assert report.rows[0].usec_per_xfer == 2049.70
    last = report.rows[-1]
    assert last.usec_per_xfer == 479.75 and report.peak_gbits == last.gbits == pytest.approx(2185.67 * 8 / 1e3)
    # MB/sec is bytes per microsecond: it agrees with size / usec_per_xfer.
    assert last.gbits == pytest.approx(1048576 * 8 / 479.75 / 1e3, rel=1e-4)


def test_fi_pingpong_error_line():
    with pytest.raises(ParseError) as caught:
        parse_fi_pingpong(load("fi_pingpong-efa-fail-connect.txt"))
    assert caught.value.tool == "fi_pingpong"
    assert caught.value.what == "[error] util/pingpong.c:373 : failed to connect: Connection refused"


def test_fi_pingpong_error_after_rows_is_still_an_error():
    text = load("fi_pingpong.txt") + "[error] util/pingpong.c:900 : fi_cq_read: Input/output error\n"
    with pytest.raises(ParseError, match="fi_cq_read"):
        parse_fi_pingpong(text)


@pytest.mark.parametrize("parse, tool, text, what", [
    (parse_ib_write_bw, "ib_write_bw", "", "no bandwidth table"),
    (parse_ib_write_bw, "ib_write_bw", " Couldn't connect to 10.0.0.2:18515\n", "no bandwidth table"),
    (parse_ib_write_bw, "ib_write_bw", load("ib_write_bw.txt").replace("[Gb/sec]", "[KB/sec]"),
     "unknown bandwidth unit 'KB/sec'"),
    (parse_ib_write_bw, "ib_write_bw", load("ib_write_bw.txt").split("#bytes")[0], "no bandwidth table"),
    (parse_fi_pingpong, "fi_pingpong", "", "no bandwidth table"),
    (parse_fi_pingpong, "fi_pingpong", load("fi_pingpong.txt").splitlines()[0], "no bandwidth table"),
])
def test_bandwidth_malformed(parse, tool, text, what):
    with pytest.raises(ParseError) as caught:
        parse(text)
    assert caught.value.tool == tool and what in caught.value.what


# --- stress-ng ---------------------------------------------------------------------------

def test_stress_ng_0_15_06_metrics_without_summary():
    report = parse_stress_ng(load("stress-ng-verify-metrics.txt"))
    cpu, vm = report.metrics
    assert (cpu.stressor, cpu.bogo_ops, cpu.real_time) == ("cpu", 961, 10.03)
    assert (cpu.bogo_ops_per_s_real, cpu.bogo_ops_per_s_cpu) == (95.85, 256.84)
    assert (vm.stressor, vm.bogo_ops, vm.bogo_ops_per_s_real, vm.bogo_ops_per_s_cpu) == ("vm", 20992, 2033.93, 4861.60)
    assert report.completed is True and report.untrustworthy is None  # this release prints no summary
    assert (report.passed, report.failed, report.skipped) == ({}, {}, {})
    assert report.fail_lines == () and report.error_lines == ()


def test_stress_ng_current_layout():
    report = parse_stress_ng(load("stress-ng-metrics.txt"))
    (cpu,) = report.metrics
    assert (cpu.stressor, cpu.bogo_ops, cpu.real_time) == ("cpu", 1531429, 120.00)
    assert (cpu.bogo_ops_per_s_real, cpu.bogo_ops_per_s_cpu) == (12762.02, 1669.78)
    assert (report.passed, report.failed, report.skipped) == ({"cpu": 8}, {}, {})
    assert report.untrustworthy == 0 and report.completed is True


def test_stress_ng_verify_pass_with_rapl_lines():
    report = parse_stress_ng(load("stress-ng-verify.txt"))
    assert report.metrics == ()  # the RAPL power lines are not metrics rows
    assert (report.passed, report.failed, report.skipped) == ({"matrix-3d": 8}, {}, {})
    assert report.completed is True and report.fail_lines == ()


def test_stress_ng_legacy_info_metrics():
    report = parse_stress_ng(load("stress-ng-metrics-legacy-info.txt"))
    assert [m.stressor for m in report.metrics] == ["cpu", "vm", "hdd", "fork"]
    hdd = report.metrics[2]
    assert (hdd.bogo_ops, hdd.real_time, hdd.bogo_ops_per_s_real, hdd.bogo_ops_per_s_cpu) == (
        367558, 123.78, 2969.49, 16482.42)
    assert report.completed is True and report.untrustworthy is None and report.passed == {}


def test_stress_ng_verify_failure():
    report = parse_stress_ng(load("stress-ng-verify-fail-memory.txt"))
    assert (report.passed, report.failed, report.skipped) == ({}, {"vm": 1}, {})
    assert report.completed is False and report.untrustworthy == 0
    assert report.fail_lines == ("elon: detected 1 memory error",) * 5 + (
        "vm: detected 5 bit errors while stressing memory",)
    assert report.error_lines == ("vm: [8014] terminated with an error, exit status=2 (stressor failed)",)


def test_stress_ng_skipped_instances():
    report = parse_stress_ng(load("stress-ng-verify-vm-skipped.txt"))
    assert (report.passed, report.failed, report.skipped) == ({"vm": 190}, {}, {"vm": 2})
    assert report.completed is True and report.fail_lines == ()


@pytest.mark.parametrize("text, what", [
    ("", "no metrics, summary, failure or completion line"),
    ("stress-ng: command not found\n", "no metrics, summary, failure or completion line"),
    # Killed before the end: only the start-up lines.
    ("stress-ng: info:  [1] setting to a 10 secs run per stressor\nstress-ng: info:  [1] dispatching hogs: 1 vm\n",
     "no metrics, summary, failure or completion line"),
    ("stress-ng: info:  [1] failed: 2: vm (1)\n", "does not add up"),
])
def test_stress_ng_malformed(text, what):
    with pytest.raises(ParseError) as caught:
        parse_stress_ng(text)
    assert caught.value.tool == "stress-ng" and what in caught.value.what


# --- Any text: a report or a ParseError, nothing else -------------------------------------

def _result_or_parse_error(parse: Callable[[str], Any], text: str, tool: str) -> None:
    try:
        parse(text)
    except ParseError as e:
        assert e.tool == tool


def _fixture_lines(prefix: str) -> List[str]:
    return [line for path in sorted(FIXTURES.glob(prefix + "*")) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("parse, tool, prefix", [
    (parse_dcgm_diag, "dcgmi diag", "dcgmi-"),
    (parse_all_reduce_perf, "all_reduce_perf", "all_reduce_perf-"),
    (parse_ib_write_bw, "ib_write_bw", "ib_write_bw"),
    (parse_fi_pingpong, "fi_pingpong", "fi_pingpong"),
    (parse_stress_ng, "stress-ng", "stress-ng-"),
])
@given(data=st.data())
def test_any_text_is_a_report_or_parse_error(parse, tool, prefix, data):
    lines = st.lists(st.sampled_from(_fixture_lines(prefix)) | st.text(max_size=40), max_size=30)
    _result_or_parse_error(parse, "\n".join(data.draw(lines)), tool)
    _result_or_parse_error(parse, data.draw(st.text()), tool)
