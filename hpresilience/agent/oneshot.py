"""`hpresilience check`: one pass of every passive check, for admins, Slurm's
HealthCheckProgram and the controller's verify step.

The kernel log is read back to the current boot only: a fault line from before
the last reboot was dealt with by that reboot (and, in /var/log/messages, would
otherwise fail the node's verification forever).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ..finding import Finding, NodeAction
from .actuator import Actuator, Outcome
from .config import AgentConfig
from .daemon import agent_gateway, build_monitors
from .kernel_line import parse_line
from .kernel_rules import load_rules
from .logsource import parse_kmsg_record
from .monitor import MonitorError
from .monitors.nvml import NvmlMonitor
from .node import STAMP_SLACK_SECONDS, boot_time, node_name
from .policy import Policy

# How much of a log file's end is scanned: enough for a busy day, bounded for a 60 s HealthCheckProgram.
FILE_TAIL_BYTES = 16 * 1024 * 1024


@dataclass
class CheckResult:
    findings: List[Finding] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    @property
    def actionable(self) -> List[Finding]:
        return [f for f in self.findings if f.action is not NodeAction.NONE]


def file_lines_since(path: Path, since: float) -> Iterator[str]:
    """Lines of a syslog-style file stamped at or after `since`; undated lines are skipped
    because nothing says which boot they belong to."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - FILE_TAIL_BYTES))
            data = f.read(FILE_TAIL_BYTES)
    except FileNotFoundError:
        return
    now = time.time()
    for raw in data.splitlines():
        parsed = parse_line(raw, now=now)
        if parsed and parsed.wall_time is not None and parsed.wall_time >= since - STAMP_SLACK_SECONDS:
            yield parsed.text


def kmsg_lines(path: str = "/dev/kmsg") -> Iterator[str]:
    """Every kernel record still in the ring buffer: all of them are from this boot.
    Records a program wrote to /dev/kmsg are skipped, as the agent skips them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            try:
                raw = os.read(fd, 16384)
            except BlockingIOError:
                return
            except BrokenPipeError:
                continue  # overwritten while we read: skip to the next record
            record = parse_kmsg_record(raw)
            if record is not None and record.facility == 0:
                yield record.message
    finally:
        os.close(fd)


def journal_lines() -> Iterator[str]:
    proc = subprocess.run(["journalctl", "-k", "-b", "-o", "cat", "--no-pager", "-q"], capture_output=True,
                          timeout=20, stdin=subprocess.DEVNULL)
    yield from proc.stdout.decode("utf-8", errors="replace").splitlines()


def kernel_lines(spec: str, since: float) -> Iterator[str]:
    if spec in ("kmsg", "/dev/kmsg"):
        return kmsg_lines()
    if spec == "journal":
        return journal_lines()
    return file_lines_since(Path(spec), since)


def apply_result(config: AgentConfig, result: CheckResult) -> Optional[Outcome]:
    """Take the node out of service for the check's findings, exactly as the agent
    would (same policy and escalation history, same ownership rules)."""
    boot = boot_time()
    policy = Policy(config.policy, Path(config.agent.state_dir))
    policy.add_events([f for f in result.findings if f.monitor == "kernel_log"])
    decision = policy.decide([f for f in result.findings if f.monitor != "kernel_log"], boot)
    if decision is None:
        return None
    outcome = Actuator(agent_gateway(), node_name(config.agent.node_name), config.agent.dry_run).apply(decision)
    if outcome.settled:
        policy.resolved(decision, applied=outcome is Outcome.APPLIED, boot_time=boot)
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
    events: List[Finding] = []
    for spec in config.kernel_log.sources:
        try:
            events += [f for f in (rules.classify(text) for text in kernel_lines(spec, boot)) if f]
        except (OSError, subprocess.SubprocessError) as e:
            result.errors.append(f"kernel log {spec}: {e}")
    with tempfile.TemporaryDirectory() as scratch:
        # The agent's thresholds apply (a single system OOM is not a fault), without its journal.
        counted = Policy(config.policy, Path(scratch)).add_events(events)
    unique: Dict[str, Finding] = {}
    for finding in state + counted:
        known = unique.get(finding.key)
        if known is None or finding.action.rank > known.action.rank:
            unique[finding.key] = finding
    result.findings = sorted(unique.values(), key=lambda f: (-f.action.rank, f.code))
    return result
