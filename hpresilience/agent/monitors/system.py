"""The system monitor: InfiniBand/EFA/RoCE ports, filesystems, memory and EDAC, read from sysfs and procfs.

Collection (`collect`) reads small files only: one attribute per port, one
mount table, /proc/meminfo, two EDAC counters per memory controller. Evaluation
(`evaluate`) is a pure function of the new snapshot, the earlier ones and the
configuration, so every rule is tested with plain data.

Counters are judged by how much they grew, never by their value: a port's
`link_downed` that reached 7 last year is history, not a fault (NVSentinel
treated lifetime counters as current faults). How each finding clears:

- IB_PORT_DOWN / IB_PORT_MISSING: the port is ACTIVE again (or back in sysfs).
- IB_LINK_FLAPPING, EDAC_CE_RATE: the increments age out of their window.
- EDAC_UE: a new boot (the monitor's first pass is its reference).
- FS_*, MEMORY_*: the condition is gone on the next pass.

One outside event must not fail every node it touches (issue 9, defect 8): a
leaf switch reboot downs the ports of all nodes behind it, a file server down at
boot leaves its mount missing on every client. Port state and missing mounts
therefore count only once they persist well beyond such an event
(`ib_port_down_seconds`, `mount_missing_seconds`, 10 min each), and flapping
needs more link-downs than a switch reboot causes. A hung mount (FS_UNRESPONSIVE)
and a full one are reported without an action.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import structlog

from ...finding import Finding, NodeAction
from ..monitor import MonitorError

log = structlog.get_logger(__name__)

MONITOR = "system"
GIB = 1024 ** 3
# A sysfs attribute is one short line; a bounded read keeps a misbehaving driver from flooding memory.
ATTR_MAX_BYTES = 4096
# Bounds memory if counters change on every pass for a whole window (a correctable-error storm).
HISTORY_LIMIT = 4096


@dataclass
class SystemConfig:
    enabled: bool = True
    sysfs_root: str = "/"                       # tests point these at a fake tree
    proc_root: str = "/"
    # Ports that must be ACTIVE, as "device/port" ("mlx5_0/1", "efa_0/1"). None: the ports that were ACTIVE
    # at the monitor's first pass, so unused ports are never flagged but a port already down at start is
    # missed: list the ports to catch that.
    ib_expected_ports: Optional[List[str]] = None
    # A port's state has outside causes: a leaf switch that reboots (minutes) takes down the port of every
    # node behind it, so only a port down well beyond that is this node's fault (issue 9, defect 8).
    ib_port_down_seconds: float = 600.0         # not ACTIVE (or gone from sysfs) this long
    ib_link_downed_count: int = 5               # link_downed grew by this much ... (a switch reboot costs 1-3)
    ib_link_downed_window_seconds: float = 600.0  # ... within this: flapping
    # Mount points that must be mounted and read-write; they are also the ones checked for space.
    writable_mounts: List[str] = field(default_factory=lambda: ["/"])
    # Missing this long: a network filesystem whose server was down at boot is mounted late on every
    # client at once, which is no node's fault (issue 9, defect 8).
    mount_missing_seconds: float = 600.0
    full_threshold_percent: float = 98.0        # used >= this: FS_FULL
    statvfs_timeout_seconds: float = 5.0        # a hung NFS/Lustre mount never answers
    # MemTotal of a healthy node of this type, in GiB (what /proc/meminfo shows, a little under the DIMM sum).
    expected_memory_gib: Optional[float] = None
    memory_tolerance_percent: float = 2.0
    memory_available_min_percent: float = 5.0   # MemAvailable below this share of MemTotal: MEMORY_LOW
    edac_ce_count: int = 100                    # correctable errors grew by this much ...
    edac_ce_window_seconds: float = 3600.0      # ... within this: EDAC_CE_RATE

    def validate(self) -> None:
        for name in ("full_threshold_percent", "memory_tolerance_percent", "memory_available_min_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be between 0 and 100")
        if self.ib_link_downed_count < 1 or self.edac_ce_count < 1:
            raise ValueError("ib_link_downed_count and edac_ce_count must be >= 1")
        if min(self.ib_link_downed_window_seconds, self.edac_ce_window_seconds, self.statvfs_timeout_seconds) <= 0:
            raise ValueError("windows and statvfs_timeout_seconds must be > 0")
        if min(self.ib_port_down_seconds, self.mount_missing_seconds) < 0:
            raise ValueError("ib_port_down_seconds and mount_missing_seconds must be >= 0")
        if self.expected_memory_gib is not None and self.expected_memory_gib <= 0:
            raise ValueError("expected_memory_gib must be > 0")
        for port in self.ib_expected_ports or []:
            device, _, number = port.partition("/")
            if not device or not number.isdigit():
                raise ValueError(f"ib_expected_ports: {port!r} is not 'device/port', e.g. 'mlx5_0/1'")
        for mount in self.writable_mounts:
            if not mount.startswith("/"):
                raise ValueError(f"writable_mounts: {mount!r} is not an absolute path")

    @property
    def history_seconds(self) -> float:
        """How far back `evaluate` looks."""
        return max(self.ib_port_down_seconds, self.ib_link_downed_window_seconds, self.edac_ce_window_seconds,
                   self.mount_missing_seconds)


# ------------------------------------------------------------------ snapshot


@dataclass(frozen=True)
class PortSample:
    device: str
    port: str
    state: Optional[str]        # "ACTIVE", "DOWN", "INIT", ...: the name after "4: "; None if unreadable
    phys_state: Optional[str]   # "LinkUp", "Disabled", "Polling", ...
    link_layer: Optional[str]   # "InfiniBand", "Ethernet" (RoCE), "Unspecified" (EFA)
    link_downed: Optional[int]  # None where the device has no such counter (EFA) or it was unreadable

    @property
    def entity(self) -> str:
        return f"{self.device} port {self.port}"


@dataclass(frozen=True)
class MountSample:
    mount_point: str
    source: str
    fs_type: str
    read_only: bool
    used_percent: Optional[float]  # None if statvfs failed or the filesystem has no blocks
    unresponsive: bool = False     # statvfs gave no answer within statvfs_timeout_seconds


@dataclass(frozen=True)
class MemorySample:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class EdacSample:
    ce_count: Optional[int]
    ue_count: Optional[int]


@dataclass(frozen=True)
class SystemSnapshot:
    taken_at: float
    # "mlx5_0/1" -> sample; None if /sys/class/infiniband could not be listed (empty: no RDMA devices).
    ports: Optional[Dict[str, PortSample]] = field(default_factory=dict)
    unreadable_devices: FrozenSet[str] = frozenset()  # devices whose ports could not be listed
    mounts: Optional[Dict[str, MountSample]] = None   # configured mount points found; None: table unreadable
    memory: Optional[MemorySample] = None
    edac: Dict[str, EdacSample] = field(default_factory=dict)  # "mc0" -> counters
    errors: Tuple[str, ...] = ()                       # what could not be read, one line each

    @property
    def read_nothing(self) -> bool:
        return not self.ports and not self.edac and self.mounts is None and self.memory is None

    def history_key(self) -> Tuple[object, ...]:
        """The readings `evaluate` compares across passes: the monitor keeps a snapshot only when they change."""
        ports = None if self.ports is None else sorted((n, p.state, p.link_downed) for n, p in self.ports.items())
        edac = sorted((mc, e.ce_count, e.ue_count) for mc, e in self.edac.items())
        mounted = None if self.mounts is None else sorted(self.mounts)
        return (ports, sorted(self.unreadable_devices), edac, mounted)


# ---------------------------------------------------------------- collection


class StatvfsProbe:
    """os.statvfs with a time bound.

    statvfs on a hung NFS/Lustre hard mount blocks in the kernel, uninterruptibly,
    until the server answers. It runs in a daemon thread (a ThreadPoolExecutor's
    workers are joined at exit, so a stuck one would keep the agent from exiting),
    and a mount whose call is still stuck is not asked again, so threads never pile up."""

    def __init__(self, timeout_seconds: float, statvfs: Callable[[str], os.statvfs_result] = os.statvfs):
        self._timeout = timeout_seconds
        self._statvfs = statvfs
        self._stuck: Dict[str, threading.Thread] = {}

    def used_percent(self, path: str) -> Optional[float]:
        """Used share as df computes it (blocks reserved for root count as unavailable).
        Raises TimeoutError when no answer came in time, OSError when statvfs failed."""
        stuck = self._stuck.get(path)
        if stuck is not None and stuck.is_alive():
            raise TimeoutError(path)
        self._stuck.pop(path, None)
        result: List[Union[os.statvfs_result, OSError]] = []
        thread = threading.Thread(target=self._call, args=(path, result), name=f"statvfs {path}", daemon=True)
        thread.start()
        thread.join(self._timeout)
        if thread.is_alive():
            self._stuck[path] = thread
            raise TimeoutError(path)
        outcome = result[0]
        if isinstance(outcome, OSError):
            raise outcome
        used = outcome.f_blocks - outcome.f_bfree
        usable = used + outcome.f_bavail
        return 100.0 * used / usable if usable > 0 else None

    def _call(self, path: str, result: List[Union[os.statvfs_result, OSError]]) -> None:
        try:
            result.append(self._statvfs(path))
        except OSError as e:
            result.append(e)


def collect(config: SystemConfig, now: Optional[float] = None, statvfs: Optional[StatvfsProbe] = None
            ) -> SystemSnapshot:
    """Read everything once. A file that cannot be read leaves its value None and adds a line to `errors`:
    one broken device never hides the others."""
    errors: List[str] = []
    ports, unreadable = _collect_ports(config, errors)
    probe = statvfs or StatvfsProbe(config.statvfs_timeout_seconds)
    return SystemSnapshot(
        taken_at=time.time() if now is None else now,
        ports=ports,
        unreadable_devices=unreadable,
        mounts=_collect_mounts(config, probe, errors),
        memory=_collect_memory(config, errors),
        edac=_collect_edac(config, errors),
        errors=tuple(errors),
    )


def _read_attr(path: str, errors: List[str], required: bool = True) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read(ATTR_MAX_BYTES).decode("ascii", "replace").strip()
    except FileNotFoundError:
        if required:
            errors.append(f"{path}: missing")
    except OSError as e:
        errors.append(f"{path}: {e.strerror or e}")
    return None


def _read_counter(path: str, errors: List[str], required: bool = True) -> Optional[int]:
    text = _read_attr(path, errors, required)
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        errors.append(f"{path}: not a number: {text[:40]!r}")
        return None


def _named_state(text: Optional[str]) -> Optional[str]:
    """'4: ACTIVE' -> 'ACTIVE': the kernel prints the enum's number and name; the name is what we compare."""
    return None if text is None else text.split(":", 1)[-1].strip()


def _collect_ports(config: SystemConfig, errors: List[str]
                   ) -> Tuple[Optional[Dict[str, PortSample]], FrozenSet[str]]:
    base = os.path.join(config.sysfs_root, "sys/class/infiniband")
    try:
        devices = sorted(os.listdir(base))
    except FileNotFoundError:
        return {}, frozenset()  # no RDMA driver loaded: nothing to check
    except OSError as e:
        errors.append(f"{base}: {e.strerror or e}")
        return None, frozenset()
    ports: Dict[str, PortSample] = {}
    unreadable = set()
    for device in devices:
        ports_dir = os.path.join(base, device, "ports")
        try:
            numbers = sorted(os.listdir(ports_dir), key=lambda n: (len(n), n))
        except FileNotFoundError:
            continue  # unplugged between the two listings
        except OSError as e:
            errors.append(f"{ports_dir}: {e.strerror or e}")
            unreadable.add(device)
            continue
        for number in numbers:
            port_dir = os.path.join(ports_dir, number)
            ports[f"{device}/{number}"] = PortSample(
                device=device,
                port=number,
                state=_named_state(_read_attr(os.path.join(port_dir, "state"), errors)),
                phys_state=_named_state(_read_attr(os.path.join(port_dir, "phys_state"), errors, required=False)),
                link_layer=_read_attr(os.path.join(port_dir, "link_layer"), errors, required=False),
                # EFA has no counters/ directory. The IB counter is 8 bits and saturates at 255, so a
                # saturated port shows no new flaps; its state is still checked.
                link_downed=_read_counter(os.path.join(port_dir, "counters/link_downed"), errors, required=False),
            )
    return ports, frozenset(unreadable)


_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mount(field_text: str) -> str:
    """/proc/*/mounts writes a space in a path as \\040."""
    return _MOUNT_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_text)


def _collect_mounts(config: SystemConfig, probe: StatvfsProbe, errors: List[str]
                    ) -> Optional[Dict[str, MountSample]]:
    # PID 1's table, not our own: a hardened unit (systemd ProtectSystem=) sees "/" read-only in its private
    # namespace, which would read as a read-only root on every node.
    path = os.path.join(config.proc_root, "proc/1/mounts")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        errors.append(f"{path}: {e.strerror or e}")
        return None
    table: Dict[str, List[str]] = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 4:
            table[_unescape_mount(fields[1])] = fields  # the last mount on a point is the one in effect
    mounts: Dict[str, MountSample] = {}
    for mount_point in sorted({os.path.normpath(m) for m in config.writable_mounts}):
        entry = table.get(mount_point)
        if entry is None:
            continue
        used: Optional[float] = None
        unresponsive = False
        try:
            used = probe.used_percent(mount_point)
        except TimeoutError:
            unresponsive = True
        except OSError as e:
            errors.append(f"statvfs {mount_point}: {e.strerror or e}")
        mounts[mount_point] = MountSample(
            mount_point=mount_point,
            source=_unescape_mount(entry[0]),
            fs_type=entry[2],
            read_only="ro" in entry[3].split(","),
            used_percent=used,
            unresponsive=unresponsive,
        )
    return mounts


def _collect_memory(config: SystemConfig, errors: List[str]) -> Optional[MemorySample]:
    path = os.path.join(config.proc_root, "proc/meminfo")
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        errors.append(f"{path}: {e.strerror or e}")
        return None
    values: Dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            try:
                values[key] = int(rest.split()[0]) * 1024  # meminfo counts kB
            except (IndexError, ValueError):
                break
    if len(values) != 2:
        errors.append(f"{path}: no readable MemTotal and MemAvailable")
        return None
    return MemorySample(total_bytes=values["MemTotal"], available_bytes=values["MemAvailable"])


def _collect_edac(config: SystemConfig, errors: List[str]) -> Dict[str, EdacSample]:
    base = os.path.join(config.sysfs_root, "sys/devices/system/edac/mc")
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return {}  # no EDAC driver for this platform
    except OSError as e:
        errors.append(f"{base}: {e.strerror or e}")
        return {}
    return {
        name: EdacSample(
            ce_count=_read_counter(os.path.join(base, name, "ce_count"), errors),
            ue_count=_read_counter(os.path.join(base, name, "ue_count"), errors),
        )
        for name in sorted(names, key=lambda n: (len(n), n))
        if re.fullmatch(r"mc\d+", name)
    }


# ---------------------------------------------------------------- evaluation


def evaluate(snapshot: SystemSnapshot, previous: Sequence[SystemSnapshot], config: SystemConfig,
             now: float) -> List[Finding]:
    """What is wrong now.

    `previous` holds earlier snapshots, oldest first; previous[0] is the monitor's
    first pass (the reference for expected ports and EDAC UE). It may skip passes
    in which no port or EDAC reading changed: the value at a time is read from the
    latest snapshot taken at or before it."""
    return (_check_ports(snapshot, previous, config, now)
            + _check_mounts(snapshot, previous, config, now)
            + _check_memory(snapshot, config, now)
            + _check_edac(snapshot, previous, config, now))


def _finding(code: str, action: NodeAction, component: str, entity: Optional[str], message: str, evidence: str,
             now: float) -> Finding:
    return Finding(monitor=MONITOR, code=code, action=action, message=message, component=component,
                   entity=entity, evidence=evidence, observed_at=now)


def _value_at(previous: Sequence[SystemSnapshot], at: float, read: Callable[[SystemSnapshot], Optional[int]]
              ) -> Optional[int]:
    """A counter's value at time `at`: from the latest snapshot taken at or before it, or, if the monitor has
    not run that long, from its earliest reading (so the window is as long as the monitor's life)."""
    chosen: Optional[int] = None
    for earlier in previous:
        value = read(earlier)
        if value is None:
            continue
        if chosen is not None and earlier.taken_at > at:
            break
        chosen = value
    return chosen


def _increase(reference: int, current: int) -> int:
    # A driver reload restarts counters from zero: everything counted since then is new.
    return current - reference if current >= reference else current


def _expected_ports(snapshot: SystemSnapshot, previous: Sequence[SystemSnapshot], config: SystemConfig
                    ) -> List[str]:
    if config.ib_expected_ports is not None:
        return list(config.ib_expected_ports)
    first = previous[0] if previous else snapshot
    return sorted(name for name, port in (first.ports or {}).items() if port.state == "ACTIVE")


def _port_down(snapshot: SystemSnapshot, name: str) -> Optional[bool]:
    """True: not ACTIVE or gone; False: ACTIVE; None: could not tell."""
    if snapshot.ports is None or name.partition("/")[0] in snapshot.unreadable_devices:
        return None
    port = snapshot.ports.get(name)
    if port is None:
        return True
    if port.state is None:
        return None
    return port.state != "ACTIVE"


def _mount_missing(snapshot: SystemSnapshot, mount_point: str) -> Optional[bool]:
    """True: not mounted; False: mounted; None: the mount table could not be read."""
    return None if snapshot.mounts is None else mount_point not in snapshot.mounts


def _bad_since(snapshots: Sequence[SystemSnapshot], bad: Callable[[SystemSnapshot], Optional[bool]]
               ) -> Optional[float]:
    """When the current run of readings in which `bad` holds began; None if it does not hold now.
    A reading that could not tell (None) ends the run: the time restarts after it."""
    since = None
    for snapshot in reversed(snapshots):
        if not bad(snapshot):
            break
        since = snapshot.taken_at
    return since


def _check_ports(snapshot: SystemSnapshot, previous: Sequence[SystemSnapshot], config: SystemConfig,
                 now: float) -> List[Finding]:
    if snapshot.ports is None:
        return []
    findings = []
    for name in _expected_ports(snapshot, previous, config):
        since = _bad_since([*previous, snapshot], lambda s, n=name: _port_down(s, n))
        if since is None or now - since < config.ib_port_down_seconds:
            continue
        device, _, number = name.partition("/")
        entity = f"{device} port {number}"
        port = snapshot.ports.get(name)
        if port is None:
            findings.append(_finding("IB_PORT_MISSING", NodeAction.REBOOT, "nic", entity,
                                     f"{entity} is gone", f"no {name} in /sys/class/infiniband for {now - since:.0f}s",
                                     now))
            continue
        findings.append(_finding(
            "IB_PORT_DOWN", NodeAction.REBOOT, "nic", entity,
            f"{entity} is {port.state} ({port.phys_state or 'phys state unknown'})",
            f"state={port.state} phys_state={port.phys_state} link_layer={port.link_layer} "
            f"for {now - since:.0f}s", now))
    window = config.ib_link_downed_window_seconds
    for name, port in sorted(snapshot.ports.items()):
        if port.link_downed is None:
            continue
        reference = _value_at(previous, now - window, lambda s, n=name: _link_downed(s, n))
        if reference is None:
            continue
        grew = _increase(reference, port.link_downed)
        if grew >= config.ib_link_downed_count:
            findings.append(_finding(
                "IB_LINK_FLAPPING", NodeAction.REBOOT, "nic", port.entity,
                f"{port.entity} went down {grew} times in {window:.0f}s",
                f"link_downed {reference} -> {port.link_downed} within {window:.0f}s, state={port.state}", now))
    return findings


def _link_downed(snapshot: SystemSnapshot, name: str) -> Optional[int]:
    port = (snapshot.ports or {}).get(name)
    return None if port is None else port.link_downed


def _check_mounts(snapshot: SystemSnapshot, previous: Sequence[SystemSnapshot], config: SystemConfig,
                  now: float) -> List[Finding]:
    if snapshot.mounts is None:
        return []  # the table could not be read: say nothing rather than call every mount missing
    findings = []
    for mount_point in sorted({os.path.normpath(m) for m in config.writable_mounts}):
        mount = snapshot.mounts.get(mount_point)
        if mount is None:
            since = _bad_since([*previous, snapshot], lambda s, m=mount_point: _mount_missing(s, m))
            if since is not None and now - since >= config.mount_missing_seconds:
                # A reboot mounts fstab again; jobs meanwhile would write to the disk underneath.
                findings.append(_finding("FS_MISSING", NodeAction.REBOOT, "filesystem", mount_point,
                                         f"{mount_point} is not mounted",
                                         f"not in /proc/1/mounts for {now - since:.0f}s", now))
            continue
        evidence = f"{mount.source} on {mount_point} type {mount.fs_type}"
        if mount.read_only:
            # ext4/xfs remount read-only after an I/O error or corruption; it does not undo itself.
            findings.append(_finding("FS_READ_ONLY", NodeAction.REBOOT, "filesystem", mount_point,
                                     f"{mount_point} is read-only", f"{evidence} (ro)", now))
        if mount.unresponsive:
            # Usually the file server, not this node: a reboot per client would drain the cluster.
            findings.append(_finding("FS_UNRESPONSIVE", NodeAction.NONE, "filesystem", mount_point,
                                     f"{mount_point} does not answer",
                                     f"{evidence}: statvfs gave no answer within {config.statvfs_timeout_seconds:g}s",
                                     now))
        elif mount.used_percent is not None and mount.used_percent >= config.full_threshold_percent:
            # A full disk is a job's output or logs; a reboot frees none of it and the node is not broken.
            findings.append(_finding("FS_FULL", NodeAction.NONE, "filesystem", mount_point,
                                     f"{mount_point} is {mount.used_percent:.0f}% full",
                                     f"{evidence}: {mount.used_percent:.1f}% used", now))
    return findings


def _check_memory(snapshot: SystemSnapshot, config: SystemConfig, now: float) -> List[Finding]:
    memory = snapshot.memory
    if memory is None:
        return []
    findings = []
    total_gib = memory.total_bytes / GIB
    if config.expected_memory_gib is not None:
        floor = config.expected_memory_gib * (1 - config.memory_tolerance_percent / 100)
        if total_gib < floor:
            # Memory the firmware did not bring up is a failed DIMM or slot: hardware, not fixed by a reboot.
            findings.append(_finding(
                "MEMORY_MISSING", NodeAction.REPLACE, "memory", None,
                f"{total_gib:.0f} GiB of memory, expected {config.expected_memory_gib:g} GiB",
                f"MemTotal {memory.total_bytes // 1024} kB < {floor:.1f} GiB", now))
    if memory.available_bytes < memory.total_bytes * config.memory_available_min_percent / 100:
        # Usually a job using what it was given; the kernel's OOM findings say when it becomes a fault.
        findings.append(_finding(
            "MEMORY_LOW", NodeAction.NONE, "memory", None,
            f"{memory.available_bytes / GIB:.1f} GiB of {total_gib:.0f} GiB memory available",
            f"MemAvailable {memory.available_bytes // 1024} kB, MemTotal {memory.total_bytes // 1024} kB", now))
    return findings


def _check_edac(snapshot: SystemSnapshot, previous: Sequence[SystemSnapshot], config: SystemConfig,
                now: float) -> List[Finding]:
    findings = []
    window = config.edac_ce_window_seconds
    for mc, counts in sorted(snapshot.edac.items()):
        if counts.ue_count is not None:
            # Since the first pass, not within a window: an uncorrectable error stays a fault until the node
            # is rebooted or replaced.
            reference = _value_at(previous, float("-inf"), lambda s, m=mc: _edac(s, m).ue_count)
            if reference is not None and _increase(reference, counts.ue_count) > 0:
                findings.append(_finding(
                    "EDAC_UE", NodeAction.REPLACE, "memory", mc,
                    f"uncorrectable memory error on {mc}",
                    f"{mc} ue_count {reference} -> {counts.ue_count}", now))
        if counts.ce_count is not None:
            reference = _value_at(previous, now - window, lambda s, m=mc: _edac(s, m).ce_count)
            grew = 0 if reference is None else _increase(reference, counts.ce_count)
            if grew >= config.edac_ce_count:
                # Corrected errors cost nothing yet; a rising rate is an early warning for the admin.
                findings.append(_finding(
                    "EDAC_CE_RATE", NodeAction.NONE, "memory", mc,
                    f"{grew} corrected memory errors on {mc} in {window:.0f}s",
                    f"{mc} ce_count {reference} -> {counts.ce_count} within {window:.0f}s", now))
    return findings


def _edac(snapshot: SystemSnapshot, mc: str) -> EdacSample:
    return snapshot.edac.get(mc) or EdacSample(None, None)


# ------------------------------------------------------------------- monitor


class SystemMonitor:
    """The Monitor for ports, filesystems, memory and EDAC; keeps the earlier snapshots rates need."""

    name = MONITOR

    def __init__(self, config: SystemConfig, clock: Callable[[], float] = time.time):
        self.config = config
        self._clock = clock
        self._statvfs = StatvfsProbe(config.statvfs_timeout_seconds)
        self._first: Optional[SystemSnapshot] = None
        self._history: List[SystemSnapshot] = []  # after the first pass, only those whose readings changed
        self._findings: Dict[str, Finding] = {}
        self._errors: FrozenSet[str] = frozenset()

    def check(self) -> List[Finding]:
        if not self.config.enabled:
            return []
        now = self._clock()
        snapshot = collect(self.config, now, self._statvfs)
        self._log_errors(snapshot)
        if snapshot.read_nothing:
            raise MonitorError("system monitor could read nothing: " + "; ".join(snapshot.errors))
        previous = ([self._first] if self._first else []) + self._history
        findings = evaluate(snapshot, previous, self.config, now)
        self._remember(snapshot, now)
        self._log_findings(findings)
        return findings

    def close(self) -> None:
        # A statvfs thread stuck on a dead mount cannot be stopped; it is a daemon thread and dies with us.
        self._first = None
        self._history.clear()

    def _remember(self, snapshot: SystemSnapshot, now: float) -> None:
        if self._first is None:
            self._first = snapshot
            if snapshot.ports or self.config.ib_expected_ports:
                log.info("system.expected_ports", ports=_expected_ports(snapshot, [], self.config))
            return
        last = self._history[-1] if self._history else self._first
        if snapshot.history_key() != last.history_key():
            self._history.append(snapshot)
        # The latest snapshot before the horizon still gives the values at the horizon; older ones are spent.
        horizon = now - self.config.history_seconds
        while len(self._history) >= 2 and self._history[1].taken_at <= horizon:
            self._history.pop(0)
        del self._history[:-HISTORY_LIMIT]

    def _log_errors(self, snapshot: SystemSnapshot) -> None:
        errors = frozenset(snapshot.errors)
        for error in sorted(errors - self._errors):
            log.warning("system.read_failed", error=error)
        for error in sorted(self._errors - errors):
            log.info("system.read_recovered", error=error)
        self._errors = errors

    def _log_findings(self, findings: List[Finding]) -> None:
        current = {f.key: f for f in findings}
        for key in sorted(current.keys() - self._findings.keys()):
            f = current[key]
            log.warning("system.finding", code=f.code, entity=f.entity, action=f.action.value, message=f.message,
                        evidence=f.evidence)
        for key in sorted(self._findings.keys() - current.keys()):
            log.info("system.finding_cleared", code=self._findings[key].code, entity=self._findings[key].entity)
        self._findings = current
