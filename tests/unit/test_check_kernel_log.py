"""`hpresilience check` reads the kernel log with the daemon's safeguards (issue 9, defect 9): lines
another program wrote and undated file lines are not trusted, every finding carries its line's own
time, and with --apply a line is acted on once. Real files in tmp_path; Slurm is the in-memory model."""
import time
from pathlib import Path

import pytest

from hpresilience.agent.config import AgentConfig, Threshold
from hpresilience.agent.node import boot_time
from hpresilience.agent.oneshot import apply_result, run_check
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
