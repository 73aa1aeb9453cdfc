"""The agent's metrics of issue 12, read from a real Agent's registry: series initialised before any
event, the time of each loop's last complete pass, kernel-log source errors and NVML failures by kind.
Slurm is the in-memory model, kernel logs are files in tmp_path and NVML is the fake library
(tests/fake_nvml) in a subprocess, since the dynamic loader reads LD_LIBRARY_PATH only at start."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import pynvml
import pytest

from hpresilience.action import NodeAction
from hpresilience.agent.actuator import Outcome
from hpresilience.agent.config import AgentConfig
from hpresilience.agent.daemon import Agent
from hpresilience.agent.logsource import JournalSource
from hpresilience.agent.metrics import Loop
from hpresilience.agent.monitors.nvml import NvmlErrorKind
from hpresilience.sdnotify import Notifier
from hpresilience.slurm import SlurmGateway
from tests.fake_nvml import FakeGpuState, fake_nvml_env
from tests.slurm_model import SlurmModel

REPO = Path(__file__).resolve().parents[2]
KERNEL_LINE = "Nov 22 11:20:21 n1 kernel: eth0: link up\n"


def agent_config(tmp_path: Path, log: Path, nvml: bool = False, system: bool = False) -> AgentConfig:
    config = AgentConfig()
    config.agent.node_name = "n1"
    config.agent.state_dir = str(tmp_path / "state")
    config.kernel_log.sources = [str(log)]
    config.nvml.enabled = nvml
    config.system.enabled = system
    return config


def make_agent(config: AgentConfig) -> Agent:
    return Agent(config, gateway=SlurmGateway(SlurmModel("n[1-2]")), notifier=Notifier(""))


def sample(agent: Agent, name: str, **labels: str) -> Optional[float]:
    return agent.metrics.registry.get_sample_value(name, labels)


def check_pass(agent: Agent) -> None:
    agent.check_once(agent.monitors, threading.Event())


def test_known_series_are_zero_before_any_event(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    before = time.time()
    agent = make_agent(agent_config(tmp_path, log, system=True))
    source = f"file:{log}"
    assert [m.name for m in agent.monitors] == ["system"]
    assert sample(agent, "hpr_agent_check_errors_total", check="system") == 0
    assert sample(agent, "hpr_agent_check_duration_seconds_count", check="system") == 0
    assert sample(agent, "hpr_agent_kernel_log_lines_total", source=source) == 0
    assert sample(agent, "hpr_agent_kernel_log_errors_total", source=source) == 0
    for kind in NvmlErrorKind:
        assert sample(agent, "hpr_agent_nvml_errors_total", kind=kind.value) == 0
    for action in (NodeAction.REBOOT, NodeAction.REPLACE):
        for outcome in Outcome:
            assert sample(agent, "hpr_agent_actions_total", action=action.value, outcome=outcome.value) == 0
    # The loops count from the agent's start: an alert on the age is quiet at start, and fires for a
    # loop whose first pass never ends.
    for loop in Loop:
        assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop=loop.value) >= before
    # No health verdict before the check has looked.
    assert sample(agent, "hpr_agent_check_healthy", check="system") is None


def test_each_complete_pass_sets_its_loops_timestamp(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.write_text("")
    agent = make_agent(agent_config(tmp_path, log, system=True))
    for loop in Loop:  # a known past value, so the assertions below can only hold after a pass
        agent.metrics.last_pass.labels(loop.value).set(0)
    started = time.time()

    agent.poll_once()
    assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop="kernel_log") >= started
    assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop="checks") == 0

    check_pass(agent)
    assert sample(agent, "hpr_agent_check_duration_seconds_count", check="system") == 1  # the check ran
    assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop="checks") >= started


def test_a_pass_stopped_by_a_reload_is_not_complete(tmp_path: Path) -> None:
    agent = make_agent(agent_config(tmp_path, tmp_path / "kern.log", system=True))
    agent.metrics.last_pass.labels("checks").set(0)
    stop = threading.Event()
    stop.set()
    agent.check_once(agent.monitors, stop)
    assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop="checks") == 0
    check_pass(agent)  # the positive sign: the same agent's pass does count
    assert sample(agent, "hpr_agent_last_pass_timestamp_seconds", loop="checks") > 0


def test_a_missing_log_file_is_an_error_on_every_read_until_it_appears(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    agent = make_agent(agent_config(tmp_path, log))
    source = f"file:{log}"
    agent.poll_once()
    agent.poll_once()
    assert sample(agent, "hpr_agent_kernel_log_errors_total", source=source) == 2
    log.write_text(KERNEL_LINE)
    agent.poll_once()
    assert sample(agent, "hpr_agent_kernel_log_lines_total", source=source) == 1
    assert sample(agent, "hpr_agent_kernel_log_errors_total", source=source) == 2


def test_a_rotation_between_rename_and_create_is_not_an_error(tmp_path: Path) -> None:
    log = tmp_path / "kern.log"
    log.write_text("")
    agent = make_agent(agent_config(tmp_path, log))
    source = f"file:{log}"
    agent.poll_once()
    rotated = log.rename(tmp_path / "kern.log.1")
    agent.poll_once()
    with rotated.open("a") as f:  # the writer has not been told yet: it appends to the renamed file
        f.write(KERNEL_LINE)
    agent.poll_once()
    assert sample(agent, "hpr_agent_kernel_log_lines_total", source=source) == 1  # still followed
    log.write_text(KERNEL_LINE)
    agent.poll_once()
    assert sample(agent, "hpr_agent_kernel_log_lines_total", source=source) == 2  # the new file, from its start
    assert sample(agent, "hpr_agent_kernel_log_errors_total", source=source) == 0


def test_every_exit_of_journalctl_is_an_error(tmp_path: Path) -> None:
    journalctl = tmp_path / "journalctl"
    journalctl.write_text("#!/bin/sh\necho 'Failed to open journal' >&2\nexit 1\n")
    journalctl.chmod(0o755)
    source = JournalSource(tmp_path, journalctl=str(journalctl))
    deadline = time.monotonic() + 30
    try:
        while source.errors == 0 and time.monotonic() < deadline:  # until the child's exit is read
            source.read()
            time.sleep(0.01)
    finally:
        source.close()
    assert source.errors == 1


def nvml_library_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(nvml_library_loads(), reason="this machine has an NVIDIA driver library")
@pytest.mark.parametrize("gres, counted", [(("gpu:8",), 1), ((), 0)])
def test_a_gpu_node_without_the_nvml_library_counts_it_once(tmp_path: Path, gres, counted) -> None:
    """A CPU node (no GPUs in Slurm's Gres) without the library is normal: not an error, no alert."""
    agent = Agent(agent_config(tmp_path, tmp_path / "kern.log", nvml=True),
                  gateway=SlurmGateway(SlurmModel("n[1-2]", gres=gres)), notifier=Notifier(""))
    check_pass(agent)
    assert agent.monitors[0].disabled_reason                # the check ran and found no library
    check_pass(agent)  # the monitor disabled itself: no second call, no second count
    assert sample(agent, "hpr_agent_nvml_errors_total", kind="library_missing") == counted
    assert sample(agent, "hpr_agent_nvml_errors_total", kind="error") == 0


# A real Agent with NVML on, in a process that loads the fake library: argv = state dir, log file.
AGENT_SCRIPT = """
import json, sys, threading
from hpresilience.agent.config import AgentConfig
from hpresilience.agent.daemon import Agent
from hpresilience.agent.monitors.nvml import NvmlErrorKind
from hpresilience.sdnotify import Notifier
from hpresilience.slurm import SlurmGateway
from tests.slurm_model import SlurmModel

config = AgentConfig()
config.agent.node_name = "n1"
config.agent.state_dir = sys.argv[1]
config.kernel_log.sources = [sys.argv[2]]
config.system.enabled = False
config.nvml.call_timeout_seconds = 0.5
agent = Agent(config, gateway=SlurmGateway(SlurmModel("n[1-2]")), notifier=Notifier(""))
agent.check_once(agent.monitors, threading.Event())
registry = agent.metrics.registry
print(json.dumps({
    "errors": {k.value: registry.get_sample_value("hpr_agent_nvml_errors_total", {"kind": k.value})
               for k in NvmlErrorKind},
    "healthy": registry.get_sample_value("hpr_agent_check_healthy", {"check": "nvml"}),
}))
"""


def run_agent_with_fake_nvml(tmp_path: Path, lib_dir: Path, state: FakeGpuState) -> Dict:
    env = fake_nvml_env(lib_dir, state.path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", AGENT_SCRIPT, str(tmp_path / "state"), str(tmp_path / "kern.log")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scenario, kind", [
    ("driver_not_loaded", NvmlErrorKind.DRIVER_UNAVAILABLE),
    ("count_fails", NvmlErrorKind.ERROR),
    ("hung", NvmlErrorKind.TIMEOUT),
])
def test_an_nvml_failure_is_counted_by_kind(tmp_path: Path, lib_dir: Path, state: FakeGpuState,
                                            scenario: str, kind: NvmlErrorKind) -> None:
    if scenario == "driver_not_loaded":
        state.error("nvmlInitWithFlags", pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    elif scenario == "count_fails":
        state.error("nvmlDeviceGetCount_v2", pynvml.NVML_ERROR_UNKNOWN)
    else:
        state.hang(5)
    result = run_agent_with_fake_nvml(tmp_path, lib_dir, state)
    assert result["errors"] == {k.value: (1 if k is kind else 0) for k in NvmlErrorKind}


def test_a_healthy_gpu_node_counts_no_nvml_error(tmp_path: Path, lib_dir: Path, state: FakeGpuState) -> None:
    # 8 healthy GPUs; probing NVLinks past the last one and waiting for events that do not come are answers.
    result = run_agent_with_fake_nvml(tmp_path, lib_dir, state)
    assert result["healthy"] == 1  # the positive sign: the NVML check ran and found 8 healthy GPUs
    assert set(result["errors"].values()) == {0}


def test_a_reload_removes_the_series_of_checks_and_sources_no_longer_configured(tmp_path: Path) -> None:
    """Issue 12 review: left frozen, a check at -1 or a lagging source would keep its alert firing."""
    old_log, new_log = tmp_path / "kern.log", tmp_path / "messages"
    old_log.write_text("")
    new_log.write_text("")
    agent = make_agent(agent_config(tmp_path, old_log, system=True))
    with open(old_log, "a") as f:
        f.write(KERNEL_LINE)
    agent.poll_once()
    check_pass(agent)
    assert sample(agent, "hpr_agent_kernel_log_lines_total", source=f"file:{old_log}") == 1
    assert sample(agent, "hpr_agent_check_healthy", check="system") is not None
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\nnode_name = "n1"\nstate_dir = "{tmp_path / "state"}"\n'
                           f'[kernel_log]\nsources = ["{new_log}"]\n[nvml]\nenabled = false\n'
                           f'[system]\nenabled = false\n')
    agent.config_path = config_file
    try:
        assert agent.reload()
        for name in ("hpr_agent_kernel_log_lines_total", "hpr_agent_kernel_log_errors_total",
                     "hpr_agent_kernel_log_lag_bytes"):
            assert sample(agent, name, source=f"file:{old_log}") is None, name
        assert sample(agent, "hpr_agent_kernel_log_lines_total", source=f"file:{new_log}") == 0
        assert sample(agent, "hpr_agent_check_healthy", check="system") is None
        assert sample(agent, "hpr_agent_check_errors_total", check="system") is None
    finally:
        agent._stop_monitor_thread()
