"""A drill's report (issue 13): Markdown for people and pull requests, JSON for tools
(`hpresilience goodput` reads the measured times back), and one self-contained HTML page
with a timeline chart per scenario (inline SVG: no script, font or style sheet is fetched,
so the page opens the same on an air-gapped controller host).

Every table is built once (`_Table`) and written by both the Markdown and the HTML writer.
All text from the drill (titles, details, notes, even names) is escaped for the format it
lands in: a check's detail quotes Slurm reasons and commands, which contain < & " and |.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from hpresilience.drill.result import Check, DrillResult, ScenarioResult

# A cell is text, or a verdict each format shows its own way (bold in Markdown, coloured in HTML).
Cell = Union[str, bool]

PASS_COLOUR, FAIL_COLOUR = "#1a7f37", "#cf222e"
_NOT_MEASURED = "—"
_TIMES_NOTE = ("Times are seconds from the fault: detect → the node flagged, stop → the training step "
               "stopped, resume → the first training step after the resume, repair → the node back in service.")


@dataclass(frozen=True)
class _Table:
    headers: Tuple[str, ...]
    rows: Tuple[Tuple[Cell, ...], ...]


def _seconds(value: Optional[float]) -> str:
    return _NOT_MEASURED if value is None else f"{value:.1f} s"


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes) + [f"{secs} s"]
    return " ".join(parts)


def _verdict(passed: bool) -> str:
    return "passed" if passed else "FAILED"


def _origin(scenario: ScenarioResult) -> Tuple[Optional[float], str]:
    """The timeline's zero and what it is: the fault, or (fault time not recorded) the first event seen."""
    if scenario.fault_at is not None:
        return scenario.fault_at, "the fault"
    first = next((e for e in scenario.events if e.at is not None), None)
    return (None, "the fault") if first is None else (first.at, first.name)


def _relative(at: Optional[float], origin: Optional[float]) -> str:
    if at is None or origin is None:
        return "not observed"
    return f"t{at - origin:+.1f} s"


def _summary_table(result: DrillResult) -> _Table:
    rows = tuple((s.name, s.passed, _seconds(s.times.detect_seconds), _seconds(s.times.stop_seconds),
                  _seconds(s.times.resume_seconds), _seconds(s.times.repair_seconds),
                  _NOT_MEASURED if s.steps_redone is None else str(s.steps_redone))
                 for s in result.scenarios)
    return _Table(("scenario", "passed", "detect", "stop", "resume", "repair", "steps redone"), rows)


def _events_table(scenario: ScenarioResult) -> _Table:
    origin, label = _origin(scenario)
    return _Table(("event", f"time from {label}"),
                  tuple((e.name, _relative(e.at, origin)) for e in scenario.events))


def _checks_table(checks: Sequence[Check], what: str) -> _Table:
    return _Table((what, "passed", "detail"), tuple((c.name, c.passed, c.detail) for c in checks))


def _facts(result: DrillResult) -> List[Tuple[str, str]]:
    """The header's lines: (label, plain text)."""
    canary = result.canary
    seen = "did not finish" if canary.final_step_seen is None else f"final step {canary.final_step_seen}"
    job = "never started" if canary.job_id is None else f"job {canary.job_id}"
    facts = [("Cluster", result.cluster),
             ("Started", f"{_clock(result.started_at)}, took {_duration(result.finished_at - result.started_at)}"),
             ("Canary", f"{job} on {canary.nodes}: {canary.command}"),
             ("Canary result", f"{seen} of {canary.final_step_expected}")]
    facts += [("Failed", failure) for failure in result.failures()]
    return facts


# --- Markdown -------------------------------------------------------------------------------

# What Markdown (CommonMark + GFM tables) would read as syntax in a line of text; each is
# backslash-escaped. Kept to what matters so the raw file stays readable: an underscore inside
# a word (xid74_replace) never makes emphasis, a "]" makes a link only before "(" or "[",
# and ">" or "#" only at a line's start, where drill text never lands.
_MD_SYNTAX = re.compile(r"[\\`*~<&|]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|\](?=[(\[])")


def _md(text: str) -> str:
    # A newline would end a table row or a list item: a cell's text is one line.
    return _MD_SYNTAX.sub(lambda m: "\\" + m.group(0), " ".join(text.split()))


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, bool):
        return "passed" if cell else "**FAILED**"
    return _md(cell) or " "


def _md_table(table: _Table) -> List[str]:
    lines = ["| " + " | ".join(_md(h) for h in table.headers) + " |",
             "|" + "---|" * len(table.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines + [""]


def _md_scenario(scenario: ScenarioResult) -> List[str]:
    lines = [f"## {_md(scenario.name)}: {_md(scenario.title)} ({_verdict(scenario.passed)})", ""]
    if scenario.node is not None:
        lines += [f"Node: {_md(scenario.node)}", ""]
    lines += _md_table(_events_table(scenario)) if scenario.events else ["No event recorded.", ""]
    lines += _md_table(_checks_table(scenario.checks, "check")) if scenario.checks else ["No check recorded.", ""]
    if scenario.notes.strip():
        lines += [f"Notes: {_md(scenario.notes)}", ""]
    return lines


def render_markdown(result: DrillResult) -> str:
    lines = [f"# Resilience drill {_md(result.drill)}: {_verdict(result.passed)}", ""]
    lines += [f"- {label}: {_md(text)}" for label, text in _facts(result)]
    lines += ["", "## Summary", "", _md(_TIMES_NOTE), ""] + _md_table(_summary_table(result))
    for scenario in result.scenarios:
        lines += _md_scenario(scenario)
    lines += ["## Invariants", ""]
    lines += _md_table(_checks_table(result.invariants, "invariant")) if result.invariants else \
        ["No invariant recorded.", ""]
    return "\n".join(lines)


# --- JSON -----------------------------------------------------------------------------------

def render_json(result: DrillResult) -> str:
    # allow_nan=False: the file must be strict JSON for other tools (result.py refuses NaN too).
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --- HTML -----------------------------------------------------------------------------------

def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, bool):
        return f'<td class="{"pass" if cell else "fail"}">{_verdict(cell)}</td>'
    return f"<td>{_h(cell)}</td>"


def _html_table(table: _Table) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in table.headers)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>\n" for row in table.rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _ticks(low: float, high: float, target: int = 8) -> List[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step)
    return [i * step for i in range(first, math.floor(high / step) + 1)]


_SVG_WIDTH, _SVG_MARGIN, _ROW = 960, 24, 20


def _timeline_svg(scenario: ScenarioResult) -> str:
    """A horizontal axis in seconds from the fault, one marker per observed event on it and
    each event's label on its own row above (events seconds apart would overlap on one row)."""
    origin, label = _origin(scenario)
    seen = [(e.name, e.at - origin) for e in scenario.events if e.at is not None and origin is not None]
    colour = PASS_COLOUR if scenario.passed else FAIL_COLOUR
    aria = _h(f"Timeline of {scenario.name}: {len(seen)} events, seconds from {label}")
    if not seen:
        return (f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="40" '
                f'role="img" aria-label="{aria}"><text x="{_SVG_MARGIN}" y="24">no event observed</text></svg>')
    low = min(0.0, *(t for _, t in seen))
    high = max(low + 1.0, *(t for _, t in seen))
    span = _SVG_WIDTH - 2 * _SVG_MARGIN

    def x(t: float) -> float:
        return _SVG_MARGIN + (t - low) / (high - low) * span

    axis_y = 12 + len(seen) * _ROW
    parts = [f'<rect x="{x(0):.1f}" y="{axis_y - 4}" width="{x(max(t for _, t in seen)) - x(0):.1f}" height="8" '
             f'fill="{colour}" fill-opacity="0.25"/>',
             f'<line x1="{_SVG_MARGIN}" y1="{axis_y}" x2="{_SVG_WIDTH - _SVG_MARGIN}" y2="{axis_y}" stroke="#57606a"/>']
    for tick in _ticks(low, high):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{axis_y}" x2="{x(tick):.1f}" y2="{axis_y + 5}" stroke="#57606a"/>'
                     f'<text class="tick" x="{x(tick):.1f}" y="{axis_y + 18}" text-anchor="middle">{tick:g} s</text>')
    for row, (name, t) in enumerate(seen):
        row_y = 12 + row * _ROW + 4
        left = x(t) < _SVG_WIDTH / 2   # labels grow away from the nearer edge, so none is cut off
        text_x = x(t) + 7 if left else x(t) - 7
        parts.append(f'<line x1="{x(t):.1f}" y1="{row_y - 4}" x2="{x(t):.1f}" y2="{axis_y}" stroke="#8c959f" '
                     f'stroke-dasharray="2,2"/>'
                     f'<circle cx="{x(t):.1f}" cy="{axis_y}" r="5" fill="{colour}"/>'
                     f'<text x="{text_x:.1f}" y="{row_y}" text-anchor="{"start" if left else "end"}">'
                     f'{_h(name)} t{t:+.1f} s</text>')
    height = axis_y + 28
    missing = [e.name for e in scenario.events if e.at is None]
    if missing:   # what never happened is most of what a failed scenario has to say
        parts.append(f'<text class="missing" x="{_SVG_MARGIN}" y="{height + 4}">'
                     f'not observed: {_h(", ".join(missing))}</text>')
        height += 16
    return (f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{height}" '
            f'viewBox="0 0 {_SVG_WIDTH} {height}" role="img" aria-label="{aria}">'
            f'<title>{aria}</title>\n' + "\n".join(parts) + "\n</svg>\n")


def _html_scenario(index: int, scenario: ScenarioResult) -> str:
    verdict = "pass" if scenario.passed else "fail"
    out = [f'<section class="scenario {verdict}" id="scenario-{index}" data-scenario="{_h(scenario.name)}">',
           f'<h2><span class="badge {verdict}">{_verdict(scenario.passed)}</span> '
           f'<code>{_h(scenario.name)}</code> {_h(scenario.title)}</h2>']
    if scenario.node is not None:
        out.append(f"<p>Node: {_h(scenario.node)}</p>")
    out.append(_timeline_svg(scenario))
    out.append(_html_table(_events_table(scenario)) if scenario.events else "<p>No event recorded.</p>")
    out.append(_html_table(_checks_table(scenario.checks, "check")) if scenario.checks else
               "<p>No check recorded.</p>")
    if scenario.notes.strip():
        out.append(f'<p class="notes">Notes: {_h(scenario.notes)}</p>')
    return "\n".join(out) + "\n</section>\n"


_STYLE = f"""
body {{ font-family: sans-serif; margin: 2em; color: #1f2328; max-width: 1000px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }}
td.pass {{ background: #dafbe1; color: {PASS_COLOUR}; }}
td.fail {{ background: #ffebe9; color: {FAIL_COLOUR}; font-weight: bold; }}
.badge {{ color: #fff; border-radius: 4px; padding: 1px 8px; font-size: 0.8em; vertical-align: middle; }}
.badge.pass {{ background: {PASS_COLOUR}; }}
.badge.fail {{ background: {FAIL_COLOUR}; }}
section.scenario {{ border-left: 6px solid {PASS_COLOUR}; padding-left: 1em; margin: 2em 0; }}
section.scenario.fail {{ border-left-color: {FAIL_COLOUR}; }}
svg.timeline {{ display: block; font-size: 12px; max-width: 100%; height: auto; }}
svg.timeline .tick {{ fill: #57606a; font-size: 11px; }}
svg.timeline .missing {{ fill: {FAIL_COLOUR}; }}
"""


def render_html(result: DrillResult) -> str:
    verdict = "pass" if result.passed else "fail"
    title = _h(f"Resilience drill {result.drill}: {_verdict(result.passed)}")
    facts = "".join(f"<li>{_h(label)}: {_h(text)}</li>\n" for label, text in _facts(result))
    scenarios = "".join(_html_scenario(i, s) for i, s in enumerate(result.scenarios))
    invariants = _html_table(_checks_table(result.invariants, "invariant")) if result.invariants else \
        "<p>No invariant recorded.</p>\n"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n"
            f'<h1><span class="badge {verdict}">{_verdict(result.passed)}</span> '
            f"Resilience drill {_h(result.drill)}</h1>\n"
            f"<ul>\n{facts}</ul>\n<h2>Summary</h2>\n<p>{_h(_TIMES_NOTE)}</p>\n{_html_table(_summary_table(result))}"
            f"{scenarios}<h2>Invariants</h2>\n{invariants}</body>\n</html>\n")


# --- Files ----------------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    # Through a rename: `hpresilience goodput` may read report.json while a drill rewrites it.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(result: DrillResult, directory: Path) -> List[Path]:
    """report.md, report.json and report.html in `directory` (created); their paths, in that order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, render in (("report.md", render_markdown), ("report.json", render_json), ("report.html", render_html)):
        path = directory / name
        _write(path, render(result))
        paths.append(path)
    return paths

