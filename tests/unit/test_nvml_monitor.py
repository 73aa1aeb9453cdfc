"""NvmlMonitor end to end: the real pynvml against the fake libnvidia-ml, in a
subprocess per test (the dynamic loader reads LD_LIBRARY_PATH at start-up);
a collector that must not call NVML at all is tested in-process."""
from __future__ import annotations

import ctypes
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from hpresilience.agent.monitor import MonitorError
from hpresilience.agent.monitors.nvml import REINIT_AFTER_FAILED_CHECKS, NvmlCollector, NvmlConfig
from tests.fake_nvml import FakeGpuState, fake_nvml_env, read_call_log

DRIVER = Path(__file__).resolve().parents[1] / "fake_nvml" / "monitor_driver.py"


class MonitorProcess:
    """An NvmlMonitor in its own process; each method is one command to it."""

    def __init__(self, env: Dict[str, str], manual_clock: bool = False, **config: Any) -> None:
        argv = [sys.executable, str(DRIVER), json.dumps(config)] + (["--manual-clock"] if manual_clock else [])
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
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

    def advance(self, seconds: float) -> None:
        """Moves a --manual-clock monitor's clock on."""
        assert "now" in self.ask(f"advance {seconds}")

    def stop(self) -> str:
        """Kill it; return what it logged."""
        self._proc.kill()
        self._proc.wait(timeout=10)
        return self._proc.stderr.read()


@pytest.fixture
def start(lib_dir: Path, state: FakeGpuState) -> Iterator:
    started: List[MonitorProcess] = []

    def start(env: Optional[Dict[str, str]] = None, call_log: Optional[Path] = None, manual_clock: bool = False,
              **config: Any) -> MonitorProcess:
        started.append(MonitorProcess(env or fake_nvml_env(lib_dir, state.path, call_log=call_log), manual_clock,
                                      **config))
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
    monitor = start(manual_clock=True, startup_grace_seconds=300)
    assert monitor.check() == []
    state.gpus(7)
    monitor.advance(299)
    assert monitor.check() == []  # within the grace period
    monitor.advance(1)
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
    monitor = start(manual_clock=True, startup_grace_seconds=0)
    assert monitor.check() == []
    # Issue 9, defect 7: two errors a second later were "114/min" and a replace.
    state.nvlink(0, 5, replay=1_000_002).nvlink(2, 7, active=False)
    monitor.advance(1.05)
    assert monitor.check() == [("NVLINK_DOWN", "reboot", "GPU 2 (0000:75:00.0)")]
    state.nvlink(0, 5, replay=1_000_000 + 10_000)
    monitor.advance(300)
    assert monitor.check() == [("NVLINK_DOWN", "reboot", "GPU 2 (0000:75:00.0)")]  # half a window watched
    monitor.advance(300)
    # A whole window since the first reading: a rate, and a reboot (a repeat after it escalates).
    assert sorted(monitor.check()) == [("NVLINK_DOWN", "reboot", "GPU 2 (0000:75:00.0)"),
                                       ("NVLINK_ERRORS", "reboot", "GPU 0 (0000:53:00.0)")]


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


class CallLog:
    """The fake library's call log, read one pass at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = 0

    def since_last(self) -> List[Tuple[str, int]]:
        calls = read_call_log(self.path)
        new, self._seen = calls[self._seen:], len(calls)
        return new

    def count(self, function: str) -> int:
        return sum(1 for name, _ in read_call_log(self.path) if name == function)


def link_probes(calls: List[Tuple[str, int]]) -> Dict[int, int]:
    """GPU index -> nvmlDeviceGetNvLinkState calls."""
    return dict(Counter(gpu for name, gpu in calls if name == "nvmlDeviceGetNvLinkState"))


def test_late_check_after_close_stays_closed(start, state: FakeGpuState, tmp_path: Path) -> None:
    # A reload: the monitor thread is stuck in a hung driver past the join timeout,
    # the monitor is closed, and that thread calls check() once more later.
    calls = CallLog(tmp_path / "nvml.calls")
    monitor = start(call_log=calls.path, startup_grace_seconds=0, call_timeout_seconds=0.5)
    assert monitor.check() == []
    state.hang(2)
    assert monitor.ask("check", timeout=10)["error"] == "MonitorError"
    assert monitor.ask("close") == {"closed": True}  # the NVML thread is still hung: left behind
    reply = monitor.ask("check", timeout=10)
    assert reply["findings"] == [] and reply["seconds"] < 0.1, reply  # no new thread stuck in the driver
    time.sleep(2)  # the hung call returns
    state.hang(0)
    calls.since_last()
    assert monitor.check() == []
    assert calls.since_last() == [] and calls.count("nvmlInitWithFlags") == 1  # NVML is never touched again


def test_closed_collector_never_starts_a_session() -> None:
    # A check queued on the NVML thread before close() runs after the collector closed.
    made: List[str] = []
    collector = NvmlCollector(NvmlConfig(), lambda fn, *args: made.append(fn.__name__), time.monotonic)
    collector.close()
    with pytest.raises(MonitorError, match="closed"):
        collector.collect()
    assert made == []


@pytest.mark.parametrize("code, error", [(1, "NVMLError_Uninitialized"), (9, "NVMLError_DriverNotLoaded"),
                                         (18, "NVMLError_LibRmVersionMismatch")])
def test_dead_session_is_initialised_again(start, state: FakeGpuState, tmp_path: Path, code: int,
                                           error: str) -> None:
    calls = CallLog(tmp_path / "nvml.calls")
    monitor = start(call_log=calls.path, startup_grace_seconds=0)
    assert monitor.check() == []
    state.error("nvmlDeviceGetCount_v2", code)  # the driver was reloaded or upgraded under the agent
    for reinits in (1, 2):
        for _ in range(REINIT_AFTER_FAILED_CHECKS):
            assert calls.count("nvmlShutdown") == reinits - 1  # not before N checks in a row
            reply = monitor.ask("check")
            assert reply.get("error") == "MonitorError" and "nvmlDeviceGetCount failed" in reply["message"], reply
        assert calls.count("nvmlShutdown") == reinits
    state.error("nvmlDeviceGetCount_v2", 0)
    calls.since_last()
    assert monitor.check() == []
    recovered = calls.since_last()
    assert recovered[0] == ("nvmlInitWithFlags", -1)  # a new session ...
    assert link_probes(recovered) == {gpu: 36 for gpu in range(8)}  # ... probes every NVLink again
    logged = [json.loads(line) for line in monitor.stop().splitlines()]
    reinit = [e for e in logged if e["event"] == "nvml session dead, re-initialising"]
    assert len(reinit) == 2 and reinit[0]["error"].startswith(error), reinit  # once per re-init


def test_other_nvml_errors_keep_the_session(start, state: FakeGpuState, tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "nvml.calls")
    monitor = start(call_log=calls.path, startup_grace_seconds=0)
    assert monitor.check() == []
    state.error("nvmlDeviceGetCount_v2", 999)  # NVML_ERROR_UNKNOWN says nothing about the session
    for _ in range(REINIT_AFTER_FAILED_CHECKS + 1):
        assert monitor.ask("check")["error"] == "MonitorError"
    assert calls.count("nvmlShutdown") == 0 and calls.count("nvmlInitWithFlags") == 1


def test_nvlinks_are_probed_once_per_session(start, state: FakeGpuState, tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "nvml.calls")
    state.nvlinks(0, gpu=1).nvlinks(12, gpu=2)  # a PCIe GPU and a partial topology among 18-link GPUs
    monitor = start(call_log=calls.path, startup_grace_seconds=0)
    assert monitor.check() == []
    assert link_probes(calls.since_last()) == {gpu: 36 for gpu in range(8)}  # NVML_NVLINK_MAX_LINKS
    assert monitor.check() == []
    assert link_probes(calls.since_last()) == {0: 18, 2: 12, 3: 18, 4: 18, 5: 18, 6: 18, 7: 18}
    state.nvlink(2, 11, active=False)  # a link that was up goes down: still seen
    assert monitor.check() == [("NVLINK_DOWN", "reboot", "GPU 2 (0000:75:00.0)")]
