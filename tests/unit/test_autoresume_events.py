"""The controller's count of srun --auto-resume recoveries from the runner's events files in a
shared state directory (issue 12). Users write these files: junk, links and FIFOs must neither
count nor hurt the controller. Real files in tmp_path; the clock is given."""
import json
import os
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from hpresilience.controller.autoresume_events import MAX_READ_BYTES, AutoResumeEvents
from hpresilience.controller.metrics import ControllerMetrics

START = 1_800_000_000.0


@pytest.fixture
def events(tmp_path: Path) -> AutoResumeEvents:
    return AutoResumeEvents(tmp_path, ControllerMetrics(), clock=lambda: START)


def write(path: Path, *records: object, raw: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + raw)
    os.utime(path, (START + 10, START + 10))


def resumed(path: str = "in_allocation", seconds: object = 0.8, at: object = START + 5) -> dict:
    return {"at": at, "event": "resumed", "step": "abc.0", "attempt": 2, "path": path, "seconds": seconds}


def count(events: AutoResumeEvents, path: str) -> Optional[float]:
    return events.metrics.registry.get_sample_value("hpr_autoresume_recoveries_total", {"path": path})


def test_recoveries_are_counted_by_path_once_each(events, tmp_path):
    log = tmp_path / "auto-resume-17.events.jsonl"
    write(log, {"at": START + 1, "event": "attempt_started", "attempt": 1}, resumed(), resumed("requeue", 4.5))
    assert events.scan() == 2
    assert (count(events, "in_allocation"), count(events, "requeue")) == (1, 1)
    assert events.metrics.registry.get_sample_value("hpr_autoresume_recovery_seconds_sum",
                                                    {"path": "requeue"}) == 4.5
    assert events.scan() == 0                               # nothing new: nothing counted again
    write(log, {"at": START + 9, "event": "gave_up", "reason": "attempts used up"})
    assert events.scan() == 1
    assert events.metrics.registry.get_sample_value("hpr_autoresume_gave_up_total", {}) == 1


def test_events_from_before_the_controller_started_are_not_counted_again(events, tmp_path):
    log = tmp_path / "auto-resume-17.events.jsonl"
    write(log, resumed(at=START - 100), resumed(at=START + 1))
    assert events.scan() == 1 and count(events, "in_allocation") == 1
    old = tmp_path / "auto-resume-3.events.jsonl"
    write(old, resumed())
    os.utime(old, (START - 50, START - 50))                 # untouched since before the start: skipped
    assert events.scan() == 0


def test_a_line_is_counted_once_it_is_complete(events, tmp_path):
    log = tmp_path / "auto-resume-17.events.jsonl"
    line = json.dumps(resumed())
    write(log, raw=line[:20])
    assert events.scan() == 0
    write(log, raw=line[20:] + "\n")
    assert events.scan() == 1


@pytest.mark.parametrize("bad", [
    "not json", "[1, 2]", json.dumps(resumed(path="prod-cluster-7")), json.dumps(resumed(seconds=-1)),
    json.dumps(resumed(seconds="0.5")), json.dumps(resumed(seconds=True)), '{"at": NaN, "event": "resumed"}',
    json.dumps(resumed(seconds=1e12)), json.dumps(resumed(at="now")), json.dumps({**resumed(), "path": ["requeue"]}),
])
def test_junk_a_user_writes_is_not_counted(events, tmp_path, bad):
    write(tmp_path / "auto-resume-17.events.jsonl", resumed("requeue"), raw=bad + "\n")
    assert events.scan() == 1 and count(events, "requeue") == 1        # the good line next to it was read
    assert count(events, "in_allocation") == 0


def test_links_fifos_and_overlong_lines_cannot_hang_or_feed_the_count(events, tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    write(elsewhere, resumed())
    (tmp_path / "auto-resume-1.events.jsonl").symlink_to(elsewhere)
    os.mkfifo(tmp_path / "auto-resume-2.events.jsonl")       # opening it to read would block
    huge = tmp_path / "auto-resume-3.events.jsonl"
    write(huge, raw="x" * (MAX_READ_BYTES + 10) + "\n")
    write(huge, resumed("requeue"))
    real = tmp_path / "auto-resume-4.events.jsonl"
    write(real, resumed())
    assert events.scan() == 1 and count(events, "in_allocation") == 1
    events.scan()                                            # the rest of the overlong line, then the good one
    assert count(events, "requeue") == 1


def test_a_replaced_file_is_read_from_its_start(events, tmp_path):
    log = tmp_path / "auto-resume-17.events.jsonl"
    write(log, resumed(), resumed())
    assert events.scan() == 2
    log.unlink()
    write(log, resumed())                                    # a new job with the same id (ids wrap)
    assert events.scan() == 1 and count(events, "in_allocation") == 3


def test_an_unreadable_directory_counts_nothing_and_does_not_raise(tmp_path):
    events = AutoResumeEvents(tmp_path / "not-mounted", ControllerMetrics(), clock=lambda: START)
    assert events.scan() == 0
    (tmp_path / "not-mounted").mkdir()
    write(tmp_path / "not-mounted" / "auto-resume-1.events.jsonl", resumed())
    assert events.scan() == 1


def test_a_new_leader_counts_only_from_its_takeover(events, tmp_path):
    log = tmp_path / "auto-resume-17.events.jsonl"
    write(log, resumed())
    events.clock = lambda: START + 60
    events.start_counting()
    write(log, resumed(at=START + 30), resumed(at=START + 61))
    os.utime(log, (START + 62, START + 62))
    assert events.scan() == 1


@pytest.mark.parametrize("bad", [
    '{"at": 1' + "0" * 400 + ', "event": "resumed", "path": "requeue", "seconds": 1}',
    json.dumps(resumed("requeue"))[:-1] + ', "seconds": 1' + "0" * 400 + "}",
    "[" * 100000 + "]" * 100000,
])
def test_lines_that_overflow_or_nest_deep_are_junk_not_a_crash(events, tmp_path, bad):
    """Issue 12 review: a 400-digit number overflowed math.isfinite, deep nesting raised RecursionError;
    either escaped the scan (a failed pass, the good lines after it lost)."""
    log = tmp_path / "auto-resume-17.events.jsonl"
    write(log, raw=bad + "\n")
    write(log, resumed())
    assert events.scan() == 1 and count(events, "in_allocation") == 1 and count(events, "requeue") == 0


def test_a_scan_reads_a_bounded_amount_and_the_next_goes_on_where_it_stopped(events, tmp_path, monkeypatch):
    monkeypatch.setattr("hpresilience.controller.autoresume_events.MAX_SCAN_BYTES", 3000)
    line = json.dumps(resumed()) + "\n"
    for job in range(10):
        write(tmp_path / f"auto-resume-{job}.events.jsonl", raw=line * 10)   # ~1.3 kB each
    first = events.scan()
    assert 0 < first < 100
    total = first
    for _ in range(10):
        total += events.scan()
    assert total == 100 and count(events, "in_allocation") == 100


def test_the_background_scan_counts_only_while_this_controller_leads(tmp_path):
    events = AutoResumeEvents(tmp_path, ControllerMetrics(), clock=lambda: START)
    write(tmp_path / "auto-resume-1.events.jsonl", resumed())
    asked = []
    leads = threading.Event()

    def leading() -> bool:
        asked.append(leads.is_set())
        return leads.is_set()

    thread = events.run_in_background(leading, interval=0.01)
    try:
        wait_for(lambda: len(asked) >= 3)                  # the loop ran, as a standby
        assert count(events, "in_allocation") == 0
        leads.set()
        wait_for(lambda: count(events, "in_allocation") == 1)
    finally:
        events.stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
