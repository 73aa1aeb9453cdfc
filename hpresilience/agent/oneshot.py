"""`hpresilience check`: one pass of every passive check, for admins, Slurm's
HealthCheckProgram and the controller's verify step.

The kernel log is read back to the current boot only: a fault line from before
the last reboot was dealt with by that reboot (and, in /var/log/messages, would
otherwise fail the node's verification forever).

The kernel log gets the daemon's safeguards (issue 9, defect 9): the same
sources and parsers (logsource), so a line another program wrote and a file
line without a date are never classified, and every finding carries the time
the kernel stamped its line (thresholds count over real time, not "now").
With --apply, a line is acted on once: after a decision is settled, the lines
read are marked in the agent's state_dir (check-applied.json), so a node the
admin returned is not failed again for the same lines.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..finding import Finding, NodeAction
from ..slurm import SlurmGateway
from ..statefile import read_json, write_json
from .actuator import Actuator, Outcome
from .config import AgentConfig
from .daemon import agent_gateway, build_monitors
from .kernel_line import KernelLine
from .kernel_rules import RuleSet, load_rules
from .logsource import MAX_LINE_BYTES, KmsgSource, LogLine, LogSourceError, file_kernel_line, journal_lines
from .logsource.common import decode_lines
from .monitor import MonitorError
from .monitors.nvml import NvmlMonitor
from .node import STAMP_SLACK_SECONDS, boot_time, node_name
from .policy import Policy

# How much of a log file's end is scanned: enough for a busy day, bounded for a 60 s HealthCheckProgram.
FILE_TAIL_BYTES = 16 * 1024 * 1024
# With --apply: per source, the last line a settled decision covered.
APPLIED_FILE = "check-applied.json"
# Boot times read from /proc/uptime by different runs differ by jitter, not by this.
BOOT_TOLERANCE_SECONDS = 30.0

# A sustained flood refills /dev/kmsg as fast as it is read: the check stops after this many reads
# of the source's own budget (about 64 MiB, far beyond any ring buffer) and classifies what it has.
KMSG_MAX_READS = 64

# Where a line stands in its source, stable from one run to the next: (inode, byte offset of the
# line) in a file; the /dev/kmsg sequence number; the journal entry's time and the line's place
# among the kernel lines of that time.
Position = Tuple[float, int]
PlacedLine = Tuple[Position, LogLine]


@dataclass(frozen=True)
class KernelEvent:
    """A kernel-log finding since boot and where its line stands in its source."""
    source: str
    position: Position
    finding: Finding


@dataclass
class CheckResult:
    findings: List[Finding] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    kernel_events: List[KernelEvent] = field(default_factory=list)  # every one since boot, oldest first
    read_through: Dict[str, Position] = field(default_factory=dict)  # per source, the last line read

    @property
    def actionable(self) -> List[Finding]:
        return [f for f in self.findings if f.action is not NodeAction.NONE]


def file_lines(path: Path) -> List[PlacedLine]:
    """The lines at the end of a syslog-style file (FILE_TAIL_BYTES of it), split and decoded as its
    source does, each placed at (inode, byte offset). A tail that starts inside a line drops that
    line: its end could be anything, e.g. a user's logger message holding "kernel: NVRM: Xid ...".
    """
    try:
        with open(path, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - FILE_TAIL_BYTES)
            f.seek(start)
            data = f.read(FILE_TAIL_BYTES)
    except FileNotFoundError:
        return []
    if start > 0:
        cut = data.find(b"\n") + 1
        start, data = start + cut, data[cut:] if cut else b""
    raws, offsets = [], []
    for raw in data.split(b"\n"):  # on "\n" only and cut at MAX_LINE_BYTES, as LineSplitter does
        raws.append(raw[:MAX_LINE_BYTES])
        offsets.append(start)
        start += len(raw) + 1
    now = time.time()
    name = f"file:{path}"
    return [((float(inode), offset), LogLine(text, name, now, file_kernel_line(text, now)))
            for offset, text in zip(offsets, decode_lines(raws, name)) if text is not None]


def kmsg_lines(since: float, path: str = "/dev/kmsg") -> List[PlacedLine]:
    """The ring buffer's records since `since`, read by the agent's own kmsg source."""
    with tempfile.TemporaryDirectory() as scratch:  # no cursor: every run reads the whole boot
        source = KmsgSource(scratch, path=path, max_age_seconds=time.time() - since + STAMP_SLACK_SECONDS)
        try:
            lines = source.read()
            for _ in range(KMSG_MAX_READS):
                if not source.lag_bytes():
                    break
                lines += source.read()
        finally:
            source.close()
    return ordered(lines)


def journal_since_boot() -> List[PlacedLine]:
    """The kernel's journal entries of this boot. journalctl failing (no permission to read the
    journal, a broken journal) is the check's error, never "no faults"."""
    proc = subprocess.run(["journalctl", "-k", "-b", "-o", "json", "--all", "--no-pager", "-q"], capture_output=True,
                          timeout=20, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise LogSourceError(f"journalctl exited with status {proc.returncode}: {stderr or 'no message'}")
    return ordered(journal_lines(proc.stdout.splitlines(), "journal")[0])


def kernel_lines(spec: str, since: float) -> List[PlacedLine]:
    if spec in ("kmsg", "/dev/kmsg"):
        return kmsg_lines(since)
    if spec == "journal":
        return journal_since_boot()
    return file_lines(Path(spec))


def kernel_events(rules: RuleSet, spec: str, lines: List[PlacedLine], since: float) -> List[KernelEvent]:
    """The findings of `lines` stamped since `since`; lines not to be classified (another
    program's, a file line without a date) give none, as in the daemon."""
    events: List[KernelEvent] = []
    for position, line in lines:
        finding = rules.classify(line.kernel_line) if line.kernel_line is not None else None
        if finding is not None and finding.observed_at >= since - STAMP_SLACK_SECONDS:
            events.append(KernelEvent(spec, position, finding))
    return events


def ordered(lines: List[LogLine]) -> List[PlacedLine]:
    """kmsg and journal lines placed by (sequence number or time, place among the kernel lines with
    the same one). Lines that are not the kernel's are left out: they are never classified, and
    counting them would let another program's line shift a kernel line's place."""
    out: List[PlacedLine] = []
    last: Optional[float] = None
    same = 0
    for line in lines:
        parsed = line.kernel_line
        key = _position_key(parsed) if parsed is not None else None
        if key is None:
            continue
        same = same + 1 if key == last else 0
        last = key
        out.append(((key, same), line))
    return out


def _position_key(parsed: KernelLine) -> Optional[float]:
    if parsed.seq is not None:
        return float(parsed.seq)
    return parsed.wall_time


def _is_file(spec: str) -> bool:
    return spec not in ("kmsg", "/dev/kmsg", "journal")


@dataclass
class AppliedMarks:
    """With --apply: per source, the position through which a settled decision covered the
    lines, within one boot (issue 9, defect 9: re-applying the whole log on every run failed
    a node the admin had returned)."""
    path: Path
    boot: float
    through: Dict[str, Position] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path, boot: float) -> AppliedMarks:
        path = state_dir / APPLIED_FILE
        data = read_json(path, None)
        marks = cls(path, boot)
        if isinstance(data, dict) and isinstance(data.get("boot"), (int, float)) \
                and abs(data["boot"] - boot) <= BOOT_TOLERANCE_SECONDS and isinstance(data.get("through"), dict):
            for spec, mark in data["through"].items():
                try:
                    marks.through[spec] = (float(mark[0]), int(mark[1]))
                except (TypeError, ValueError, IndexError):
                    continue  # a damaged mark only means those lines are looked at again
        return marks

    def covers(self, event: KernelEvent) -> bool:
        mark = self.through.get(event.source)
        if mark is None:
            return False
        if _is_file(event.source):  # offsets count within one file: another inode is all new
            return event.position[0] == mark[0] and event.position[1] <= mark[1]
        return event.position <= mark

    def advance(self, read_through: Dict[str, Position]) -> None:
        self.through.update(read_through)
        write_json(self.path, {"boot": self.boot, "through": {k: list(v) for k, v in self.through.items()}})


def apply_result(config: AgentConfig, result: CheckResult, gateway: Optional[SlurmGateway] = None
                 ) -> Optional[Outcome]:
    """Take the node out of service for the check's findings, exactly as the agent
    would (same policy, same ownership rules, same cluster-wide budget).

    Kernel-log lines a settled decision of an earlier run covered are not fed again; the others
    since boot are, with their own timestamps, so thresholds count as the daemon's do."""
    state_dir = Path(config.agent.state_dir)
    marks = AppliedMarks.load(state_dir, boot_time())
    policy = Policy(config.policy, state_dir)
    policy.add_events([e.finding for e in result.kernel_events if not marks.covers(e)])
    decision = policy.decide([f for f in result.findings if f.monitor != "kernel_log"])
    if decision is None:
        return None
    outcome = Actuator(gateway or agent_gateway(), node_name(config.agent.node_name), config.agent.dry_run,
                       config.policy.shared_cause).apply(decision)
    if outcome.settled:
        policy.resolved(decision)
        if outcome is not Outcome.DRY_RUN:  # lines a dry run covered must be acted on once it is off
            marks.advance(result.read_through)
    return outcome


def run_check(config: AgentConfig) -> CheckResult:
    result = CheckResult()
    boot = boot_time()
    state: List[Finding] = []
    for monitor in build_monitors(config):
        if isinstance(monitor, NvmlMonitor):
            # The GPU-count grace period counts from boot, not from this short-lived process.
            monitor.started_at = time.monotonic() - (time.time() - boot)
        try:
            state += monitor.check()
        except MonitorError as e:
            result.errors.append(f"{monitor.name}: {e}")
        finally:
            monitor.close()
    rules = load_rules(Path(config.kernel_log.rules_file) if config.kernel_log.rules_file else None)
    for spec in config.kernel_log.sources:
        try:
            lines = kernel_lines(spec, boot)
        except (OSError, subprocess.SubprocessError, LogSourceError) as e:
            result.errors.append(f"kernel log {spec}: {e}")
            continue
        result.kernel_events += kernel_events(rules, spec, lines, boot)
        if lines:
            result.read_through[spec] = lines[-1][0]
    result.kernel_events.sort(key=lambda e: e.finding.observed_at)
    with tempfile.TemporaryDirectory() as scratch:
        # The agent's thresholds apply (a single system OOM is not a fault), without its journal.
        counted = Policy(config.policy, Path(scratch)).add_events([e.finding for e in result.kernel_events])
    unique: Dict[str, Finding] = {}
    for finding in state + counted:
        known = unique.get(finding.key)
        if known is None or finding.action.rank > known.action.rank:
            unique[finding.key] = finding
    result.findings = sorted(unique.values(), key=lambda f: (-f.action.rank, f.code))
    return result
