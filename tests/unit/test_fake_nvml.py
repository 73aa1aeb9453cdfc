"""The fake libnvidia-ml, exercised through the real pynvml in a subprocess
(LD_LIBRARY_PATH is read by the dynamic loader only at process start)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

from tests.fake_nvml import LIBRARY_NAME, FakeGpuState, build_fake_nvml, fake_nvml_env

PRELUDE = textwrap.dedent("""\
    import json, sys, time
    import pynvml as n
    def out(**kw):
        print(json.dumps(kw), flush=True)
    def err(fn, *args):
        try:
            return fn(*args)
        except n.NVMLError as e:
            return type(e).__name__
""")


def run_pynvml(lib_dir: Path, state_file: Path, body: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          env=fake_nvml_env(lib_dir, state_file), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_build_is_cached(lib_dir: Path) -> None:
    library = lib_dir / LIBRARY_NAME
    mtime = library.stat().st_mtime_ns
    assert build_fake_nvml(lib_dir) == lib_dir
    assert library.stat().st_mtime_ns == mtime


def test_no_state_file_is_a_healthy_node(lib_dir: Path, tmp_path: Path) -> None:
    r = run_pynvml(lib_dir, tmp_path / "absent", """
        n.nvmlInit()
        h = [n.nvmlDeviceGetHandleByIndex(i) for i in range(n.nvmlDeviceGetCount())]
        out(count=len(h), driver=n.nvmlSystemGetDriverVersion(), nvml=n.nvmlSystemGetNVMLVersion(),
            name=n.nvmlDeviceGetName(h[0]), index=n.nvmlDeviceGetIndex(h[7]),
            uuids=[n.nvmlDeviceGetUUID(x) for x in h], pci=[n.nvmlDeviceGetPciInfo(x).busId for x in h],
            ecc=n.nvmlDeviceGetTotalEccErrors(h[0], n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC),
            remap=list(n.nvmlDeviceGetRemappedRows(h[0])), links=n.nvmlDeviceGetNvLinkState(h[0], 17),
            link18=err(n.nvmlDeviceGetNvLinkState, h[0], 18))
        n.nvmlShutdown()
    """)
    assert r["count"] == 8 and r["driver"] == "580.95.05" and r["nvml"].startswith("13.")
    assert r["name"] == "NVIDIA H100 80GB HBM3" and r["index"] == 7
    assert len(set(r["uuids"])) == 8 and all(u.startswith("GPU-") for u in r["uuids"])
    assert r["pci"][0] == "00000000:53:00.0" and r["pci"][6] == "00000000:B9:00.0" and len(set(r["pci"])) == 8
    assert r["ecc"] == 0 and r["remap"] == [0, 0, 0, 0]
    assert r["links"] == 1 and r["link18"] == "NVMLError_NotSupported"


def test_faults(lib_dir: Path, state: FakeGpuState) -> None:
    state.gpus(4).uuid(3, "GPU-abc").pci(3, "b9:00.0").ecc(3, dbe_volatile=2, sbe_aggregate=7)
    state.remap(3, pending=True, failure=True, correctable=1, uncorrectable=2).retired_pending(3)
    state.nvlink(3, 2, active=False, replay=10, recovery=1, crc_flit=3, crc_data=4).throttle(3, 0x48)
    state.recovery_action(3, 2)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(3)
        counters = [n.nvmlDeviceGetNvLinkErrorCounter(h, 2, c) for c in range(4)]
        fields = n.nvmlDeviceGetFieldValues(h, [n.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, n.NVML_FI_DEV_ECC_CURRENT])
        out(count=n.nvmlDeviceGetCount(), uuid=n.nvmlDeviceGetUUID(h), pci=n.nvmlDeviceGetPciInfo(h).busId,
            dbe=n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC),
            sbe=n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_AGGREGATE_ECC),
            remap=list(n.nvmlDeviceGetRemappedRows(h)), retired=n.nvmlDeviceGetRetiredPagesPendingStatus(h),
            link2=n.nvmlDeviceGetNvLinkState(h, 2), link3=n.nvmlDeviceGetNvLinkState(h, 3), counters=counters,
            throttle=n.nvmlDeviceGetCurrentClocksEventReasons(h),
            throttle_old=n.nvmlDeviceGetCurrentClocksThrottleReasons(h),
            recovery=[fields[0].nvmlReturn, fields[0].value.uiVal], other_field=fields[1].nvmlReturn)
    """)
    assert r["count"] == 4 and r["uuid"] == "GPU-abc" and r["pci"] == "00000000:B9:00.0"
    assert r["dbe"] == 2 and r["sbe"] == 7 and r["remap"] == [1, 2, 1, 1] and r["retired"] == 1
    assert r["link2"] == 0 and r["link3"] == 1 and r["counters"] == [10, 1, 3, 4]
    assert r["throttle"] == r["throttle_old"] == 0x48
    assert r["recovery"] == [0, 2] and r["other_field"] == 3  # NVML_ERROR_NOT_SUPPORTED in its own slot


def test_pcie_gpus_have_no_nvlink(lib_dir: Path, state: FakeGpuState) -> None:
    state.nvlinks(0).nvlinks(4, gpu=1)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        out(state=err(n.nvmlDeviceGetNvLinkState, h0, 0), counter=err(n.nvmlDeviceGetNvLinkErrorCounter, h0, 0, 0),
            gpu1=[err(n.nvmlDeviceGetNvLinkState, h1, link) for link in (3, 4)])
    """)
    assert r == {"state": "NVMLError_NotSupported", "counter": "NVMLError_NotSupported",
                 "gpu1": [1, "NVMLError_NotSupported"]}


def test_lost_gpu_raises_gpu_is_lost(lib_dir: Path, state: FakeGpuState) -> None:
    state.lost(2)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        h = n.nvmlDeviceGetHandleByIndex(2)
        try:
            n.nvmlDeviceGetUUID(h)
            out(raised=None)
        except n.NVMLError_GpuIsLost as e:
            out(raised=type(e).__name__, text=str(e), count=n.nvmlDeviceGetCount(),
                pci=err(n.nvmlDeviceGetPciInfo, h), other=n.nvmlDeviceGetUUID(n.nvmlDeviceGetHandleByIndex(1)))
    """)
    assert r["raised"] == "NVMLError_GpuIsLost" and r["text"] == "GPU is lost"
    assert r["count"] == 8 and r["pci"] == "NVMLError_GpuIsLost" and r["other"].startswith("GPU-")


def test_error_overrides(lib_dir: Path, state: FakeGpuState) -> None:
    state.error("nvmlDeviceGetRemappedRows", 3, gpu=1).error("nvmlDeviceGetHandleByIndex_v2", 15, gpu=5)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        out(remap1=err(n.nvmlDeviceGetRemappedRows, n.nvmlDeviceGetHandleByIndex(1)),
            remap0=list(n.nvmlDeviceGetRemappedRows(n.nvmlDeviceGetHandleByIndex(0))),
            handle5=err(n.nvmlDeviceGetHandleByIndex, 5))
    """)
    assert r == {"remap1": "NVMLError_NotSupported", "remap0": [0, 0, 0, 0], "handle5": "NVMLError_GpuIsLost"}
    state.error("nvmlInitWithFlags", 9)
    r = run_pynvml(lib_dir, state.path, "out(init=err(n.nvmlInit))")
    assert r == {"init": "NVMLError_DriverNotLoaded"}


def test_no_gpus_needs_the_no_gpus_flag(lib_dir: Path, state: FakeGpuState) -> None:
    state.gpus(0)
    r = run_pynvml(lib_dir, state.path, """
        plain = err(n.nvmlInit)
        n.nvmlInitWithFlags(n.NVML_INIT_FLAG_NO_GPUS)
        out(plain=plain, count=n.nvmlDeviceGetCount())
    """)
    assert r == {"plain": "NVMLError_GpuNotFound", "count": 0}


def test_calls_before_init_are_uninitialized(lib_dir: Path, state: FakeGpuState) -> None:
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit(); n.nvmlShutdown()
        out(count=err(n.nvmlDeviceGetCount))
    """)
    assert r == {"count": "NVMLError_Uninitialized"}


def test_xid_event_delivered_once_to_registered_gpus(lib_dir: Path, state: FakeGpuState) -> None:
    state.add_xid(1, 48)  # GPU 1 is not registered: never delivered
    state.add_xid(3, 79)
    state.add_xid(3, 74)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        s = n.nvmlEventSetCreate()
        h = n.nvmlDeviceGetHandleByIndex(3)
        supported = n.nvmlDeviceGetSupportedEventTypes(h)
        n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, s)
        events = []
        for _ in range(2):
            d = n.nvmlEventSetWait_v2(s, 100)
            events.append([n.nvmlDeviceGetIndex(d.device), d.eventType, d.eventData])
        t = time.monotonic()
        last = err(n.nvmlEventSetWait_v2, s, 200)
        out(supported=supported, events=events, last=last, waited=time.monotonic() - t,
            other=err(n.nvmlDeviceRegisterEvents, h, n.nvmlEventTypeSingleBitEccError, s))
        n.nvmlEventSetFree(s)
    """)
    assert r["supported"] == 0x8 | 0x2 and r["events"] == [[3, 0x8, 79], [3, 0x8, 74]]
    assert r["last"] == "NVMLError_Timeout" and r["waited"] >= 0.19
    assert r["other"] == "NVMLError_NotSupported"


def test_dbe_events_only_reach_sets_registered_for_them(lib_dir: Path, state: FakeGpuState) -> None:
    state.add_dbe(2)          # GPU 2 registers XID only: never delivered
    state.add_xid(2, 31)
    state.add_dbe(5)
    state.set("event.10", "5,xid:74")  # the explicit XID spelling
    state.add_xid(6, 13)      # GPU 6 registers DBE only: never delivered
    state.add_dbe(6)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        s = n.nvmlEventSetCreate()
        h = {i: n.nvmlDeviceGetHandleByIndex(i) for i in (2, 5, 6)}
        n.nvmlDeviceRegisterEvents(h[2], n.nvmlEventTypeXidCriticalError, s)
        n.nvmlDeviceRegisterEvents(h[5], n.nvmlEventTypeXidCriticalError | n.nvmlEventTypeDoubleBitEccError, s)
        n.nvmlDeviceRegisterEvents(h[6], n.nvmlEventTypeDoubleBitEccError, s)
        events = []
        while True:
            try:
                d = n.nvmlEventSetWait_v2(s, 100)
            except n.NVMLError_Timeout:
                break
            events.append([n.nvmlDeviceGetIndex(d.device), d.eventType, d.eventData])
        out(events=events)
    """)
    # Delivered in sequence order: state's own counter gave 1..6, "event.10" comes last.
    assert r["events"] == [[2, 0x8, 31], [5, 0x2, 0], [6, 0x2, 0], [5, 0x8, 74]]


def test_event_types_narrow_what_a_gpu_supports(lib_dir: Path, state: FakeGpuState) -> None:
    state.event_types(1, 0x8)
    r = run_pynvml(lib_dir, state.path, """
        n.nvmlInit()
        s = n.nvmlEventSetCreate()
        h0, h1 = n.nvmlDeviceGetHandleByIndex(0), n.nvmlDeviceGetHandleByIndex(1)
        both = n.nvmlEventTypeXidCriticalError | n.nvmlEventTypeDoubleBitEccError
        out(supported=[n.nvmlDeviceGetSupportedEventTypes(h0), n.nvmlDeviceGetSupportedEventTypes(h1)],
            both=err(n.nvmlDeviceRegisterEvents, h1, both, s),
            xid=err(n.nvmlDeviceRegisterEvents, h1, n.nvmlEventTypeXidCriticalError, s))
    """)
    assert r == {"supported": [0xa, 0x8], "both": "NVMLError_NotSupported", "xid": None}


def readline(proc: subprocess.Popen, what: str) -> Dict[str, Any]:
    line: Optional[str] = proc.stdout.readline() if proc.stdout else None
    assert line, f"subprocess ended before {what}: {proc.stderr.read() if proc.stderr else ''}"
    return json.loads(line)


def test_state_change_is_seen_by_a_running_process(lib_dir: Path, state: FakeGpuState) -> None:
    script = PRELUDE + textwrap.dedent("""
        n.nvmlInit()
        s = n.nvmlEventSetCreate()
        h = n.nvmlDeviceGetHandleByIndex(4)
        n.nvmlDeviceRegisterEvents(h, n.nvmlEventTypeXidCriticalError, s)
        out(count=n.nvmlDeviceGetCount(), uuid=err(n.nvmlDeviceGetUUID, h))
        sys.stdin.readline()
        out(count=n.nvmlDeviceGetCount(), uuid=err(n.nvmlDeviceGetUUID, h))
        d = n.nvmlEventSetWait_v2(s, 10000)  # the XID is queued while this waits
        out(xid=d.eventData)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=fake_nvml_env(lib_dir, state.path)) as proc:
        try:
            first = readline(proc, "the first reading")
            state.gpus(6).lost(4)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            second = readline(proc, "the second reading")
            state.add_xid(4, 95)
            third = readline(proc, "the event")
        finally:
            proc.kill()
    assert first == {"count": 8, "uuid": "GPU-fa4e0000-0000-4000-8000-000000000004"}
    assert second == {"count": 6, "uuid": "NVMLError_GpuIsLost"}
    assert third == {"xid": 95}


def test_hang_seconds_delays_calls(lib_dir: Path, state: FakeGpuState) -> None:
    state.hang(0.3)
    r = run_pynvml(lib_dir, state.path, """
        t = time.monotonic(); n.nvmlInit(); init = time.monotonic() - t
        t = time.monotonic(); n.nvmlDeviceGetCount(); count = time.monotonic() - t
        out(init=init, count=count)
    """)
    assert r["init"] >= 0.29 and r["count"] >= 0.29
