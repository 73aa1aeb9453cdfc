"""The NVML fault rules on constructed snapshots: no NVML, no library."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from hpresilience.agent.monitors.nvml import (
    NVLINK_WINDOW_POINTS,
    DbeEvent,
    GpuStatus,
    NvLinkStatus,
    NvmlConfig,
    NvmlSnapshot,
    SnapshotHistory,
    XidEvent,
    evaluate,
    gpu_for_pci_bus_id,
    normalize_pci_bus_id,
)
from hpresilience.finding import Finding, NodeAction
from hpresilience.slurm.scontrol_parse import parse_nodes

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


def run(current: NvmlSnapshot, *history: NvmlSnapshot, config: NvmlConfig = CONFIG,
        now: float = AFTER_GRACE) -> List[Finding]:
    return evaluate(current, history, config, now=now, started_at=0.0)


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


@pytest.mark.parametrize("gres, expected", [
    ("gpu:8(S:0-1)", 8),
    ("gpu:h100:8(S:0-1),nic:1", 8),
    # Issue 9, defect 6: MIG instances are not GPUs. 36 instances on 8 A100s made every boot GPU_COUNT_LOW.
    ("gpu:1g.10gb:28(S:0),gpu:3g.40gb:8(S:1)", None),
    ("gpu:1g.5gb+me:7", None),
    ("gpu:7g.80gb:8", None),
    ("gpu:a100_1g.5gb:14,gpu:a100:4", None),       # partly MIG: the physical count is still unknown
    ("gpu:nvidia_a100_3g.39gb:2", None),           # Slurm's AutoDetect=nvml names
    ("gpu:1c.2g.10gb:3", None),                    # a compute-instance profile
    ("gpu:a100-sxm4-80gb:8", 8),                   # a memory size in a type name is not a profile
])
def test_expected_gpus_from_slurm_gres_are_physical(gres: str, expected: Optional[int]) -> None:
    (node,) = parse_nodes(f"NodeName=n1 State=IDLE Gres={gres}\n")
    assert node.gpu_count == expected


def test_mig_node_is_never_short_of_its_instances() -> None:
    """8 physical GPUs split into 36 MIG instances: NVML counts the 8, and with no expected
    count from Slurm nothing is compared (the monitor falls back to the most GPUs seen)."""
    (node,) = parse_nodes("NodeName=n1 State=IDLE Gres=gpu:1g.10gb:28(S:0),gpu:3g.40gb:8(S:1)\n")
    eight = snapshot(*[gpu(i % 4) for i in range(8)])
    assert run(eight, config=NvmlConfig(expected_gpus=node.gpu_count)) == []
    assert codes(run(eight, config=NvmlConfig(expected_gpus=9))) == [("GPU_COUNT_LOW", NodeAction.REBOOT)]


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
WINDOW = CONFIG.nvlink_window_seconds


@pytest.mark.parametrize("before, after, seconds, expected", [
    (None, {"replay": LIFETIME}, WINDOW, []),                           # no earlier reading: no rate, no verdict
    ({"replay": LIFETIME}, {"replay": LIFETIME}, WINDOW, []),            # huge total, zero rate
    ({"replay": LIFETIME}, {"replay": LIFETIME + 500}, WINDOW, []),      # 50/min under 60/min
    ({"replay": LIFETIME}, {"replay": LIFETIME + 700}, WINDOW, [("NVLINK_ERRORS", NodeAction.REBOOT)]),
    ({"recovery": 5}, {"recovery": 1000}, WINDOW, [("NVLINK_ERRORS", NodeAction.REBOOT)]),
    ({"crc_flit": 0}, {"crc_flit": 50_000}, WINDOW, []),                # CRC errors matter only at 100+/s
    ({"crc_flit": 0}, {"crc_flit": 70_000}, WINDOW, [("NVLINK_ERRORS", NodeAction.REBOOT)]),
    ({"replay": LIFETIME}, {"replay": 500}, WINDOW, []),                # counter reset by a driver reload
    # Issue 9, defect 7: two replay errors 1.05 s apart were "114/min" and replaced the node.
    ({"replay": 0}, {"replay": 2}, 1.05, []),
    ({"replay": 0}, {"replay": 20_000}, WINDOW - 1, []),                # not watched for a whole window yet
])
def test_nvlink_error_rates(before: Optional[Dict[str, int]], after: Dict[str, int], seconds: float,
                            expected: list) -> None:
    history = [with_errors(AFTER_GRACE - seconds, before)] if before is not None else []
    assert codes(run(with_errors(AFTER_GRACE, after), *history)) == expected


@pytest.mark.parametrize("errors, expected", [(9, []), (10, [("NVLINK_ERRORS", NodeAction.REBOOT)])])
def test_nvlink_rate_needs_a_minimum_count(errors: int, expected: list) -> None:
    config = NvmlConfig(expected_gpus=4, nvlink_error_rate_per_min={"replay": 0.1}, nvlink_min_errors=10)
    history = with_errors(AFTER_GRACE - WINDOW, {"replay": 0})
    assert codes(run(with_errors(AFTER_GRACE, {"replay": errors}), history, config=config)) == expected


@pytest.mark.parametrize("second_at, expected", [
    (AFTER_GRACE - WINDOW, [("NVLINK_ERRORS", NodeAction.REBOOT)]),   # 700 in the last 600 s
    (AFTER_GRACE - WINDOW + 1, []),                                    # window from the first: 700 in 1000 s
])
def test_nvlink_window_starts_at_the_latest_reading_a_window_old(second_at: float, expected: list) -> None:
    history = [with_errors(AFTER_GRACE - 1000, {"replay": 0}), with_errors(second_at, {"replay": 0})]
    assert codes(run(with_errors(AFTER_GRACE, {"replay": 700}), *history)) == expected


def test_nvlink_rate_message_and_swapped_gpu() -> None:
    history = with_errors(AFTER_GRACE - WINDOW, {"replay": 0})
    (finding,) = run(with_errors(AFTER_GRACE, {"replay": 1200}), history)
    assert finding.component == "nvlink" and "link 1 replay 120/min > 60/min" in finding.message
    assert finding.evidence == "counter increase over 600s"
    # A different GPU at the same index (replaced, or indices moved): its counters are not comparable.
    assert run(with_errors(AFTER_GRACE, {"replay": 1200}, uuid="GPU-new"), history) == []


@pytest.mark.parametrize("fields, problem", [
    ({"nvlink_window_seconds": 59}, "per minute"),
    ({"nvlink_min_errors": 0}, ">= 1"),
    ({"nvlink_error_rate_per_min": {"replays": 60.0}}, "unknown counter 'replays'"),
])
def test_config_rejects(fields: dict, problem: str) -> None:
    NvmlConfig().validate()
    with pytest.raises(ValueError, match=problem):
        NvmlConfig(**fields).validate()


def test_snapshot_history_feeds_rates_over_a_whole_window_only() -> None:
    """The monitor's loop, one reading a second for three windows: quiet, then a one-minute burst
    of 2 errors/s (120/min within the minute, 12/min over the window), then 2 errors/s throughout."""
    history = SnapshotHistory(WINDOW)
    window = int(WINDOW)
    replay = 0
    verdicts = {}
    for second in range(3 * window + 1):
        if window < second <= window + 60 or second > 2 * window:
            replay += 2
        current = with_errors(second, {"replay": replay})
        verdicts[second] = codes(evaluate(current, history.snapshots, CONFIG, now=AFTER_GRACE, started_at=0.0))
        history.add(current)
        assert len(history.snapshots) <= NVLINK_WINDOW_POINTS + 1
    assert all(verdicts[s] == [] for s in range(2 * window))
    assert verdicts[3 * window] == [("NVLINK_ERRORS", NodeAction.REBOOT)]


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
