"""`hpresilience check` reads the kernel log with the daemon's safeguards (issue 9, defect 9): lines
another program wrote and undated file lines are not trusted, every finding carries its line's own
time, and with --apply a line is acted on once. Real files in tmp_path; Slurm is the in-memory model."""
import os
import time
from pathlib import Path
from typing import Optional

import pytest

from hpresilience.agent.config import AgentConfig, Threshold
from hpresilience.agent.kernel_line import KernelLine
from hpresilience.agent.logsource import LogLine
from hpresilience.agent.node import boot_time
from hpresilience.agent.oneshot import FILE_TAIL_BYTES, apply_result, ordered, run_check
from hpresilience.finding import NodeAction
from hpresilience.slurm import NodeState, SlurmGateway
from tests.slurm_model import SlurmModel

XID_79 = "NVRM: Xid (PCI:0000:b9:00): 79, pid=1234, name=python, GPU has fallen off the bus."
CGROUP_OOM = "Memory cgroup out of memory: Killed process 4242 (python) total-vm:1kB, anon-rss:1kB"


def stamp(at: float) -> str:
    local = time.localtime(at)
    return time.strftime("%b ", local) + f"{local.tm_mday:>2}" + time.strftime(" %H:%M:%S", local)


def kernel(text: str, at: float, tag: str = "kernel") -> str:
    return f"{stamp(at)} n1 {tag}: {text}\n"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "kern.log"


@pytest.fixture
def config(tmp_path: Path, log: Path) -> AgentConfig:
    config = AgentConfig()
    config.agent.node_name = "n1"
    config.agent.state_dir = str(tmp_path / "state")
    config.kernel_log.sources = [str(log)]
    config.nvml.enabled = False
    config.system.enabled = False
    return config


def codes(config: AgentConfig):
    return {f.code: f.action for f in run_check(config).findings}


def test_lines_another_program_wrote_or_without_a_date_are_not_trusted(config, log):
    now = time.time()
    log.write_text(kernel(XID_79, now, tag="myprog")       # `logger -t myprog "NVRM: Xid ..."`
                   + kernel(XID_79, now, tag="myprog[99]")
                   + XID_79 + "\n"                           # a bare line: no date, no writer
                   + f"[12.345678] {XID_79}\n"               # a dmesg uptime: which boot?
                   + kernel(CGROUP_OOM, now))                # the positive sign: the file was read
    assert codes(config) == {"OOM_CGROUP": NodeAction.NONE}


def test_lines_before_this_boot_are_history(config, log):
    log.write_text(kernel(XID_79, boot_time() - 3600) + kernel(CGROUP_OOM, time.time()))
    assert codes(config) == {"OOM_CGROUP": NodeAction.NONE}


def test_thresholds_count_over_the_lines_own_times(config, log):
    """Three hung tasks spread beyond the window are no burst; stamped "now" they were."""
    if time.time() - boot_time() < 130:
        pytest.skip("the node booted too recently to hold lines two minutes apart")
    config.policy.thresholds["HUNG_TASK"] = Threshold(count=3, window_seconds=30)
    hung = "INFO: task python:{} blocked for more than 120 seconds."
    now = time.time()
    log.write_text("".join(kernel(hung.format(pid), now - ago) for pid, ago in ((1, 120), (2, 60), (3, 0))))
    assert "HUNG_TASK" not in codes(config)
    log.write_text("".join(kernel(hung.format(pid), now - ago) for pid, ago in ((1, 20), (2, 10), (3, 0))))
    assert codes(config)["HUNG_TASK"] is NodeAction.REBOOT


def test_apply_acts_on_a_line_once(config, log):
    """After the admin returns the node, the next HealthCheckProgram run must not fail it again for
    the same line; a new fault line still is acted on."""
    model = SlurmModel("n1")
    gateway = SlurmGateway(model)
    log.write_text(kernel(XID_79, time.time()))
    outcome = apply_result(config, run_check(config), gateway)
    assert outcome is not None and outcome.value == "applied"
    node = gateway.node("n1")
    assert "FAIL" in node.flags and node.reason.startswith("Action: Reboot")

    gateway.set_state("n1", NodeState.RESUME)  # the admin returns the node
    result = run_check(config)
    assert "XID_79" in {f.code for f in result.findings}  # still reported (the verify use reads since boot)
    assert apply_result(config, result, gateway) is None
    assert "FAIL" not in gateway.node("n1").flags

    with open(log, "a") as f:
        f.write(kernel(XID_79.replace("b9:00", "3b:00"), time.time() + 1))
    assert apply_result(config, run_check(config), gateway).value == "applied"
    assert "FAIL" in gateway.node("n1").flags


def test_a_new_fault_in_the_second_of_the_mark_is_still_acted_on(config, log):
    """Positions are (inode, byte offset) in a file: another program's line between two kernel lines
    of the same second used to restart the same-second count, so the new line read as covered."""
    gateway = SlurmGateway(SlurmModel("n1"))
    now = time.time()
    log.write_text(kernel(XID_79, now))
    assert apply_result(config, run_check(config), gateway).value == "applied"
    gateway.set_state("n1", NodeState.RESUME)
    with open(log, "a") as f:
        f.write(kernel("hello", now, tag="myprog") + kernel(XID_79.replace("b9:00", "3b:00"), now))
    assert apply_result(config, run_check(config), gateway).value == "applied"
    assert "FAIL" in gateway.node("n1").flags


def test_a_dry_run_leaves_the_lines_for_the_first_real_run(config, log):
    gateway = SlurmGateway(SlurmModel("n1"))
    log.write_text(kernel(XID_79, time.time()))
    config.agent.dry_run = True
    assert apply_result(config, run_check(config), gateway).value == "dry_run"
    assert "FAIL" not in gateway.node("n1").flags
    config.agent.dry_run = False
    assert apply_result(config, run_check(config), gateway).value == "applied"


def test_a_tail_that_starts_inside_a_line_drops_that_line(config, log):
    """A user's logger message can be grown until the tail window starts inside it, right before
    the forged "... kernel: NVRM: Xid ..." it holds: that partial line must not be read."""
    now = time.time()
    forged = kernel(XID_79, now)
    ending = kernel(CGROUP_OOM, now)                                   # the positive sign: read
    filler = kernel("x" * 60_000, now)
    count, left = divmod(FILE_TAIL_BYTES - len(forged) - len(ending), len(filler))
    last = kernel("y" * (left - len(kernel("", now))), now)
    with open(log, "w") as f:
        f.write(kernel("a" * 1000 + " ", now, tag="myprog")[:-1])     # the user's line, ending with...
        f.write(forged)                                                # ...text that looks like the kernel's
        f.write(filler * count + last + ending)
    assert log.read_bytes()[-FILE_TAIL_BYTES:].startswith(forged.encode())  # the tail starts at the forgery
    assert codes(config) == {"OOM_CGROUP": NodeAction.NONE}


def test_journalctl_failing_is_a_check_error_not_healthy(config, tmp_path, monkeypatch):
    """issue 9, defect 9: a journal the check cannot read must not pass as a healthy node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "journalctl"
    fake.write_text("#!/bin/sh\necho 'No journal files were opened due to insufficient permissions.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")
    config.kernel_log.sources = ["journal"]
    result = run_check(config)
    assert any("journal" in e and "insufficient permissions" in e for e in result.errors), result.errors


def test_kmsg_and_journal_positions_count_only_kernel_lines():
    """Two kernel lines of one second keep their places whatever another program logged between them."""
    def line(text: str, kernel_line: Optional[KernelLine]) -> LogLine:
        return LogLine(text, "journal", 0.0, kernel_line)

    first, second = KernelLine("a", "journal", wall_time=100.0), KernelLine("b", "journal", wall_time=100.0)
    placed = ordered([line("a", first), line("user", None), line("b", second)])
    assert [position for position, _ in placed] == [(100.0, 0), (100.0, 1)]
