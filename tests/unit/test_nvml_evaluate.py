"""The NVML fault rules on constructed snapshots: no NVML, no library."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from hpresilience.agent.monitors.nvml import (
    DbeEvent,
    GpuStatus,
    NvLinkStatus,
    NvmlConfig,
    NvmlSnapshot,
    XidEvent,
    evaluate,
    gpu_for_pci_bus_id,
    normalize_pci_bus_id,
)
from hpresilience.finding import Finding, NodeAction

PCI = ["0000:1b:00.0", "0000:43:00.0", "0000:52:00.0", "0000:61:00.0"]
CONFIG = NvmlConfig(expected_gpus=4, startup_grace_seconds=300)
AFTER_GRACE = 1000.0


def gpu(index: int, **fields) -> GpuStatus:
    defaults = dict(uuid=f"GPU-{index}", pci_bus_id=PCI[index], ecc_dbe_volatile=0, remap_pending=False,
                    remap_failure=False, retired_pages_pending=False, throttle_reasons=0, recovery_action=0,
                    nvlinks=links())
    defaults.update(fields)
    return GpuStatus(index=index, **defaults)


def links(n: int = 4, down: Sequence[int] = (), was_active: bool = True,
          errors: Optional[Dict[int, Dict[str, int]]] = None) -> Tuple[NvLinkStatus, ...]:
    return tuple(NvLinkStatus(link=i, active=i not in down, was_active=was_active,
                              errors=(errors or {}).get(i, {"replay": 0, "recovery": 0}))
                 for i in range(n))


def snapshot(*gpus: GpuStatus, taken_at: float = AFTER_GRACE, count: Optional[int] = None,
             events: Tuple[XidEvent, ...] = (), dbe_events: Tuple[DbeEvent, ...] = (),
             missing: Tuple[str, ...] = (), init_error: Optional[str] = None) -> NvmlSnapshot:
    return NvmlSnapshot(taken_at=taken_at, gpu_count=len(gpus) if count is None else count, gpus=gpus,
                        xid_events=events, dbe_events=dbe_events, missing=missing, init_error=init_error)


def healthy(**changes) -> NvmlSnapshot:
    """Four GPUs; `changes` replaces GPU 3's fields."""
    return snapshot(gpu(0), gpu(1), gpu(2), gpu(3, **changes))


def codes(findings: List[Finding]) -> List[Tuple[str, NodeAction]]:
    return [(f.code, f.action) for f in findings]


def run(current: NvmlSnapshot, previous: Optional[NvmlSnapshot] = None, config: NvmlConfig = CONFIG,
        now: float = AFTER_GRACE) -> List[Finding]:
    return evaluate(current, previous, config, now=now, started_at=0.0)


@pytest.mark.parametrize("changes, expected", [
    ({}, []),
    (dict(lost=True, lost_error="NVMLError_GpuIsLost: GPU is lost"), [("GPU_LOST", NodeAction.REBOOT)]),
    (dict(ecc_dbe_volatile=2), [("ECC_DBE_VOLATILE", NodeAction.REBOOT)]),
    (dict(remap_pending=True), [("ROW_REMAP_PENDING", NodeAction.REBOOT)]),
    (dict(remap_failure=True), [("ROW_REMAP_FAILURE", NodeAction.REPLACE)]),
    (dict(remap_failure=True, remap_pending=True),
     [("ROW_REMAP_FAILURE", NodeAction.REPLACE), ("ROW_REMAP_PENDING", NodeAction.REBOOT)]),
    (dict(retired_pages_pending=True), [("RETIRED_PAGES_PENDING", NodeAction.REBOOT)]),
    (dict(recovery_action=1), [("GPU_RECOVERY_ACTION", NodeAction.REBOOT)]),  # GPU reset
    (dict(recovery_action=2), [("GPU_RECOVERY_ACTION", NodeAction.REBOOT)]),  # node reboot
    (dict(recovery_action=4), [("GPU_RECOVERY_ACTION", NodeAction.REBOOT)]),  # drain and reset
    (dict(throttle_reasons=0x08), [("GPU_THROTTLED", NodeAction.NONE)]),      # HW slowdown
    (dict(throttle_reasons=0x80), [("GPU_THROTTLED", NodeAction.NONE)]),      # power brake
    (dict(throttle_reasons=0x01 | 0x04 | 0x10), []),                          # idle, SW power cap, sync boost
    (dict(nvlinks=links(down=[2])), [("NVLINK_DOWN", NodeAction.REBOOT)]),
    (dict(nvlinks=links(down=[2], was_active=False)), []),                    # never trained: not ours to judge
    (dict(lost=True, remap_failure=True), [("GPU_LOST", NodeAction.REBOOT)]),  # nothing else is readable
    # Not supported anywhere (old GPU, ECC off, PCIe): silence, not faults.
    (dict(ecc_dbe_volatile=None, remap_pending=None, remap_failure=None, retired_pages_pending=None,
          throttle_reasons=None, recovery_action=None, nvlinks=()), []),
])
def test_gpu_faults(changes: dict, expected: List[Tuple[str, NodeAction]]) -> None:
    assert codes(run(healthy(**changes))) == expected


def test_finding_names_the_gpu() -> None:
    (finding,) = run(healthy(remap_failure=True))
    assert finding.monitor == "nvml" and finding.component == "memory"
    assert finding.entity == "GPU 3 (0000:61:00.0)" and finding.key == "ROW_REMAP_FAILURE@GPU 3 (0000:61:00.0)"
    assert "GPU 3" in finding.message and finding.evidence


def test_throttle_message_lists_reasons_and_mask_is_configurable() -> None:
    (finding,) = run(healthy(throttle_reasons=0x48))
    assert finding.message.endswith("throttled: HW slowdown, HW thermal slowdown")
    config = NvmlConfig(expected_gpus=4, throttle_mask=0x80)
    assert run(healthy(throttle_reasons=0x48), config=config) == []


def test_unknown_recovery_action_still_reboots() -> None:
    (finding,) = run(healthy(recovery_action=42))
    assert finding.action is NodeAction.REBOOT and "42" in finding.message


@pytest.mark.parametrize("count, now, expected_gpus, expected", [
    (4, AFTER_GRACE, 4, []),
    (3, AFTER_GRACE, 4, [("GPU_COUNT_LOW", NodeAction.REBOOT)]),
    (3, 299.0, 4, []),                      # driver still loading: inside the grace period
    (3, 300.0, 4, [("GPU_COUNT_LOW", NodeAction.REBOOT)]),
    (3, AFTER_GRACE, None, []),             # nothing to compare with
    (5, AFTER_GRACE, 4, []),                # more than expected is not our fault to find
])
def test_gpu_count(count: int, now: float, expected_gpus: Optional[int], expected: list) -> None:
    config = NvmlConfig(expected_gpus=expected_gpus, startup_grace_seconds=300)
    current = snapshot(*[gpu(i) for i in range(count)] if count <= 4 else [], count=count)
    assert codes(run(current, config=config, now=now)) == expected


def test_gpu_count_names_the_missing_gpu() -> None:
    (finding,) = run(snapshot(gpu(0), gpu(1), gpu(2), missing=("0000:61:00.0",)))
    assert finding.message == "GPU count 3 < expected 4" and finding.entity is None
    assert finding.evidence == "nvmlDeviceGetCount=3; missing 0000:61:00.0"


def test_driver_that_does_not_start_counts_as_no_gpus() -> None:
    (finding,) = run(snapshot(init_error="Driver Not Loaded"))
    assert finding.code == "GPU_COUNT_LOW" and "Driver Not Loaded" in finding.evidence


def with_errors(taken_at: float, errors: Dict[str, int], uuid: str = "GPU-3") -> NvmlSnapshot:
    return snapshot(gpu(0), gpu(1), gpu(2), gpu(3, uuid=uuid, nvlinks=links(errors={1: errors})), taken_at=taken_at)


LIFETIME = 10_000_000  # errors since driver load, long ago


@pytest.mark.parametrize("before, after, seconds, expected", [
    (None, {"replay": LIFETIME}, 60, []),                              # no previous reading: no rate, no verdict
    ({"replay": LIFETIME}, {"replay": LIFETIME}, 60, []),               # huge total, zero rate
    ({"replay": LIFETIME}, {"replay": LIFETIME + 30}, 60, []),          # 30/min under 60/min
    ({"replay": LIFETIME}, {"replay": LIFETIME + 100}, 60, [("NVLINK_ERRORS", NodeAction.REPLACE)]),
    ({"replay": 0}, {"replay": 20}, 10, [("NVLINK_ERRORS", NodeAction.REPLACE)]),  # 120/min over a short interval
    ({"recovery": 5}, {"recovery": 200}, 60, [("NVLINK_ERRORS", NodeAction.REPLACE)]),
    ({"crc_flit": 0}, {"crc_flit": 5000}, 60, []),                     # CRC errors matter only at 100+/s
    ({"crc_flit": 0}, {"crc_flit": 7000}, 60, [("NVLINK_ERRORS", NodeAction.REPLACE)]),
    ({"replay": LIFETIME}, {"replay": 500}, 60, []),                   # counter reset by a driver reload
])
def test_nvlink_error_rates(before: Optional[Dict[str, int]], after: Dict[str, int], seconds: float,
                            expected: list) -> None:
    previous = with_errors(AFTER_GRACE - seconds, before) if before is not None else None
    assert codes(run(with_errors(AFTER_GRACE, after), previous)) == expected


def test_nvlink_rate_message_and_swapped_gpu() -> None:
    previous = with_errors(940, {"replay": 0})
    (finding,) = run(with_errors(1000, {"replay": 120}), previous)
    assert finding.component == "nvlink" and "link 1 replay 120/min > 60/min" in finding.message
    # A different GPU at the same index (replaced, or indices moved): its counters are not comparable.
    assert run(with_errors(1000, {"replay": 120}, uuid="GPU-new"), previous) == []


def test_pcie_gpus_are_never_flagged_for_nvlink() -> None:
    pcie = snapshot(*[gpu(i, nvlinks=()) for i in range(4)], taken_at=900)
    assert run(snapshot(*[gpu(i, nvlinks=()) for i in range(4)]), pcie) == []


def test_nvlink_checks_can_be_switched_off() -> None:
    config = NvmlConfig(expected_gpus=4, nvlink=False)
    assert run(healthy(nvlinks=links(down=[0, 1])), config=config) == []


def test_xid_events_are_reported_without_an_action() -> None:
    current = snapshot(gpu(0), gpu(1), gpu(2), gpu(3), events=(XidEvent(gpu_index=3, xid=79, count=12),))
    (finding,) = run(current)
    assert (finding.code, finding.action, finding.entity) == ("XID_79", NodeAction.NONE, "GPU 3 (0000:61:00.0)")
    assert "count=12" in finding.evidence


def test_dbe_events_mean_reboot_per_gpu() -> None:
    current = snapshot(gpu(0), gpu(1), gpu(2), gpu(3), events=(XidEvent(gpu_index=1, xid=48),),
                       dbe_events=(DbeEvent(gpu_index=2, count=3), DbeEvent(gpu_index=7)))
    found = {f.code + "@" + (f.entity or ""): f for f in run(current)}
    assert sorted(found) == ["ECC_DBE_EVENT@GPU 2 (0000:52:00.0)", "ECC_DBE_EVENT@GPU 7", "XID_48@GPU 1 (0000:43:00.0)"]
    dbe = found["ECC_DBE_EVENT@GPU 2 (0000:52:00.0)"]
    assert dbe.action == NodeAction.REBOOT and dbe.component == "memory"
    assert "nvmlEventTypeDoubleBitEccError count=3" in dbe.evidence
    assert found["XID_48@GPU 1 (0000:43:00.0)"].action == NodeAction.NONE


@pytest.mark.parametrize("text, expected", [
    ("0000:61:00", (3, "GPU-3")),       # as the kernel writes it in XID lines
    ("PCI:0000:61:00", (3, "GPU-3")),
    ("61:00.0", (3, "GPU-3")),
    ("00000000:61:00.0", (3, "GPU-3")),  # as NVML writes it
    ("0000:62:00", None),
    ("garbage", None),
])
def test_gpu_for_pci_bus_id(text: str, expected: Optional[Tuple[int, str]]) -> None:
    assert gpu_for_pci_bus_id(healthy(), text) == expected


def test_normalize_pci_bus_id_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a PCI bus id"):
        normalize_pci_bus_id("b9-00")
