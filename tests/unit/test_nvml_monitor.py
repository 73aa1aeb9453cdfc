"""NvmlMonitor end to end: the real pynvml against the fake libnvidia-ml, in a
subprocess per test (the dynamic loader reads LD_LIBRARY_PATH at start-up)."""
from __future__ import annotations

import ctypes
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.fake_nvml import FakeGpuState, fake_nvml_env

DRIVER = Path(__file__).resolve().parents[1] / "fake_nvml" / "monitor_driver.py"


class MonitorProcess:
    """An NvmlMonitor in its own process; each method is one command to it."""

    def __init__(self, env: Dict[str, str], **config: Any) -> None:
        self._proc = subprocess.Popen([sys.executable, str(DRIVER), json.dumps(config)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line)

    def ask(self, command: str, timeout: float = 30) -> Dict[str, Any]:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        try:
            return json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no answer to {command!r} within {timeout}s; stderr: {self.stop()}") from None

    def check(self, timeout: float = 30) -> List[Tuple[str, str, Optional[str]]]:
        reply = self.ask("check", timeout)
        assert "findings" in reply, reply
        return [(f["code"], f["action"], f["entity"]) for f in reply["findings"]]

    def stop(self) -> str:
        """Kill it; return what it logged."""
        self._proc.kill()
        self._proc.wait(timeout=10)
        return self._proc.stderr.read()


@pytest.fixture
def start(lib_dir: Path, state: FakeGpuState) -> Iterator:
    started: List[MonitorProcess] = []

    def start(env: Optional[Dict[str, str]] = None, **config: Any) -> MonitorProcess:
        started.append(MonitorProcess(env or fake_nvml_env(lib_dir, state.path), **config))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_healthy_node_has_no_findings(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    assert monitor.check() == []
    assert monitor.ask("status") == {"disabled_reason": None}
    assert monitor.ask("close") == {"closed": True}


def test_lost_gpu(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    state.lost(2)
    # Identity comes from the earlier reading: a lost GPU no longer answers.
    assert monitor.check() == [("GPU_LOST", "reboot", "GPU 2 (0000:75:00.0)")]


def test_gpu_count_drop_is_a_fault_only_after_the_grace_period(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=1.5)
    assert monitor.check() == []
    started = time.monotonic()  # the monitor (and its grace period) started before this
    state.gpus(7)
    assert monitor.check() == []  # within the grace period
    time.sleep(max(0.0, 1.6 - (time.monotonic() - started)))
    reply = monitor.ask("check")
    assert [(f["code"], f["action"]) for f in reply["findings"]] == [("GPU_COUNT_LOW", "reboot")]
    assert reply["findings"][0]["message"] == "GPU count 7 < expected 8"
    assert "missing 0000:ca:00.0" in reply["findings"][0]["evidence"]


def test_expected_gpus_from_config(start, state: FakeGpuState) -> None:
    state.gpus(6)
    assert start(startup_grace_seconds=0, expected_gpus=8).check() == [("GPU_COUNT_LOW", "reboot", None)]


def test_remap_failure_means_replace(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0)
    state.remap(3, failure=True)
    assert monitor.check() == [("ROW_REMAP_FAILURE", "replace", "GPU 3 (0000:86:00.0)")]


def test_faults_read_through_nvml(start, state: FakeGpuState) -> None:
    state.pci(1, "0000:e1:00.0").ecc(1, dbe_volatile=1).remap(1, pending=True).retired_pending(4)
    state.throttle(5, 0x40).recovery_action(6, 2)
    assert sorted(start(startup_grace_seconds=0).check()) == [
        ("ECC_DBE_VOLATILE", "reboot", "GPU 1 (0000:e1:00.0)"),
        ("GPU_RECOVERY_ACTION", "reboot", "GPU 6 (0000:b9:00.0)"),
        ("GPU_THROTTLED", "none", "GPU 5 (0000:a8:00.0)"),
        ("RETIRED_PAGES_PENDING", "reboot", "GPU 4 (0000:97:00.0)"),
        ("ROW_REMAP_PENDING", "reboot", "GPU 1 (0000:e1:00.0)"),
    ]


def test_nvlink_down_and_error_rate(start, state: FakeGpuState) -> None:
    state.nvlink(0, 5, replay=1_000_000)  # a big total from long ago is not a fault
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    state.nvlink(0, 5, replay=1_000_000 + 10_000).nvlink(2, 7, active=False)
    assert sorted(monitor.check()) == [("NVLINK_DOWN", "reboot", "GPU 2 (0000:75:00.0)"),
                                       ("NVLINK_ERRORS", "replace", "GPU 0 (0000:53:00.0)")]


def test_pcie_gpus_without_nvlink(start, state: FakeGpuState) -> None:
    state.nvlinks(0)
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    assert monitor.check() == []


def test_xid_event_is_reported(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    state.add_xid(4, 79)
    state.add_xid(4, 79)
    reply = monitor.ask("check")
    assert [(f["code"], f["action"], f["entity"]) for f in reply["findings"]] == [
        ("XID_79", "none", "GPU 4 (0000:97:00.0)")]
    assert "count=2" in reply["findings"][0]["evidence"]
    assert monitor.check() == []  # delivered once


def test_dbe_event_means_reboot_of_that_gpu(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    state.add_dbe(6)
    state.add_xid(3, 94)
    state.add_dbe(6)
    reply = monitor.ask("check")
    assert sorted((f["code"], f["action"], f["entity"]) for f in reply["findings"]) == [
        ("ECC_DBE_EVENT", "reboot", "GPU 6 (0000:b9:00.0)"), ("XID_94", "none", "GPU 3 (0000:86:00.0)")]
    (dbe,) = [f for f in reply["findings"] if f["code"] == "ECC_DBE_EVENT"]
    assert "count=2" in dbe["evidence"]  # two events, one finding
    assert monitor.check() == []  # delivered once


def test_gpu_without_dbe_events_still_gets_xids(start, state: FakeGpuState) -> None:
    state.event_types(2, 0x8)  # XID only: the monitor registers the supported subset
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    state.add_dbe(2)           # not registered on GPU 2: never delivered
    state.add_xid(2, 79)
    state.add_dbe(0)
    assert sorted(monitor.check()) == [("ECC_DBE_EVENT", "reboot", "GPU 0 (0000:53:00.0)"),
                                       ("XID_79", "none", "GPU 2 (0000:75:00.0)")]


def test_hung_driver_gives_monitor_error_not_a_hang(start, state: FakeGpuState) -> None:
    monitor = start(startup_grace_seconds=0, call_timeout_seconds=0.5)
    assert monitor.check() == []
    state.hang(3)
    reply = monitor.ask("check", timeout=10)
    assert reply["error"] == "MonitorError" and reply["seconds"] < 2.0, reply
    assert "did not return within 0.5s" in reply["message"]
    state.hang(0)  # the call already in the driver still sleeps its 3 s
    reply = monitor.ask("check", timeout=10)
    assert reply["error"] == "MonitorError" and reply["seconds"] < 0.5, reply
    assert "still hung" in reply["message"]
    time.sleep(3)
    assert monitor.check() == []  # the driver answered again: the monitor works again


def test_hang_at_init(start, state: FakeGpuState) -> None:
    state.hang(30)
    monitor = start(startup_grace_seconds=0, call_timeout_seconds=0.5)
    reply = monitor.ask("check", timeout=10)
    assert reply["error"] == "MonitorError" and "nvmlInitWithFlags" in reply["message"], reply


def real_nvml_installed() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_no_library_disables_the_monitor(start, tmp_path: Path) -> None:
    if real_nvml_installed():
        pytest.skip("a real libnvidia-ml.so.1 is installed here")
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path))  # nothing there
    monitor = start(env=env, startup_grace_seconds=0)
    assert monitor.check() == []
    assert "libnvidia-ml.so.1 not found" in monitor.ask("status")["disabled_reason"]
    assert monitor.check() == []
    logged = [json.loads(line) for line in monitor.stop().splitlines()]
    assert [e["event"] for e in logged] == ["nvml monitor disabled"]  # once, not on every check


def test_node_without_gpus_is_disabled_after_the_grace_period(start, state: FakeGpuState) -> None:
    state.gpus(0)
    monitor = start(startup_grace_seconds=0)
    assert monitor.check() == []
    assert "no NVIDIA GPUs" in monitor.ask("status")["disabled_reason"]


def test_driver_not_loaded_with_expected_gpus(start, state: FakeGpuState) -> None:
    state.error("nvmlInitWithFlags", 9)
    monitor = start(startup_grace_seconds=0, expected_gpus=8)
    assert monitor.check() == [("GPU_COUNT_LOW", "reboot", None)]
    state.set("error.nvmlInitWithFlags", 0)  # the driver loads after all
    assert monitor.check() == []
