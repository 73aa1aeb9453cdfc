"""Kernel-log sources: real files in tmp_path (real rename, truncate, unlink),
/dev/kmsg and journalctl only where they work here; kmsg parsing as a pure function."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

import pytest

from hpresilience.agent.logsource import (
    MAX_LINE_BYTES,
    FileSource,
    JournalSource,
    KmsgSource,
    LogLine,
    LogSource,
    LogSourceError,
    open_source,
    parse_kmsg_record,
)

XID = "kernel: NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link 6"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kern.log"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def texts(source: LogSource, max_bytes: int = 1 << 20) -> List[str]:
    return [line.text for line in source.read(max_bytes)]


def file_source(path: Path, state: Path, **kw) -> FileSource:
    kw.setdefault("partial_timeout_seconds", 3600)  # behaviour tests must not depend on the machine's speed
    return FileSource(path, state, **kw)


# ----------------------------------------------------------------------------- FileSource basics
def test_appended_lines_are_read_in_order_with_metadata(path, state):
    path.touch()
    src = file_source(path, state)
    assert src.read() == []
    append(path, f"a\n{XID}\r\n".encode())
    before = time.time()
    lines = src.read()
    assert [line.text for line in lines] == ["a", XID]
    assert all(line.source == f"file:{path}" and line.received_at >= before for line in lines)
    assert src.read() == []
    assert src.lag_bytes() == 0
    src.close()


def test_first_start_begins_at_end_of_file(path, state):
    path.write_bytes(b"old 1\nold 2\n")
    src = file_source(path, state)
    assert texts(src) == []
    append(path, b"new\n")
    assert texts(src) == ["new"]


def test_restart_resumes_from_cursor_without_replay_or_loss(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\nb\npar")
    assert texts(src) == ["a", "b"]  # "par" is held: no newline yet
    append(path, b"tial\nc\n")        # written before the stop, never read
    src.close()
    append(path, b"d\n")              # written while stopped
    restarted = file_source(path, state)
    assert texts(restarted) == ["partial", "c", "d"]
    restarted.close()
    assert not [p for p in state.iterdir() if p.suffix == ".tmp"]


def test_stale_cursor_starts_at_end(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()
    append(path, b"written long ago\n")
    time.sleep(0.01)
    restarted = file_source(path, state, max_age_seconds=0)
    assert texts(restarted) == []
    append(path, b"new\n")
    assert texts(restarted) == ["new"]


def test_corrupt_cursor_counts_as_first_start(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()
    for cursor in state.glob("logsource-*.json"):
        cursor.write_text("{not json")
    append(path, b"written while stopped\n")
    restarted = file_source(path, state)
    assert texts(restarted) == []
    append(path, b"new\n")
    assert texts(restarted) == ["new"]


def test_unwritable_state_dir_does_not_stop_reading(path, tmp_path):
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("")
    path.touch()
    src = file_source(path, not_a_dir)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()


# ----------------------------------------------------------------------------- rotation, truncation, deletion
def test_rotation_finishes_old_file_before_switching(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    rotated = path.with_name("kern.log.1")
    with open(path, "ab") as writer:      # a writer that keeps its descriptor across the rename
        os.rename(path, rotated)
        writer.write(b"b after rename\nunfinished")
    path.write_bytes(b"c in new file\n")
    assert texts(src) == ["b after rename", "unfinished", "c in new file"]
    append(path, b"d\n")
    append(rotated, b"late write to old file\n")  # after the switch: not ours any more
    assert texts(src) == ["d"]


def test_rotation_while_stopped_resumes_in_renamed_file(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()
    append(path, b"b before rotation\n")
    os.rename(path, path.with_name("kern.log-20240101"))
    path.write_bytes(b"c after rotation\n")
    restarted = file_source(path, state)
    assert texts(restarted) == ["b before rotation", "c after rotation"]


def test_file_replaced_while_stopped_is_read_from_start(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()
    path.unlink()  # rotated and compressed away: the cursor's inode is gone
    path.write_bytes(b"b in the new file\n")
    restarted = file_source(path, state)
    assert texts(restarted) == ["b in the new file"]


def test_unchanged_older_file_swapped_in_starts_at_end(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    src.close()
    path.unlink()
    path.write_bytes(b"history restored from a backup\n")
    day_ago = time.time() - 86400
    os.utime(path, (day_ago, day_ago))
    restarted = file_source(path, state)
    assert texts(restarted) == []
    append(path, b"new\n")
    assert texts(restarted) == ["new"]


def test_copytruncate_is_read_from_start(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"one\ntwo\n")
    assert texts(src) == ["one", "two"]
    os.truncate(path, 0)
    append(path, b"three\n")
    assert texts(src) == ["three"]


def test_truncation_regrown_past_offset_between_polls_is_noticed(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"short\n")
    assert texts(src) == ["short"]
    os.truncate(path, 0)
    append(path, b"a longer first line\nsecond\n")  # already longer than our old offset
    assert texts(src) == ["a longer first line", "second"]


def test_copytruncate_with_non_append_writer_skips_the_nul_hole(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"old 1\nold 2\n")
    assert texts(src) == ["old 1", "old 2"]
    os.truncate(path, 0)
    with open(path, "r+b") as writer:  # the writer's offset survives the truncation
        writer.seek(12)
        writer.write(b"new\n")
    assert texts(src) == ["new"]


def test_deleted_file_is_drained_then_recreated_file_read_from_start(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"a\n")
    assert texts(src) == ["a"]
    append(path, b"b written before the delete\n")
    path.unlink()
    assert texts(src) == ["b written before the delete"]
    assert texts(src) == []
    assert src.lag_bytes() == 0
    path.write_bytes(b"c\n")
    assert texts(src) == ["c"]
    append(path, b"d\n")
    assert texts(src) == ["d"]


def test_file_missing_at_start_is_read_from_start_when_it_appears(path, state):
    src = file_source(path, state)
    assert texts(src) == []
    assert texts(src) == []
    path.write_bytes(b"first\nsecond\n")
    assert src.lag_bytes() == len(b"first\nsecond\n")
    assert texts(src) == ["first", "second"]


# ----------------------------------------------------------------------------- robust bytes
def test_non_utf8_nul_and_binary_bytes_never_raise(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"caf\xe9 latin-1\n" + b"nul\x00inside\n" + bytes(range(256)) * 4 + b"\n" + os.urandom(4096)
           + b"\nafter garbage\n")
    lines = texts(src)
    assert lines[:2] == ["caf\ufffd latin-1", "nulinside"]
    assert lines[-1] == "after garbage"
    assert all("\x00" not in line and "\n" not in line for line in lines)


def test_one_megabyte_line_is_capped_and_next_line_intact(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"A" * 1_000_000 + b"\nnext\n")
    lines: List[str] = []
    while src.lag_bytes():
        lines += texts(src, max_bytes=64 * 1024)  # the long line spans many reads
    assert lines == ["A" * MAX_LINE_BYTES, "next"]


def test_partial_line_is_held_until_its_newline(path, state):
    path.touch()
    src = file_source(path, state)
    append(path, b"NVRM: Xid (PCI:0000:b9:00): ")
    assert texts(src) == []
    append(path, b"79, GPU has fallen off the bus.\n")
    assert texts(src) == ["NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."]


def test_partial_line_is_emitted_after_timeout(path, state):
    path.touch()
    src = file_source(path, state, partial_timeout_seconds=0.05)
    append(path, b"writer crashed mid-line")
    lines = texts(src)
    time.sleep(0.1)
    lines += texts(src)
    assert lines == ["writer crashed mid-line"]
    append(path, b"\nnext\n")
    assert texts(src) == ["next"]


def test_flood_is_read_in_bounded_chunks_until_lag_is_zero(path, state):
    path.touch()
    src = file_source(path, state)
    count = 500_000
    append(path, b"".join(b"%09d " % i + b"x" * 90 + b"\n" for i in range(count)))  # 50 MB
    budget = 1 << 20
    lags = [src.lag_bytes()]
    seen = 0
    while lags[-1]:
        lines = src.read(budget)
        assert sum(len(line.text) + 1 for line in lines) <= budget + MAX_LINE_BYTES
        assert lines and int(lines[0].text[:9]) == seen
        seen += len(lines)
        lags.append(src.lag_bytes())
    assert lags[0] == count * 101
    assert all(a > b for a, b in zip(lags, lags[1:]))
    assert seen == count


# ----------------------------------------------------------------------------- /dev/kmsg
def test_kmsg_record_is_parsed():
    record = parse_kmsg_record(b"4,1203,5123456,-;NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.\n")
    assert record is not None
    assert (record.facility, record.level, record.seq, record.usec) == (0, 4, 1203, 5123456)
    assert record.message == "NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus."


def test_kmsg_continuation_lines_are_metadata_not_message():
    raw = b"6,199,260490,-;pci 0000:00:01.0: BAR 0\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:01.0\n"
    record = parse_kmsg_record(raw)
    assert record is not None
    assert record.message == "pci 0000:00:01.0: BAR 0"


def test_kmsg_extra_header_fields_flags_and_escapes():
    record = parse_kmsg_record(b"14,7,99,c,caller=T42;tab\\x09and \\x5cbackslash caf\\xc3\\xa9")
    assert record is not None
    assert (record.facility, record.level, record.seq) == (1, 6, 7)
    assert record.message == "tab\\x09and \\backslash caf\u00e9"  # control bytes stay escaped: one line


@pytest.mark.parametrize("raw", [
    b"", b"no semicolon", b"6,1;too few fields", b"x,1,2,-;bad prio", b"6,-1,2,-;negative seq",
    b"\xff\xfe;\x00", b";", b"6,1,2,-;\xff\xfe binary \x00 message",
])
def test_malformed_kmsg_records_never_raise(raw):
    record = parse_kmsg_record(raw)
    assert record is None or "\x00" not in record.message


def test_kmsg_missing_device_is_a_clear_error(tmp_path, state):
    with pytest.raises(LogSourceError, match="cannot open"):
        KmsgSource(state, path=str(tmp_path / "no-kmsg"))


def _kmsg_readable() -> bool:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


needs_kmsg = pytest.mark.skipif(not _kmsg_readable(), reason="/dev/kmsg is not readable here (not root?)")


def read_all(source: LogSource) -> List[str]:
    return [line.text for line in read_all_lines(source)]


def read_all_lines(source: LogSource) -> List[LogLine]:
    lines: List[LogLine] = []
    for _ in range(1000):
        batch = source.read()
        lines += batch
        if not batch and not source.lag_bytes():
            break
    return lines


@needs_kmsg
def test_real_kmsg_returns_messages_without_prefix(state):
    src = KmsgSource(state, max_age_seconds=1e9)
    lines = read_all(src)
    src.close()
    assert lines  # the boot messages at least
    assert not [line for line in lines if re.match(r"\d+,\d+,\d+,", line)]


@needs_kmsg
@pytest.mark.skipif(not os.access("/dev/kmsg", os.W_OK), reason="/dev/kmsg is not writable here")
def test_real_kmsg_restart_does_not_replay_and_ignores_userspace(state):
    # A program can write to /dev/kmsg, but never with the kernel's facility (0):
    # such records are not kernel messages and must not be able to fail a node.
    marker = f"hpresilience logsource test marker {uuid.uuid4()}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<6>{marker}\n")
    src = KmsgSource(state, max_age_seconds=1e9)
    first = read_all(src)
    src.close()
    assert first and marker not in first
    restarted = KmsgSource(state, max_age_seconds=1e9)
    again = read_all(restarted)
    restarted.close()
    assert not set(first) & set(again)


# ----------------------------------------------------------------------------- journalctl
FAKE_JOURNALCTL = """#!{python}
# Stands in for journalctl: prints entries.jsonl after --after-cursor, then follows (sleeps).
import json, os, sys, time
d = os.environ["FAKE_JOURNAL_DIR"]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
entries = [json.loads(line) for line in open(os.path.join(d, "entries.jsonl"))]
after = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--after-cursor=")]
if after:
    cursors = [e["__CURSOR"] for e in entries]
    if after[0] not in cursors:
        sys.stderr.write("Failed to seek to cursor: Invalid argument\\n")
        sys.exit(1)
    entries = entries[cursors.index(after[0]) + 1:]
for e in entries:
    sys.stdout.write(json.dumps(e) + "\\n")
sys.stdout.flush()
if os.path.exists(os.path.join(d, "exit")):
    sys.exit(3)
time.sleep(60)
"""


class FakeJournal:
    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        self.dir = tmp_path / "journal"
        self.dir.mkdir()
        self.exe = self.dir / "journalctl"
        self.exe.write_text(FAKE_JOURNALCTL.format(python=sys.executable))
        self.exe.chmod(0o755)
        (self.dir / "entries.jsonl").write_text("")
        monkeypatch.setenv("FAKE_JOURNAL_DIR", str(self.dir))

    def add(self, cursor: str, message, age_seconds: float = 0.0) -> None:
        entry = {"__CURSOR": cursor, "__REALTIME_TIMESTAMP": str(int((time.time() - age_seconds) * 1e6))}
        if message is not None:
            entry["MESSAGE"] = message
        with open(self.dir / "entries.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def calls(self) -> List[List[str]]:
        calls = self.dir / "calls"
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


@pytest.fixture
def journal(tmp_path, monkeypatch) -> FakeJournal:
    return FakeJournal(tmp_path, monkeypatch)


def read_until(source: LogSource, count: int, deadline_seconds: float = 30.0) -> List[str]:
    return [line.text for line in read_lines_until(source, count, deadline_seconds)]


def read_lines_until(source: LogSource, count: int, deadline_seconds: float = 30.0) -> List[LogLine]:
    lines: List[LogLine] = []
    deadline = time.monotonic() + deadline_seconds
    while len(lines) < count and time.monotonic() < deadline:
        lines += source.read()
        time.sleep(0.02)
    return lines


def test_journal_entries_become_lines(journal, state):
    journal.add("c1", XID)
    journal.add("c2", "from an hour ago", age_seconds=7200)
    journal.add("c3", None)
    journal.add("c4", list(b"bin\xffary\x00 bytes"))
    journal.add("c5", "last")
    src = JournalSource(state, journalctl=str(journal.exe))
    try:
        assert read_until(src, 3) == [XID, "bin\ufffdary bytes", "last"]
    finally:
        src.close()
    argv = journal.calls()[0]
    assert "-k" in argv and "--follow" in argv and "--output=json" in argv
    assert any(a.startswith("--since=@") for a in argv)


def test_journal_restarts_a_dead_journalctl_after_the_last_cursor(journal, state):
    journal.add("c1", "one")
    (journal.dir / "exit").touch()
    src = JournalSource(state, journalctl=str(journal.exe))
    try:
        assert read_until(src, 1) == ["one"]
        journal.add("c2", "two")
        assert read_until(src, 1) == ["two"]  # after a backoff, from the cursor: "one" not replayed
    finally:
        src.close()
    assert "--after-cursor=c1" in journal.calls()[1]
    journal.add("c3", "three")
    restarted = JournalSource(state, journalctl=str(journal.exe))
    try:
        assert read_until(restarted, 1) == ["three"]
    finally:
        restarted.close()
    assert "--after-cursor=c2" in journal.calls()[-1]


def test_journal_rejected_cursor_is_dropped(journal, state):
    journal.add("c1", "one")
    src = JournalSource(state, journalctl=str(journal.exe))
    assert read_until(src, 1) == ["one"]
    src.close()
    (journal.dir / "entries.jsonl").write_text("")  # journal vacuumed: cursor c1 is gone
    journal.add("d1", "after vacuum")
    restarted = JournalSource(state, journalctl=str(journal.exe))
    try:
        assert read_until(restarted, 1) == ["after vacuum"]  # from the retry without the cursor
    finally:
        restarted.close()
    calls = journal.calls()
    assert "--after-cursor=c1" in calls[1]
    assert not any(a.startswith("--after-cursor") for a in calls[2])
    assert any(a.startswith("--since=@") for a in calls[2])


def test_missing_journalctl_is_a_clear_error(tmp_path, state):
    with pytest.raises(LogSourceError, match="install"):
        JournalSource(state, journalctl=str(tmp_path / "no-journalctl"))


def _journal_works() -> bool:
    if shutil.which("journalctl") is None:
        return False
    try:
        out = subprocess.run(["journalctl", "-k", "-n", "1", "-q", "-o", "json", "--no-pager"],
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


@pytest.mark.skipif(not _journal_works(), reason="journalctl has no kernel journal to read here (no journald)")
def test_real_journal_starts_and_closes(state):
    src = JournalSource(state)
    read_until(src, 1, deadline_seconds=2)
    src.close()


# ----------------------------------------------------------------------------- open_source
def test_open_source_picks_the_class(path, state):
    src = open_source(str(path), state)
    assert isinstance(src, FileSource) and isinstance(src, LogSource)
    src.close()
    if _kmsg_readable():
        kmsg = open_source("kmsg", state)
        assert isinstance(kmsg, KmsgSource)
        kmsg.close()
    if shutil.which("journalctl"):
        jrnl = open_source("journal", state)
        assert isinstance(jrnl, JournalSource)
        jrnl.close()


@pytest.mark.parametrize("spec", ["", "kmesg", "journald", "var/log/messages", "./kern.log"])
def test_open_source_rejects_nonsense(spec, state):
    with pytest.raises(ValueError, match="expected 'kmsg', 'journal' or an absolute file path"):
        open_source(spec, state)


def test_open_source_rejects_a_directory(tmp_path, state):
    with pytest.raises(ValueError, match="not a regular file"):
        open_source(str(tmp_path), state)


# ----------------------------------------------------------------------------- what the rules read (issue 9)
def test_file_lines_carry_their_syslog_stamp_and_only_dated_kernel_lines_are_classified(path, state):
    """Defects 9 and 10: a file line's time is its own stamp; another program's line and a line
    without a date are returned but never classified."""
    path.touch()
    src = file_source(path, state)
    append(path, f"Nov 22 11:20:21 n2 {XID}\nNov 22 11:20:21 n2 myprog[4]: {XID[8:]}\n{XID[8:]}\n"
                 f"[12.345678] {XID[8:]}\n".encode())
    lines = src.read()
    assert len(lines) == 4
    trusted, program, bare, uptime = (line.kernel_line for line in lines)
    assert trusted is not None and trusted.text == XID[8:] and trusted.wall_time is not None
    assert time.localtime(trusted.wall_time)[1:6] == (11, 22, 11, 20, 21)
    assert (program, bare, uptime) == (None, None, None)


def test_journal_lines_carry_the_entry_time(journal, state):
    """Defect 10: after an outage, a line read now is still as old as the kernel said."""
    added = time.time()
    journal.add("c1", XID[8:], age_seconds=600)
    src = JournalSource(state, journalctl=str(journal.exe))
    try:
        before = time.time()
        (line,) = read_lines_until(src, 1)
    finally:
        src.close()
    assert line.kernel_line.text == XID[8:] and line.kernel_line.from_kernel
    # Bounds from the test's own clock readings, not a window that a slow machine could miss.
    assert added - 600.001 <= line.kernel_line.wall_time <= before - 600
    assert line.received_at >= before



def test_kmsg_record_time_is_boot_plus_its_stamp():
    record = parse_kmsg_record(b"4,1203,5123456,-;NVRM: GPU 0000:01:00.0: GPU has fallen off the bus.")
    line = record.kernel_line(boot_wall_time=1_700_000_000.0)
    assert (line.wall_time, line.uptime, line.seq, line.from_kernel) == (1_700_000_005.123456, 5.123456, 1203, True)
    assert parse_kmsg_record(b"12,7,99,-;myprog: x").kernel_line().from_kernel is False


@needs_kmsg
def test_real_kmsg_lines_carry_the_kernels_time(state):
    src = KmsgSource(state, max_age_seconds=1e9)
    try:
        lines = read_all_lines(src)
    finally:
        src.close()
    assert lines
    now = time.time()
    stamps = [line.kernel_line.wall_time for line in lines]
    # The kernel's order, and the oldest record (from early boot) stamped before this read.
    assert stamps == sorted(stamps) and stamps[0] < now
