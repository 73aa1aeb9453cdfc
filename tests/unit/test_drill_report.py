"""The drill's result and its reports (issue 13): report.json read back with every field checked,
Markdown and HTML with the same tables, text escaped for each format, and the HTML page rendered
by a real headless browser (Debian's chromium)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Dict, List, Set, Tuple

import pytest

from hpresilience.drill.report import (
    FAIL_COLOUR,
    PASS_COLOUR,
    render_html,
    render_json,
    render_markdown,
    write_reports,
)
from hpresilience.drill.result import Canary, Check, DrillResult, ReportError, ScenarioResult, load_result

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "drill" / "sample-report.json"
SCENARIOS = ("xid74_replace", "xid73_reboot", "power_loss", "slurmctld_restart", "controller_sigkill",
             "no_spare_capacity")
HOSTILE = 'a <b>bold</b> & "quoted" \'single\' | pipe <script>alert(1)</script>\nsecond line'


def sample_data() -> Dict[str, Any]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def sample() -> DrillResult:
    return load_result(SAMPLE)


def test_the_sample_has_every_scenario_and_fails_on_the_failed_one() -> None:
    result = sample()

    assert tuple(s.name for s in result.scenarios) == SCENARIOS
    assert result.failures() == ["scenario controller_sigkill failed"]
    assert not result.passed
    assert result.canary.finished_right


def test_a_result_survives_json_and_back() -> None:
    result = sample()

    assert DrillResult.from_dict(json.loads(render_json(result))) == result
    assert json.loads(render_json(result))["passed"] is False


def test_a_canary_that_did_not_finish_fails_the_drill() -> None:
    data = sample_data()
    data["scenarios"][4] = {"name": "controller_sigkill", "passed": True}
    data["canary"]["final_step_seen"] = None
    del data["passed"]

    assert DrillResult.from_dict(data).failures() == ["the canary did not finish, expected step 200"]


def test_no_scenario_is_no_pass() -> None:
    data = sample_data()
    data.update(scenarios=[], passed=False)

    assert DrillResult.from_dict(data).failures() == ["no scenario ran"]


def test_null_optional_fields_read_as_absent() -> None:
    data = sample_data()
    data["scenarios"][3] = {"name": "slurmctld_restart", "passed": True, "title": None, "node": None, "events": None,
                            "times": None, "steps_redone": None, "checks": None, "notes": None}
    data["invariants"] = None
    del data["passed"]

    result = DrillResult.from_dict(data)

    assert result.scenarios[3] == ScenarioResult(name="slurmctld_restart", title="slurmctld_restart", passed=True)
    assert result.invariants == ()


def test_a_result_built_in_code_is_checked_like_a_file() -> None:
    # The orchestrator builds results directly: what it writes, load_result must read back.
    failed = Check(name="node back in service", passed=False, detail="still drained")
    with pytest.raises(ReportError, match="^passed: true, but check 'node back in service' failed$"):
        ScenarioResult(name="xid73_reboot", title="XID 73", passed=True, checks=(failed,))
    twice = ScenarioResult(name="power_loss", title="Power loss", passed=True)
    with pytest.raises(ReportError, match=r"^scenarios\[1\]\.name: 'power_loss' again"):
        DrillResult(drill="d", started_at=0, finished_at=1, cluster="c", scenarios=(twice, twice),
                    canary=Canary(job_id=1, nodes="n1", command="srun", final_step_expected=1, final_step_seen=1))


def _set(path: Tuple[Any, ...], value: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(data: Dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path: Tuple[Any, ...]) -> Callable[[Dict[str, Any]], None]:
    def mutate(data: Dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


MALFORMED = [
    (_delete(("scenarios", 1, "passed")), "scenarios[1].passed: missing"),
    (_set(("scenarios", 2, "events", 0, "at"), "soon"),
     "scenarios[2].events[0].at: expected a number >= 0 or null, got 'soon'"),
    (_set(("scenarios", 2, "events", 0, "at"), float("nan")), "scenarios[2].events[0].at: expected a number"),
    (_set(("scenarios", 0, "times", "detect_seconds"), -1),
     "scenarios[0].times.detect_seconds: expected a number >= 0"),
    (_set(("scenarios", 0, "times", "detect_seconds"), True), "scenarios[0].times.detect_seconds: expected a number"),
    (_set(("scenarios", 0, "times", "detect_second"), 1.0), "scenarios[0].times.detect_second: unknown field"),
    (_set(("scenarios", 0, "checks", 1, "passed"), "yes"),
     "scenarios[0].checks[1].passed: expected true or false, got 'yes'"),
    (_set(("scenarios", 0, "steps_redone"), 1.5), "scenarios[0].steps_redone: expected a whole number >= 0 or null"),
    (_set(("scenarios", 0, "events", 3), "resumed"), "scenarios[0].events[3]: expected an object, got 'resumed'"),
    (_set(("scenarios", 0, "name"), "../x"), "scenarios[0].name: expected an identifier"),
    (_set(("scenarios", 3, "name"), "xid74_replace"), "scenarios[3].name: 'xid74_replace' again"),
    (_set(("scenarios", 4, "passed"), True), "scenarios[4].passed: true, but check 'node back in service' failed"),
    (_set(("scenarios",), {}), "scenarios: expected a list"),
    (_set(("passed",), True), "passed: true, but scenario controller_sigkill failed"),
    (_set(("finished_at",), 1.0), "finished_at: 1.0 is before started_at"),
    (_set(("canary", "final_step_expected"), None),
     "canary.final_step_expected: expected a whole number >= 0, got None"),
    (_delete(("canary",)), "canary: missing"),
    (_set(("invariants", 0, "detail"), 7), "invariants[0].detail: expected a string, got 7"),
]


@pytest.mark.parametrize(("mutate", "message"), MALFORMED)
def test_a_malformed_report_names_the_field(mutate: Callable[[Dict[str, Any]], None], message: str) -> None:
    data = sample_data()
    mutate(data)

    with pytest.raises(ReportError) as caught:
        DrillResult.from_dict(data)
    assert str(caught.value).startswith(message)


def test_a_malformed_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    bad_json, bad_field = tmp_path / "truncated.json", tmp_path / "field.json"
    bad_json.write_text(SAMPLE.read_text(encoding="utf-8")[:200])
    data = sample_data()
    data["scenarios"][0]["times"]["repair_seconds"] = "later"
    bad_field.write_text(json.dumps(data))

    with pytest.raises(ReportError, match=rf"^{re.escape(str(bad_json))}: not JSON: "):
        load_result(bad_json)
    with pytest.raises(ReportError, match=rf"^{re.escape(str(bad_field))}: scenarios\[0\]\.times\.repair_seconds: "):
        load_result(bad_field)


def test_markdown_has_the_summary_each_scenario_and_the_invariants() -> None:
    text = render_markdown(sample())

    assert text.startswith("# Resilience drill d-20261129-2330: FAILED\n")
    assert "- Failed: scenario controller_sigkill failed\n" in text
    assert "| scenario | passed | detect | stop | resume | repair | steps redone |\n" in text
    assert "| xid74_replace | passed | 1.4 s | 3.1 s | 41.7 s | 412.6 s | 3 |\n" in text
    assert "| controller_sigkill | **FAILED** | 1.2 s | 3.0 s | 40.3 s | — | 2 |\n" in text
    assert "| slurmctld_restart | passed | — | — | — | — | 0 |\n" in text
    for name in SCENARIOS:
        assert f"\n## {name}: " in text
    assert "| node_flagged | t+1.4 s |\n" in text
    assert "| node_in_service | not observed |\n" in text
    assert "| node back in service | **FAILED** | n1 still drained after 600 s" in text
    invariants = text.split("\n## Invariants\n")[1]
    assert "| no admin reason touched | passed | n4: 'maint: fan replaced' unchanged |\n" in invariants


def test_times_count_from_the_first_event_when_the_fault_was_not_recorded() -> None:
    data = sample_data()
    data["scenarios"] = [{"name": "late", "passed": True, "events": [
        {"name": "fault_injected", "at": None}, {"name": "node_flagged", "at": 100.0},
        {"name": "node_in_service", "at": 160.5}]},
        {"name": "early", "passed": True, "events": [
            {"name": "canary_step", "at": 98.0}, {"name": "fault_injected", "at": 100.0},
            {"name": "node_flagged", "at": 112.0}]}]
    data["passed"] = True
    result = DrillResult.from_dict(data)

    text, page = render_markdown(result), render_html(result)

    assert "| event | time from node_flagged |\n|---|---|\n| fault_injected | not observed |\n" \
           "| node_flagged | t+0.0 s |\n| node_in_service | t+60.5 s |\n" in text
    assert "| canary_step | t-2.0 s |\n" in text   # before the fault: the axis starts before zero
    assert ">-2 s</text>" in page and ">0 s</text>" in page
    assert "not observed: fault_injected</text>" in page


class _Page(HTMLParser):
    """The elements of a page (tags, per scenario section its SVGs and markers) and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: Set[str] = set()
        self.text: List[str] = []
        self.svgs: Dict[str, int] = {}
        self.markers: Dict[str, int] = {}
        self._section = ""

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Any]]) -> None:
        self.tags.add(tag)
        scenario = dict(attrs).get("data-scenario")
        if tag == "section" and scenario is not None:
            self._section = scenario
            self.svgs[scenario] = self.markers[scenario] = 0
        elif tag == "svg" and self._section:
            self.svgs[self._section] += 1
        elif tag == "circle" and self._section:
            self.markers[self._section] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = ""

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def test_html_has_a_timeline_per_scenario_with_a_marker_per_observed_event() -> None:
    result = sample()

    page = parse(render_html(result))

    assert page.svgs == {s.name: 1 for s in result.scenarios}
    assert page.markers == {s.name: sum(e.at is not None for e in s.events) for s in result.scenarios}
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags  # self-contained


def test_a_scenario_without_events_still_has_its_chart() -> None:
    data = sample_data()
    data["scenarios"][3]["events"] = []

    page = parse(render_html(DrillResult.from_dict(data)))

    assert page.svgs["slurmctld_restart"] == 1
    assert "no event observed" in page.text


def hostile() -> DrillResult:
    data = sample_data()
    scenario = data["scenarios"][4]
    scenario.update(title=HOSTILE, notes=HOSTILE, node="n1<&>")
    scenario["checks"][1]["detail"] = HOSTILE
    scenario["events"][1]["name"] = HOSTILE
    data["cluster"] = HOSTILE
    return DrillResult.from_dict(data)


def test_html_escapes_every_text_from_the_drill() -> None:
    page = parse(render_html(hostile()))

    assert "b" not in page.tags and "script" not in page.tags
    text = "".join(page.text)
    # The cluster, the title, the chart's label, the events table, the detail, the notes.
    assert text.count(HOSTILE) == 6
    assert "n1<&>" in text
    assert f"{HOSTILE} t+1.2 s" in text   # the chart's label


def test_markdown_keeps_hostile_text_in_its_cell() -> None:
    text = render_markdown(hostile())

    assert re.search(r"(?<!\\)<", text) is None   # no tag: every < escaped
    flat = " ".join(HOSTILE.split())
    detail = next(line for line in text.splitlines() if line.startswith("| node back in service | **FAILED** |"))
    # An unescaped pipe would split the detail into more cells: three cells, four separators.
    assert len(re.findall(r"(?<!\\)\|", detail)) == 4
    assert re.sub(r"\\(.)", r"\1", detail) == f"| node back in service | **FAILED** | {flat} |"


def test_json_keeps_hostile_text_as_it_was() -> None:
    result = hostile()

    assert DrillResult.from_dict(json.loads(render_json(result))) == result


def test_write_reports_writes_the_three_files(tmp_path: Path) -> None:
    result = sample()
    directory = tmp_path / "drills" / result.drill

    paths = write_reports(result, directory)

    assert paths == [directory / "report.md", directory / "report.json", directory / "report.html"]
    assert load_result(directory / "report.json") == result
    assert paths[0].read_text(encoding="utf-8") == render_markdown(result)
    assert paths[2].read_text(encoding="utf-8") == render_html(result)
    assert sorted(p.name for p in directory.iterdir()) == ["report.html", "report.json", "report.md"]


# --- In a real browser --------------------------------------------------------------------------

def chromium(args: List[str], profile: Path) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: the drill's HTML report is checked in a real browser (issue 13); "
                    "./scripts/test installs it (apt-get install chromium)")
    # Its own session: on a timeout the whole browser (zygote, renderer, GPU process) is killed,
    # not just the launcher, whose children would keep our pipes open.
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium {' '.join(args)} did not finish in 30 s")
    assert proc.returncode == 0, f"chromium {' '.join(args)} exited {proc.returncode}: {err[-2000:]}"
    return out


def _paeth(left: int, up: int, up_left: int) -> int:
    p = left + up - up_left
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
    return left if pa <= pb and pa <= pc else up if pb <= pc else up_left


def png_pixels(data: bytes) -> Tuple[int, int, Set[bytes]]:
    """Width, height and the distinct RGB colours of an 8-bit RGB or RGBA PNG (chromium's screenshots)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8:pos + 8 + length]
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, "not an 8-bit RGB(A) PNG"
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(chunks[b"IDAT"]), width * bpp
    previous, colours = bytearray(stride), set()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:   # undo the row's filter (PNG spec, section 9)
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((x + up) & 255 for x, up in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + previous[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                left, up_left = (line[i - bpp], previous[i - bpp]) if i >= bpp else (0, 0)
                line[i] = (line[i] + _paeth(left, previous[i], up_left)) & 255
        colours.update(bytes(line[i:i + 3]) for i in range(0, stride, bpp))
        previous = line
    return width, height, colours


def test_the_html_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    result = sample()
    page = write_reports(result, tmp_path / "report")[2]
    shot = tmp_path / "shot.png"

    dom = parse(chromium(["--dump-dom", page.as_uri()], tmp_path / "profile-dom"))
    chromium([f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], tmp_path / "profile-shot")

    # The DOM as the browser built it: one chart per scenario, each scenario's name shown.
    assert dom.svgs == {name: 1 for name in SCENARIOS}
    text = "".join(dom.text)
    assert all(name in text for name in SCENARIOS)
    width, height, colours = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 2000)
    assert len(colours) > 100, f"the screenshot looks blank: {len(colours)} colours"
    # The top of the page: the FAILED badge and the summary's passed cells, in their colours.
    assert bytes.fromhex(FAIL_COLOUR[1:]) in colours and bytes.fromhex(PASS_COLOUR[1:]) in colours
