"""The NVML GPU monitor of the node agent.

Collection (`NvmlCollector.collect`, which talks to the driver through pynvml)
is kept apart from evaluation (`evaluate`, a pure function of the new snapshot
and earlier ones),
so every fault rule is tested with plain data and the NVML path with the real
pynvml against a fake libnvidia-ml (tests/fake_nvml).

`NvmlMonitor` runs all NVML work on one dedicated thread and waits for it with
a timeout, so a hung driver blocks that thread and never the agent. A closed
monitor stays closed: a late `check()` (from a monitor thread that outlived a
reload) returns [] without starting a thread or touching NVML.

A driver that was unloaded, reloaded or upgraded under the agent leaves the NVML
session dead (UNINITIALIZED, DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH): after
`REINIT_AFTER_FAILED_CHECKS` checks in a row that got such an answer the
collector shuts the session down and the next check initialises a new one. A
hung driver is not that case: its calls never answer, and the monitor only
waits for them to return.

XIDs: NVML delivers XID critical-error events, but it cannot report every XID
(79, 119 and 120 are missed, DCGM #162) and the XID -> action mapping is owned
by the kernel-log rules. The monitor therefore reports each XID it sees as a
finding `XID_<n>` with action NONE and the same entity the kernel-log monitor
uses ("GPU <index> (<pci bus id>)"); the agent de-duplicates on
`Finding.key` and keeps the strongest action.

Double-bit ECC events: NVML also signals each uncorrectable memory error as it
happens. Each GPU with such events becomes one finding `ECC_DBE_EVENT` (action
REBOOT: the error retires a page or needs a row remap, which takes effect only
after a GPU reset, and the agent's reset is a reboot). The event is kept apart
from the volatile DBE counter (ECC_DBE_VOLATILE) because it arrives even where
that counter is unsupported, and within the check in which it happened.

NVLink error counters: a rate is the counter's increase over at least
`nvlink_window_seconds` (10 min) of watched time, compared with the per-minute
threshold only when it is at least `nvlink_min_errors`; no rate before the
monitor has watched a whole window. NVLINK_ERRORS is a reboot, never a replace
on its own: errors that return after the reboot are escalated (issue 9, defect 7).

Expected GPU count: `expected_gpus`, else what the daemon read from Slurm's
Gres, else the most GPUs seen since start. A MIG GRES counts instances, not
GPUs, so the daemon takes no count from it (issue 9, defect 6): nvmlDeviceGetCount
counts physical GPUs, MIG or not.
"""
from __future__ import annotations

import ctypes
import enum
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

import pynvml
import structlog

from ...finding import Finding, NodeAction
from ..monitor import MonitorError

log = structlog.get_logger(__name__)

MONITOR = "nvml"
T = TypeVar("T")

# nvml.h clock event ("throttle") reasons that mean the hardware protects itself.
THROTTLE_REASONS: Dict[int, str] = {
    pynvml.nvmlClocksEventReasonHwSlowdown: "HW slowdown",
    pynvml.nvmlClocksEventReasonSwThermalSlowdown: "SW thermal slowdown",
    pynvml.nvmlClocksEventReasonHwThermalSlowdown: "HW thermal slowdown",
    pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown: "HW power brake",
}
DEFAULT_THROTTLE_MASK = 0xE8  # all of the above, as Azure's health agent uses

NVLINK_COUNTERS: Dict[str, int] = {
    "replay": pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    "recovery": pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
    "crc_flit": pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    "crc_data": pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
}
# DCGM's hardware limits: 1 replay/recovery error per second; CRC errors only
# matter at 100+ per second.
DEFAULT_NVLINK_RATES: Dict[str, float] = {"replay": 60.0, "recovery": 60.0, "crc_flit": 6000.0, "crc_data": 6000.0}
# The monitor keeps about this many readings per NVLink window, evenly spaced: the span a rate is measured
# over is then between the window and 1/NVLINK_WINDOW_POINTS longer, whatever the check interval.
NVLINK_WINDOW_POINTS = 60

RECOVERY_ACTIONS: Dict[int, str] = {
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "GPU_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "NODE_REBOOT",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "DRAIN_P2P",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "DRAIN_AND_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN: "RECOVER_IMEX_DOMAIN",
    pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET: "BUS_RESET",
    pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT: "SYSTEM_REBOOT",
}

# The event types the collector registers for, each where the GPU supports it.
EVENT_TYPES = pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError

# Answers that mean "this GPU or driver does not have it": skip the value, never a fault.
_ABSENT = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NoPermission)
# Answers that mean the GPU itself is gone or unusable until a reset.
_LOST = (pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_ResetRequired)
# Answers that mean the NVML session itself is gone: nothing answers again until nvmlShutdown and a new init.
_SESSION_DEAD = (pynvml.NVMLError_Uninitialized, pynvml.NVMLError_DriverNotLoaded,
                 pynvml.NVMLError_LibRmVersionMismatch)
# Answers the collector expects and handles: "not here", a lost GPU (a finding, not a failed call),
# the event wait's "no event" and the link probe's "past the last link".
_ANSWERS = (*_ABSENT, *_LOST, pynvml.NVMLError_Timeout, pynvml.NVMLError_InvalidArgument)
# Several checks in a row, not one: a driver being reloaded answers like this for a moment too.
REINIT_AFTER_FAILED_CHECKS = 3


class NvmlErrorKind(str, enum.Enum):
    """How an NVML call failed: the `kind` label of hpr_agent_nvml_errors_total (issue 12)."""
    TIMEOUT = "timeout"                        # hung past call/pass timeout, or refused while one still hangs
    LIBRARY_MISSING = "library_missing"        # no libnvidia-ml.so.1 on a node that should have GPUs:
                                               # the monitor disables itself
    DRIVER_UNAVAILABLE = "driver_unavailable"  # driver not loaded, session uninitialised, library/module mismatch
    ERROR = "error"                            # any other failed call


def ignore_error(kind: NvmlErrorKind) -> None:
    """The error sink of a monitor nobody exports metrics for (`hpresilience check`, deepcheck's gpu_count)."""


@dataclass
class NvmlConfig:
    enabled: bool = True
    expected_gpus: Optional[int] = None      # None: the most GPUs seen since the agent started
    startup_grace_seconds: float = 300.0     # no GPU-count verdict before this: drivers load slowly after boot
    call_timeout_seconds: float = 5.0        # one NVML call longer than this = hung driver (MonitorError)
    pass_timeout_seconds: float = 60.0       # one whole collection, however busy the calls
    nvlink: bool = True
    nvlink_error_rate_per_min: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_NVLINK_RATES))
    # Rates are the counter's increase over at least this much watched time, and never fewer errors than
    # nvlink_min_errors (issue 9, defect 7: two replay errors 1.05 s apart read as 114/min).
    nvlink_window_seconds: float = 600.0
    nvlink_min_errors: int = 10
    throttle_mask: int = DEFAULT_THROTTLE_MASK
    event_wait_ms: int = 50                  # first event wait of a check; the rest only drain the queue
    max_events_per_check: int = 1000         # an event flood is read over several checks, never in one

    def validate(self) -> None:
        if self.nvlink_window_seconds < 60:
            raise ValueError("nvlink_window_seconds must be >= 60: the thresholds are per minute")
        if self.nvlink_min_errors < 1:
            raise ValueError("nvlink_min_errors must be >= 1")
        unknown = sorted(set(self.nvlink_error_rate_per_min) - set(NVLINK_COUNTERS))
        if unknown:
            raise ValueError(f"nvlink_error_rate_per_min: unknown counter {unknown[0]!r} "
                             f"(known: {', '.join(NVLINK_COUNTERS)})")


# ---- snapshot ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NvLinkStatus:
    link: int
    active: bool
    was_active: bool                  # active in this or an earlier collection of this agent run
    errors: Mapping[str, int] = field(default_factory=dict)  # counter name -> value (since driver load)


@dataclass(frozen=True)
class GpuStatus:
    index: int
    uuid: Optional[str] = None
    pci_bus_id: Optional[str] = None  # normalized: 0000:b9:00.0
    lost: bool = False
    lost_error: str = ""              # the NVML error that said so
    ecc_dbe_volatile: Optional[int] = None  # None: not supported / ECC off
    remap_pending: Optional[bool] = None
    remap_failure: Optional[bool] = None
    retired_pages_pending: Optional[bool] = None
    nvlinks: Tuple[NvLinkStatus, ...] = ()  # empty on PCIe GPUs
    throttle_reasons: Optional[int] = None
    recovery_action: Optional[int] = None

    @property
    def entity(self) -> str:
        return gpu_entity(self.index, self.pci_bus_id)


@dataclass(frozen=True)
class XidEvent:
    gpu_index: int                    # -1 when the event's device handle is unknown
    xid: int
    count: int = 1


@dataclass(frozen=True)
class DbeEvent:
    """Double-bit (uncorrectable) ECC error events of one GPU since the last reading."""
    gpu_index: int                    # -1 when the event's device handle is unknown
    count: int = 1


@dataclass(frozen=True)
class NvmlSnapshot:
    taken_at: float                   # the monitor's clock (monotonic seconds)
    gpu_count: int
    gpus: Tuple[GpuStatus, ...] = ()
    xid_events: Tuple[XidEvent, ...] = ()
    dbe_events: Tuple[DbeEvent, ...] = ()
    missing: Tuple[str, ...] = ()     # PCI bus ids seen earlier in this agent run, no longer listed
    init_error: Optional[str] = None  # NVML could not start (driver not loaded): gpu_count is 0


def gpu_entity(index: int, pci_bus_id: Optional[str]) -> str:
    return f"GPU {index} ({pci_bus_id})" if pci_bus_id else f"GPU {index}"


_PCI_RE = re.compile(r"^(?:PCI:)?(?:([0-9a-f]{1,8}):)?([0-9a-f]{1,2}):([0-9a-f]{1,2})(?:\.([0-7]))?$", re.IGNORECASE)


def normalize_pci_bus_id(text: str) -> str:
    """NVML, the kernel and sysfs spell one GPU differently; compare in sysfs form.

    >>> [normalize_pci_bus_id(t) for t in ("00000000:B9:00.0", "PCI:0000:b9:00", "b9:00.0")]
    ['0000:b9:00.0', '0000:b9:00.0', '0000:b9:00.0']
    """
    m = _PCI_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a PCI bus id: {text!r}")
    domain, bus, device, function = m.groups()
    # NVIDIA GPUs are function 0; the kernel's XID lines leave it out.
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function or '0'}"


def gpu_for_pci_bus_id(snapshot: NvmlSnapshot, bus_id: str) -> Optional[Tuple[int, Optional[str]]]:
    """(index, uuid) of the GPU at a bus id as the kernel writes it ("0000:b9:00", "b9:00.0"); None if unknown."""
    try:
        wanted = normalize_pci_bus_id(bus_id)
    except ValueError:
        return None
    for gpu in snapshot.gpus:
        if gpu.pci_bus_id == wanted:
            return gpu.index, gpu.uuid
    return None


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate(snapshot: NvmlSnapshot, history: Sequence[NvmlSnapshot], config: NvmlConfig, now: float,
             started_at: float) -> List[Finding]:
    """What is wrong now. `now` and `started_at` are on the snapshots' clock.

    `history` holds earlier readings, oldest first (see SnapshotHistory). NVLink
    counter rates are the increase since the latest of them taken at least
    `nvlink_window_seconds` before `snapshot`: never totals since driver load (a
    link that erred last week is not failing now), and never a rate extrapolated
    from a shorter span; until the monitor has watched a whole window there is no
    rate at all (issue 9, defect 7)."""
    findings = _check_count(snapshot, config, now, started_at)
    reference = _window_start(snapshot, history, config.nvlink_window_seconds)
    elapsed = snapshot.taken_at - reference.taken_at if reference else 0.0
    before = {g.index: g for g in reference.gpus} if reference and elapsed > 0 else {}
    for gpu in snapshot.gpus:
        findings.extend(_check_gpu(gpu, before.get(gpu.index), elapsed, config))
    entities = {g.index: g.entity for g in snapshot.gpus}
    for event in snapshot.xid_events:
        entity = entities.get(event.gpu_index, gpu_entity(event.gpu_index, None))
        findings.append(_finding(f"XID_{event.xid}", NodeAction.NONE, f"{entity} XID {event.xid} (NVML event)",
                                 entity, f"nvmlEventTypeXidCriticalError xid={event.xid} count={event.count}"))
    for dbe in snapshot.dbe_events:
        entity = entities.get(dbe.gpu_index, gpu_entity(dbe.gpu_index, None))
        findings.append(_finding("ECC_DBE_EVENT", NodeAction.REBOOT,
                                 f"{entity} double-bit ECC error (NVML event), needs a GPU reset", entity,
                                 f"nvmlEventTypeDoubleBitEccError count={dbe.count}", component="memory"))
    return findings


def _window_start(snapshot: NvmlSnapshot, history: Sequence[NvmlSnapshot], window: float) -> Optional[NvmlSnapshot]:
    """The latest earlier reading taken at least `window` before `snapshot`; None while there is none."""
    horizon = snapshot.taken_at - window
    return next((earlier for earlier in reversed(history) if earlier.taken_at <= horizon), None)


class SnapshotHistory:
    """The earlier readings `evaluate` measures NVLink rates against: one every
    window/NVLINK_WINDOW_POINTS seconds, back to the latest one taken at least a
    window ago, so memory stays bounded whatever the check interval."""

    def __init__(self, window_seconds: float) -> None:
        self._window = window_seconds
        self._spacing = window_seconds / NVLINK_WINDOW_POINTS
        self.snapshots: List[NvmlSnapshot] = []

    def add(self, snapshot: NvmlSnapshot) -> None:
        kept = self.snapshots
        if kept and snapshot.taken_at - kept[-1].taken_at < self._spacing:
            return
        kept.append(snapshot)
        # The latest reading at or before the horizon starts the window; older ones are spent.
        horizon = snapshot.taken_at - self._window
        while len(kept) >= 2 and kept[1].taken_at <= horizon:
            kept.pop(0)


def _finding(code: str, action: NodeAction, message: str, entity: Optional[str], evidence: str,
             component: str = "gpu") -> Finding:
    return Finding(monitor=MONITOR, code=code, action=action, message=message, component=component,
                   entity=entity, evidence=evidence)


def _check_count(snapshot: NvmlSnapshot, config: NvmlConfig, now: float, started_at: float) -> List[Finding]:
    expected = config.expected_gpus
    if expected is None or snapshot.gpu_count >= expected or now - started_at < config.startup_grace_seconds:
        return []
    evidence = f"nvmlDeviceGetCount={snapshot.gpu_count}"
    if snapshot.init_error:
        evidence = f"nvmlInit failed: {snapshot.init_error}"
    elif snapshot.missing:
        evidence += f"; missing {' '.join(snapshot.missing)}"
    return [_finding("GPU_COUNT_LOW", NodeAction.REBOOT, f"GPU count {snapshot.gpu_count} < expected {expected}",
                     None, evidence)]


def _check_gpu(gpu: GpuStatus, before: Optional[GpuStatus], elapsed: float, config: NvmlConfig) -> List[Finding]:
    name = gpu.entity
    if gpu.lost:
        return [_finding("GPU_LOST", NodeAction.REBOOT, f"{name} lost (fell off the bus or needs a reset)", name,
                         gpu.lost_error)]
    out: List[Finding] = []
    if gpu.ecc_dbe_volatile:
        out.append(_finding("ECC_DBE_VOLATILE", NodeAction.REBOOT,
                            f"{name} {gpu.ecc_dbe_volatile} uncorrectable ECC errors since driver load", name,
                            f"volatile uncorrected ECC count={gpu.ecc_dbe_volatile}", component="memory"))
    if gpu.remap_failure:
        out.append(_finding("ROW_REMAP_FAILURE", NodeAction.REPLACE, f"{name} row remapping failed", name,
                            "nvmlDeviceGetRemappedRows failureOccurred=1", component="memory"))
    if gpu.remap_pending:
        out.append(_finding("ROW_REMAP_PENDING", NodeAction.REBOOT, f"{name} row remap pending, needs a reset", name,
                            "nvmlDeviceGetRemappedRows isPending=1", component="memory"))
    if gpu.retired_pages_pending:
        out.append(_finding("RETIRED_PAGES_PENDING", NodeAction.REBOOT, f"{name} page retirement pending", name,
                            "nvmlDeviceGetRetiredPagesPendingStatus=1", component="memory"))
    if gpu.recovery_action:
        what = RECOVERY_ACTIONS.get(gpu.recovery_action, str(gpu.recovery_action))
        # Every recovery action the driver can ask for is a GPU/bus reset or more;
        # the agent's reset is a node reboot, and a repeat escalates to replace.
        out.append(_finding("GPU_RECOVERY_ACTION", NodeAction.REBOOT, f"{name} driver asks for {what}", name,
                            f"NVML_FI_DEV_GET_GPU_RECOVERY_ACTION={gpu.recovery_action}"))
    if config.nvlink:
        out.extend(_check_nvlink(gpu, before, elapsed, config))
    throttled = (gpu.throttle_reasons or 0) & config.throttle_mask
    if throttled:
        # Throttling is the GPU protecting itself from heat or power: a reboot does
        # not fix the cooling, so it is reported (logged, counted, alerted on) but
        # drains nothing; its damage shows up as slow steps, not as wrong results.
        reasons = ", ".join(text for bit, text in THROTTLE_REASONS.items() if throttled & bit) or hex(throttled)
        out.append(_finding("GPU_THROTTLED", NodeAction.NONE, f"{name} throttled: {reasons}", name,
                            f"clocks event reasons={gpu.throttle_reasons:#x}"))
    return out


def _check_nvlink(gpu: GpuStatus, before: Optional[GpuStatus], elapsed: float, config: NvmlConfig) -> List[Finding]:
    name = gpu.entity
    out: List[Finding] = []
    # Only a link that was up during this agent run counts as down: unused or
    # never-trained links of a partial topology are not faults. A link that went
    # down needs retraining, i.e. a GPU reset: reboot; if it is down again after
    # the reboot the agent's escalation turns that into replace.
    down = [link.link for link in gpu.nvlinks if link.was_active and not link.active]
    if down:
        out.append(_finding("NVLINK_DOWN", NodeAction.REBOOT, f"{name} NVLink down: link {','.join(map(str, down))}",
                            name, f"nvmlDeviceGetNvLinkState=0 links={down}", component="nvlink"))
    limits = config.nvlink_error_rate_per_min
    over = []
    for (link, counter), grew in sorted(_nvlink_increase(gpu, before).items()):
        rate = grew * 60.0 / elapsed
        if counter in limits and grew >= config.nvlink_min_errors and rate > limits[counter]:
            over.append(f"link {link} {counter} {rate:.0f}/min > {limits[counter]:g}/min")
    if over:
        # A high error rate on a link that stays up points at the link, cable or connector (NVIDIA's
        # catalog: WORKFLOW_NVLINK_ERR), but a counter rate alone is at most a reboot (issue 9, defect 7):
        # the reboot retrains the links, and errors that return after it (same code, same GPU) are
        # escalated to replace.
        out.append(_finding("NVLINK_ERRORS", NodeAction.REBOOT, f"{name} NVLink errors: {'; '.join(over)}", name,
                            f"counter increase over {elapsed:.0f}s", component="nvlink"))
    return out


def _nvlink_increase(gpu: GpuStatus, before: Optional[GpuStatus]) -> Dict[Tuple[int, str], int]:
    """How much each link counter grew since `before`, the same GPU's reading a window ago."""
    if before is None or before.lost or (gpu.uuid and before.uuid and gpu.uuid != before.uuid):
        return {}
    old = {link.link: link.errors for link in before.nvlinks}
    grown: Dict[Tuple[int, str], int] = {}
    for link in gpu.nvlinks:
        for counter, value in link.errors.items():
            previous = old.get(link.link, {}).get(counter)
            # A counter that went down was reset (driver reload) within the window: no rate this time.
            if previous is not None and value >= previous:
                grown[(link.link, counter)] = value - previous
    return grown


# ---- collection ----------------------------------------------------------------------------------


class CallTracker:
    """Runs NVML calls and remembers which one is in flight and since when, so
    another thread can tell a hung driver from a slow pass."""

    def __init__(self) -> None:
        self._current: Optional[Tuple[str, float]] = None

    def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        self._current = (fn.__name__, time.monotonic())
        try:
            return fn(*args)
        finally:
            self._current = None

    def in_flight(self) -> Optional[Tuple[str, float]]:
        """(function name, seconds since it was called), or None when idle."""
        current = self._current
        return (current[0], time.monotonic() - current[1]) if current else None


class NvmlCollector:
    """Reads the GPUs through pynvml; owns the NVML session and the event set (XID, DBE).

    Not thread-safe: one thread (the monitor's NVML thread) does all the calls."""

    def __init__(self, config: NvmlConfig, call: Callable[..., Any], clock: Callable[[], float],
                 on_error: Callable[[NvmlErrorKind], None] = ignore_error) -> None:
        self._config = config
        self._nvml = call
        self._clock = clock
        self._on_error = on_error
        self._closed = False
        self._initialized = False
        self._session_error: Optional[pynvml.NVMLError] = None  # a session-dead answer in the current pass
        self._dead_checks = 0                                    # passes in a row that got one
        self._event_set: Optional[Any] = None
        self._event_gpus: Dict[Optional[int], int] = {}    # handle address -> GPU index
        self._event_tried: Set[int] = set()
        self._identity: Dict[int, Tuple[Optional[str], Optional[str]]] = {}  # index -> (uuid, pci) last seen
        self._known_pci: Set[str] = set()
        self._seen_active: Set[Tuple[int, int]] = set()    # (GPU index, link); kept across re-inits
        self._links: Dict[str, Tuple[int, ...]] = {}       # GPU uuid -> its link indices, from a full probe
        self._logged: Set[str] = set()

    def collect(self) -> NvmlSnapshot:
        """One reading. Raises NVMLError_LibraryNotFound when there is no driver
        library at all; a driver that does not start gives a snapshot with init_error.
        Raises MonitorError once closed: a closed collector never starts a session again."""
        if self._closed:
            raise MonitorError("NVML monitor is closed")
        taken_at = self._clock()
        if not self._initialized:
            try:
                self._start()
            except pynvml.NVMLError_LibraryNotFound:
                raise
            except pynvml.NVMLError as e:
                return NvmlSnapshot(taken_at=taken_at, gpu_count=0, init_error=str(e))
        self._session_error = None
        try:
            return self._read(taken_at)
        finally:
            self._judge_session()

    def _read(self, taken_at: float) -> NvmlSnapshot:
        try:
            count = self._call(pynvml.nvmlDeviceGetCount)
        except pynvml.NVMLError as e:
            raise MonitorError(f"nvmlDeviceGetCount failed: {e}") from e
        gpus, handles = [], {}
        for index in range(count):
            gpu, handle = self._collect_gpu(index)
            gpus.append(gpu)
            if handle is not None:
                handles[index] = handle
        self._register_events(handles)
        present = {gpu.pci_bus_id for gpu in gpus}
        xid_events, dbe_events = self._read_events()
        return NvmlSnapshot(taken_at=taken_at, gpu_count=count, gpus=tuple(gpus), xid_events=xid_events,
                            dbe_events=dbe_events, missing=tuple(sorted(self._known_pci - present)))

    def close(self) -> None:
        """Ends the session for good (see collect)."""
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        if not self._initialized:
            return
        if self._event_set is not None:
            self._quietly(pynvml.nvmlEventSetFree, self._event_set)
            self._event_set = None
        self._quietly(pynvml.nvmlShutdown)
        self._initialized = False
        # Handles, event registrations and the link probe belong to the old session.
        self._event_gpus.clear()
        self._event_tried.clear()
        self._links.clear()

    def _judge_session(self) -> None:
        """After REINIT_AFTER_FAILED_CHECKS passes in a row in which NVML said the
        session is dead, shut it down: the next collect() initialises a new one."""
        error = self._session_error
        if error is None:
            self._dead_checks = 0
            return
        self._dead_checks += 1
        if self._dead_checks < REINIT_AFTER_FAILED_CHECKS:
            return
        log.warning("nvml session dead, re-initialising", error=f"{type(error).__name__}: {error}",
                    failed_checks=self._dead_checks)
        self._dead_checks = 0
        self._shutdown()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Every NVML call of the collector; notes session-dead answers for _judge_session and
        reports each failed call by kind (issue 12)."""
        try:
            return self._nvml(fn, *args)
        except _SESSION_DEAD as e:
            self._session_error = e
            self._on_error(NvmlErrorKind.DRIVER_UNAVAILABLE)
            raise
        except _ANSWERS:
            raise
        except pynvml.NVMLError_LibraryNotFound:
            raise   # counted by check(), which knows whether this node should have GPUs
        except pynvml.NVMLError:
            self._on_error(NvmlErrorKind.ERROR)
            raise

    def _start(self) -> None:
        self._call(pynvml.nvmlInitWithFlags, pynvml.NVML_INIT_FLAG_NO_GPUS)
        self._initialized = True
        try:
            self._event_set = self._call(pynvml.nvmlEventSetCreate)
        except pynvml.NVMLError as e:
            self._log_once("nvml event set unavailable, XIDs come from the kernel log only, no DBE events",
                           error=str(e))

    def _collect_gpu(self, index: int) -> Tuple[GpuStatus, Optional[Any]]:
        try:
            handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
            uuid = self._call(pynvml.nvmlDeviceGetUUID, handle)
            pci = _pci_bus_id(self._call(pynvml.nvmlDeviceGetPciInfo, handle).busId)
            self._identity[index] = (uuid, pci)
            self._known_pci.add(pci)
            return self._read_gpu(index, handle, uuid, pci), handle
        except _LOST as e:
            return self._lost(index, e), None
        except pynvml.NVMLError as e:
            # Without a handle nothing else can be read; say so once, judge nothing.
            self._log_once("nvml cannot read GPU", gpu=index, error=str(e))
            uuid, pci = self._identity.get(index, (None, None))
            return GpuStatus(index=index, uuid=uuid, pci_bus_id=pci), None

    def _lost(self, index: int, error: pynvml.NVMLError) -> GpuStatus:
        uuid, pci = self._identity.get(index, (None, None))  # a lost GPU no longer says who it is
        return GpuStatus(index=index, uuid=uuid, pci_bus_id=pci, lost=True,
                         lost_error=f"{type(error).__name__}: {error}")

    def _read_gpu(self, index: int, handle: Any, uuid: str, pci: str) -> GpuStatus:
        value = self._optional
        remap = value(pynvml.nvmlDeviceGetRemappedRows, handle)
        retired = value(pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)
        return GpuStatus(
            index=index, uuid=uuid, pci_bus_id=pci,
            ecc_dbe_volatile=value(pynvml.nvmlDeviceGetTotalEccErrors, handle,
                                   pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
            remap_pending=bool(remap[2]) if remap else None,
            remap_failure=bool(remap[3]) if remap else None,
            retired_pages_pending=bool(retired) if retired is not None else None,
            nvlinks=self._read_nvlinks(index, uuid, handle) if self._config.nvlink else (),
            throttle_reasons=value(_clocks_event_reasons, handle),
            recovery_action=self._recovery_action(handle),
        )

    def _optional(self, fn: Callable[..., T], *args: Any) -> Optional[T]:
        """A value this GPU or driver may not have: None instead of an error. A
        lost GPU still raises, so the whole GPU is reported lost."""
        try:
            return self._call(fn, *args)
        except _LOST:
            raise
        except _ABSENT:
            return None
        except pynvml.NVMLError as e:
            self._log_once("nvml query failed", call=fn.__name__, error=str(e))
            return None

    def _read_nvlinks(self, index: int, uuid: str, handle: Any) -> Tuple[NvLinkStatus, ...]:
        # Probing every index NVML may have costs one raised NOT_SUPPORTED per missing
        # link on every GPU (18 of 36 on an H100, all 36 on a PCIe GPU), so the links
        # that answered a full probe are remembered and later passes ask only for
        # them; a new session (re-init) probes again.
        known = self._links.get(uuid)
        links: List[NvLinkStatus] = []
        present: List[int] = []
        complete = True
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS) if known is None else known:
            try:
                active = self._call(pynvml.nvmlDeviceGetNvLinkState, handle, link) == pynvml.NVML_FEATURE_ENABLED
            except pynvml.NVMLError_InvalidArgument:
                break  # past the last link this driver knows
            except _LOST:
                raise
            except _ABSENT:
                continue  # a PCIe GPU, or a link this GPU does not have
            except pynvml.NVMLError as e:
                self._log_once("nvml query failed", call="nvmlDeviceGetNvLinkState", error=str(e))
                complete = False  # this link may exist: probe all again next time
                continue
            present.append(link)
            if active:
                self._seen_active.add((index, link))
            errors = {name: self._optional(pynvml.nvmlDeviceGetNvLinkErrorCounter, handle, link, counter)
                      for name, counter in NVLINK_COUNTERS.items()}
            links.append(NvLinkStatus(link=link, active=active, was_active=(index, link) in self._seen_active,
                                      errors={k: v for k, v in errors.items() if v is not None}))
        if known is None and complete:
            self._links[uuid] = tuple(present)
        return tuple(links)

    def _recovery_action(self, handle: Any) -> Optional[int]:
        values = self._optional(pynvml.nvmlDeviceGetFieldValues, handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
        if not values or values[0].nvmlReturn != pynvml.NVML_SUCCESS:
            return None  # drivers before the recovery-action field answer per field
        return int(values[0].value.uiVal)

    def _register_events(self, handles: Dict[int, Any]) -> None:
        if self._event_set is None:
            return
        for index, handle in handles.items():
            if index in self._event_tried:
                continue
            try:
                wanted = self._call(pynvml.nvmlDeviceGetSupportedEventTypes, handle) & EVENT_TYPES
                registered = self._register(handle, wanted)
            except _LOST:
                continue  # try again when it is back
            except pynvml.NVMLError as e:
                self._log_once("nvml events unavailable for GPU", gpu=index, error=str(e))
            else:
                if registered:
                    self._event_gpus[_address(handle)] = index
                if registered != EVENT_TYPES:
                    # Not a fault (no ECC, older driver): those faults then show only in counters/kernel log.
                    self._log_once("nvml events partly unavailable for GPU", gpu=index, registered=hex(registered))
            self._event_tried.add(index)

    def _register(self, handle: Any, types: int) -> int:
        """Registers `types` on the handle; returns the bits that took. NVML fails a
        whole registration when any one type is refused, so on refusal each type is
        tried alone and the GPU keeps whatever subset works."""
        if not types:
            return 0
        try:
            self._call(pynvml.nvmlDeviceRegisterEvents, handle, types, self._event_set)
            return types
        except _ABSENT:
            if types & (types - 1) == 0:
                return 0  # a single type, refused
        registered = 0
        for bit in (pynvml.nvmlEventTypeXidCriticalError, pynvml.nvmlEventTypeDoubleBitEccError):
            if types & bit:
                try:
                    self._call(pynvml.nvmlDeviceRegisterEvents, handle, bit, self._event_set)
                    registered |= bit
                except _ABSENT:
                    pass
        return registered

    def _read_events(self) -> Tuple[Tuple[XidEvent, ...], Tuple[DbeEvent, ...]]:
        if not self._event_gpus:
            return (), ()
        counts: Dict[Tuple[int, int], int] = {}      # (GPU, XID) -> events
        dbe_counts: Dict[int, int] = {}              # GPU -> events: one finding per GPU, the count as evidence
        wait_ms = self._config.event_wait_ms
        for _ in range(self._config.max_events_per_check):
            try:
                data = self._call(pynvml.nvmlEventSetWait_v2, self._event_set, wait_ms)
            except pynvml.NVMLError_Timeout:
                break
            except pynvml.NVMLError as e:
                self._log_once("nvml event wait failed", error=str(e))
                break
            wait_ms = 0  # only drain what is already queued
            gpu = self._event_gpus.get(_address(data.device), -1)
            if data.eventType == pynvml.nvmlEventTypeXidCriticalError:
                key = (gpu, int(data.eventData))
                counts[key] = counts.get(key, 0) + 1
            elif data.eventType == pynvml.nvmlEventTypeDoubleBitEccError:
                dbe_counts[gpu] = dbe_counts.get(gpu, 0) + 1
        return (tuple(XidEvent(gpu_index=gpu, xid=xid, count=n) for (gpu, xid), n in sorted(counts.items())),
                tuple(DbeEvent(gpu_index=gpu, count=n) for gpu, n in sorted(dbe_counts.items())))

    def _quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._call(fn, *args)
        except pynvml.NVMLError as e:
            self._log_once("nvml cleanup failed", call=fn.__name__, error=str(e))

    def _log_once(self, event: str, **kw: Any) -> None:
        key = f"{event}|{sorted(kw.items())}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning(event, **kw)


def _pci_bus_id(raw: Any) -> str:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return normalize_pci_bus_id(text)
    except ValueError:
        return text  # still names the GPU in findings, even if no kernel line will match it


def _clocks_event_reasons(handle: Any) -> int:
    try:
        return pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
    except pynvml.NVMLError_FunctionNotFound:  # drivers before 535 know only the old name
        return pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)


def _address(handle: Any) -> Optional[int]:
    return ctypes.cast(handle, ctypes.c_void_p).value


# ---- the monitor ---------------------------------------------------------------------------------


class _Job:
    def __init__(self, work: Callable[[], Any]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class NvmlThread:
    """One daemon thread that does all NVML work. The caller waits with
    timeouts; a hung call leaves this thread stuck (NVML calls cannot be
    interrupted) and further work is refused until it returns."""

    def __init__(self, tracker: CallTracker, call_timeout: float, pass_timeout: float,
                 on_error: Callable[[NvmlErrorKind], None]) -> None:
        self._tracker = tracker
        self._on_error = on_error  # hears of each timeout (issue 12)
        self._call_timeout = call_timeout
        self._pass_timeout = pass_timeout
        self._jobs: queue.SimpleQueue[Optional[_Job]] = queue.SimpleQueue()
        self._last: Optional[_Job] = None
        self._thread = threading.Thread(target=self._loop, name="hpr-nvml", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._last is not None and not self._last.done.is_set()

    def run(self, work: Callable[[], T]) -> T:
        if self.busy:
            raise self._timeout(f"NVML still hung from an earlier check ({self._describe()}); not calling it again")
        job = self._last = _Job(work)
        self._jobs.put(job)
        started = time.monotonic()
        poll = min(0.05, self._call_timeout / 10)
        while not job.done.wait(poll):
            in_flight = self._tracker.in_flight()
            if in_flight and in_flight[1] > self._call_timeout:
                raise self._timeout(f"NVML call did not return within {self._call_timeout:g}s ({self._describe()})")
            if time.monotonic() - started > self._pass_timeout:
                raise self._timeout(f"NVML pass took longer than {self._pass_timeout:g}s ({self._describe()})")
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        self._jobs.put(None)

    def _timeout(self, message: str) -> MonitorError:
        self._on_error(NvmlErrorKind.TIMEOUT)
        return MonitorError(message)

    def _describe(self) -> str:
        in_flight = self._tracker.in_flight()
        return f"{in_flight[0]} running for {in_flight[1]:.1f}s" if in_flight else "between calls"

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.work()
            except Exception as e:  # handed to the waiting caller
                job.error = e
            finally:
                job.done.set()


class NvmlMonitor:
    """The Monitor for NVIDIA GPUs through NVML (see the module docstring)."""

    name = MONITOR

    def __init__(self, config: Optional[NvmlConfig] = None, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[NvmlErrorKind], None] = ignore_error) -> None:
        """`on_error` hears of every failed NVML call, also from the NVML thread after a check
        gave up waiting on it (the agent counts them, issue 12)."""
        self.config = config or NvmlConfig()
        self._on_error = on_error
        self.disabled_reason: Optional[str] = None
        self.closed = False  # for good: see close()
        self._lock = threading.Lock()  # close() may run on another thread than a late check()
        self._clock = clock
        self.started_at = clock()
        self._tracker = CallTracker()
        self._collector = NvmlCollector(self.config, self._tracker, clock, on_error)
        self._thread: Optional[NvmlThread] = None
        self._previous: Optional[NvmlSnapshot] = None
        self._history = SnapshotHistory(self.config.nvlink_window_seconds)
        self._most_gpus_seen = 0
        if not self.config.enabled:
            self._disable("disabled in configuration")

    @property
    def last_snapshot(self) -> Optional[NvmlSnapshot]:
        """The latest reading, for gpu_for_pci_bus_id (the kernel-log monitor maps XID lines with it)."""
        return self._previous

    def check(self) -> List[Finding]:
        with self._lock:
            if self.closed:  # a disabled monitor is closed too
                return []
            if self._thread is None:
                self._thread = NvmlThread(self._tracker, self.config.call_timeout_seconds,
                                          self.config.pass_timeout_seconds, self._on_error)
            thread = self._thread
        try:
            snapshot = thread.run(self._collector.collect)
        except pynvml.NVMLError_LibraryNotFound:
            if self.config.expected_gpus:
                # A GPU node without its library: an error, and an alert (issue 12 review). A CPU
                # node without one is normal and not counted, or every CPU node would alert.
                self._on_error(NvmlErrorKind.LIBRARY_MISSING)
            self._disable("libnvidia-ml.so.1 not found (no NVIDIA driver on this node)")
            return []
        except MonitorError:
            if self.closed:
                return []  # closed while this check ran: the collector refused to start again
            raise
        now = self._clock()
        in_grace = now - self.started_at < self.config.startup_grace_seconds
        if snapshot.gpu_count == 0 and not self.config.expected_gpus:
            # Nothing to watch; during the grace period the driver may still be loading.
            if not in_grace:
                self._disable(f"no NVIDIA GPUs ({snapshot.init_error or 'NVML reports 0 devices'})")
            return []
        self._most_gpus_seen = max(self._most_gpus_seen, snapshot.gpu_count)
        config = self.config
        if config.expected_gpus is None:
            # Not configured: the most GPUs seen since start, so a GPU that drops out is
            # noticed; one missing from the first reading on needs expected_gpus.
            config = replace(config, expected_gpus=self._most_gpus_seen)
        findings = evaluate(snapshot, self._history.snapshots, config, now, self.started_at)
        self._previous = snapshot
        self._history.add(snapshot)
        return findings

    def close(self) -> None:
        """Shuts NVML down for good. A check() after it returns [] without starting a
        thread or calling NVML: the agent's monitor thread may outlive a reload's join
        timeout and call this monitor once more."""
        with self._lock:
            self.closed = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        if thread.busy:
            log.warning("nvml thread still hung at close; leaving it behind")
        else:
            try:
                thread.run(self._collector.close)
            except MonitorError as e:
                log.warning("nvml shutdown hung", error=str(e))
        thread.stop()

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        if self.config.expected_gpus:
            log.warning("nvml monitor disabled", reason=reason, expected_gpus=self.config.expected_gpus)
        else:
            log.info("nvml monitor disabled", reason=reason)
        self.close()
