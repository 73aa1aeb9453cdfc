import os
import threading
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import pytest
from structlog.testing import capture_logs

from hpresilience.agent.monitor import Monitor, MonitorError
from hpresilience.agent.monitors.system import (
    GIB,
    EdacSample,
    MemorySample,
    MountSample,
    PortSample,
    StatvfsProbe,
    SystemConfig,
    SystemMonitor,
    SystemSnapshot,
    collect,
    evaluate,
)
from hpresilience.finding import NodeAction

T0 = 1_700_000_000.0
NONE, REBOOT, REPLACE = NodeAction.NONE, NodeAction.REBOOT, NodeAction.REPLACE


# ------------------------------------------------------------- evaluate, table-driven


def port(state: Optional[str] = "ACTIVE", link_downed: Optional[int] = 0, name: str = "mlx5_0/1",
         phys: str = "LinkUp") -> Tuple[str, PortSample]:
    device, _, number = name.partition("/")
    return name, PortSample(device, number, state, phys, "InfiniBand", link_downed)


def ports(*samples: Tuple[str, PortSample]) -> Dict[str, PortSample]:
    return dict(samples)


def mount(mount_point: str, read_only: bool = False, used: Optional[float] = 40.0,
          unresponsive: bool = False) -> Tuple[str, MountSample]:
    return mount_point, MountSample(mount_point, "/dev/sda1", "ext4", read_only, used, unresponsive)


def snap(at: float, **fields) -> SystemSnapshot:
    return SystemSnapshot(taken_at=T0 + at, **fields)


def edac(**controllers: Tuple[Optional[int], Optional[int]]) -> Dict[str, EdacSample]:
    return {mc: EdacSample(ce_count=ce, ue_count=ue) for mc, (ce, ue) in controllers.items()}


class Case(NamedTuple):
    previous: List[SystemSnapshot]
    current: SystemSnapshot
    expected: Set[Tuple[str, Optional[str], NodeAction]]
    config: Dict[str, object] = {}


UP, DOWN = ports(port()), ports(port("DOWN", phys="Disabled"))
TWO_UP = ports(port(), port(name="mlx5_1/1"))

CASES = {
    "ports all active": Case([snap(0, ports=TWO_UP)], snap(60, ports=TWO_UP), set()),
    "expected port down past the grace": Case(
        [snap(0, ports=UP), snap(10, ports=DOWN)], snap(610, ports=DOWN),
        {("IB_PORT_DOWN", "mlx5_0 port 1", REBOOT)}),
    "down shorter than the grace (link retrain)": Case(
        [snap(0, ports=UP), snap(30, ports=DOWN)], snap(45, ports=DOWN), set()),
    # Issue 9, defect 8: a leaf switch reboot downs the port of every node behind it for
    # a minute or more; the old 30 s grace rebooted them all.
    "down through a leaf switch reboot": Case(
        [snap(0, ports=UP), snap(10, ports=DOWN)], snap(190, ports=DOWN), set()),
    "INIT is not ACTIVE": Case(
        [snap(0, ports=UP), snap(5, ports=ports(port("INIT")))], snap(700, ports=ports(port("INIT"))),
        {("IB_PORT_DOWN", "mlx5_0 port 1", REBOOT)}),
    "unused port, down since the first pass": Case([snap(0, ports=DOWN)], snap(600, ports=DOWN), set()),
    "configured port, down since the first pass": Case(
        [snap(0, ports=DOWN)], snap(600, ports=DOWN), {("IB_PORT_DOWN", "mlx5_0 port 1", REBOOT)},
        {"ib_expected_ports": ["mlx5_0/1"]}),
    "configured port never seen": Case(
        [snap(0, ports=UP)], snap(600, ports=UP), {("IB_PORT_MISSING", "mlx5_1 port 1", REBOOT)},
        {"ib_expected_ports": ["mlx5_0/1", "mlx5_1/1"]}),
    "port gone from sysfs": Case(
        [snap(0, ports=TWO_UP), snap(10, ports=UP)], snap(610, ports=UP),
        {("IB_PORT_MISSING", "mlx5_1 port 1", REBOOT)}),
    "port gone from sysfs for a moment (driver reset)": Case(
        [snap(0, ports=TWO_UP), snap(10, ports=UP)], snap(60, ports=UP), set()),
    "down is timed from the first pass that saw it": Case([snap(0, ports=UP)], snap(600, ports=DOWN), set()),
    "unlistable device is unknown, not missing": Case(
        [snap(0, ports=TWO_UP)], snap(60, ports=UP, unreadable_devices=frozenset({"mlx5_1"})), set()),
    "unlistable class directory": Case([snap(0, ports=TWO_UP)], snap(60, ports=None), set()),
    "unreadable state is unknown": Case([snap(0, ports=UP)], snap(60, ports=ports(port(None))), set()),
    "an unknown reading restarts the grace": Case(
        [snap(0, ports=UP), snap(10, ports=DOWN), snap(640, ports=ports(port(None)))], snap(650, ports=DOWN),
        set()),
    "no grace configured": Case(
        [snap(0, ports=UP)], snap(1, ports=DOWN), {("IB_PORT_DOWN", "mlx5_0 port 1", REBOOT)},
        {"ib_port_down_seconds": 0}),
    "old lifetime link_downed is history": Case(
        [snap(0, ports=ports(port(link_downed=7)))], snap(3000, ports=ports(port(link_downed=7))), set()),
    "link_downed grows within the window": Case(
        [snap(0, ports=ports(port(link_downed=7))), snap(100, ports=ports(port(link_downed=9)))],
        snap(200, ports=ports(port(link_downed=12))), {("IB_LINK_FLAPPING", "mlx5_0 port 1", REBOOT)}),
    "a single link down is no flapping": Case(
        [snap(0, ports=ports(port(link_downed=7)))], snap(200, ports=ports(port(link_downed=8))), set()),
    # Issue 9, defect 8: a switch reboot downs the link once or twice as the switch comes up.
    "a switch reboot's link downs are no flapping": Case(
        [snap(0, ports=ports(port(link_downed=7))), snap(100, ports=ports(port(link_downed=9)))],
        snap(200, ports=ports(port(link_downed=10))), set()),
    "increments older than the window": Case(
        [snap(0, ports=ports(port(link_downed=0))), snap(100, ports=ports(port(link_downed=5)))],
        snap(1000, ports=ports(port(link_downed=5))), set()),
    "window straddles the increments": Case(
        [snap(0, ports=ports(port(link_downed=0))), snap(100, ports=ports(port(link_downed=3))),
         snap(500, ports=ports(port(link_downed=5)))],
        snap(750, ports=ports(port(link_downed=5))), set()),
    "counter restarted by a driver reload": Case(
        [snap(0, ports=ports(port(link_downed=200)))], snap(100, ports=ports(port(link_downed=5))),
        {("IB_LINK_FLAPPING", "mlx5_0 port 1", REBOOT)}),
    "EFA port has no link_downed": Case(
        [snap(0, ports=ports(port(link_downed=None, name="efa_0/1")))],
        snap(100, ports=ports(port(link_downed=None, name="efa_0/1"))), set()),
    "first pass has no rates": Case([], snap(0, ports=ports(port(link_downed=50))), set()),
    "writable mounts fine": Case(
        [], snap(0, mounts=dict([mount("/"), mount("/scratch")])), set(), {"writable_mounts": ["/", "/scratch"]}),
    "read-only mount": Case(
        [], snap(0, mounts=dict([mount("/"), mount("/scratch", read_only=True)])),
        {("FS_READ_ONLY", "/scratch", REBOOT)}, {"writable_mounts": ["/", "/scratch/"]}),
    "missing mount": Case(
        [snap(0, mounts=dict([mount("/"), mount("/scratch")])), snap(10, mounts=dict([mount("/")]))],
        snap(610, mounts=dict([mount("/")])), {("FS_MISSING", "/scratch", REBOOT)},
        {"writable_mounts": ["/", "/scratch"]}),
    "mount missing since the first pass": Case(
        [snap(0, mounts=dict([mount("/")]))], snap(600, mounts=dict([mount("/")])),
        {("FS_MISSING", "/scratch", REBOOT)}, {"writable_mounts": ["/", "/scratch"]}),
    # Issue 9, defect 8: a file server down while the nodes boot leaves the mount missing on every
    # client; it is mounted once the server is back, which is no reason to reboot them all.
    "mount missing for a while (file server down at boot)": Case(
        [snap(0, mounts=dict([mount("/")]))], snap(300, mounts=dict([mount("/")])), set(),
        {"writable_mounts": ["/", "/scratch"]}),
    "an unreadable mount table restarts the time": Case(
        [snap(0, mounts=dict([mount("/")])), snap(500, mounts=None)], snap(700, mounts=dict([mount("/")])), set(),
        {"writable_mounts": ["/", "/scratch"]}),
    "unreadable mount table says nothing": Case([], snap(0, mounts=None), set(), {"writable_mounts": ["/scratch"]}),
    "full disk": Case([], snap(0, mounts=dict([mount("/", used=98.0)])), {("FS_FULL", "/", NONE)}),
    "almost full disk": Case([], snap(0, mounts=dict([mount("/", used=97.9)])), set()),
    "hung mount": Case([], snap(0, mounts=dict([mount("/", used=None, unresponsive=True)])),
                       {("FS_UNRESPONSIVE", "/", NONE)}),
    "memory as expected": Case([], snap(0, memory=MemorySample(int(1985 * GIB), 1500 * GIB)), set(),
                               {"expected_memory_gib": 2015}),
    "memory missing (a DIMM)": Case([], snap(0, memory=MemorySample(1890 * GIB, 1500 * GIB)),
                                    {("MEMORY_MISSING", None, REPLACE)}, {"expected_memory_gib": 2015}),
    "memory not configured": Case([], snap(0, memory=MemorySample(1 * GIB, GIB // 2)), set()),
    "memory low": Case([], snap(0, memory=MemorySample(100 * GIB, 4 * GIB)), {("MEMORY_LOW", None, NONE)}),
    "EDAC quiet": Case([snap(0, edac=edac(mc0=(5, 0)))], snap(60, edac=edac(mc0=(5, 0))), set()),
    "EDAC uncorrectable error": Case(
        [snap(0, edac=edac(mc0=(0, 0), mc1=(0, 0)))], snap(60, edac=edac(mc0=(0, 0), mc1=(0, 1))),
        {("EDAC_UE", "mc1", REPLACE)}),
    "EDAC uncorrectable error stays until reboot": Case(
        [snap(0, edac=edac(mc0=(0, 0))), snap(60, edac=edac(mc0=(0, 1)))], snap(86400, edac=edac(mc0=(0, 1))),
        {("EDAC_UE", "mc0", REPLACE)}),
    "EDAC UE count from before the first pass": Case(
        [snap(0, edac=edac(mc0=(0, 3)))], snap(60, edac=edac(mc0=(0, 3))), set()),
    "EDAC correctable storm": Case(
        [snap(0, edac=edac(mc0=(10, 0)))], snap(600, edac=edac(mc0=(110, 0))), {("EDAC_CE_RATE", "mc0", NONE)}),
    "EDAC correctable errors spread out": Case(
        [snap(0, edac=edac(mc0=(10, 0))), snap(3000, edac=edac(mc0=(60, 0)))],
        snap(7000, edac=edac(mc0=(110, 0))), set()),
    "EDAC counter unreadable": Case(
        [snap(0, edac=edac(mc0=(0, 0)))], snap(60, edac=edac(mc0=(None, None))), set()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_evaluate(case: Case):
    config = SystemConfig(**case.config)
    config.validate()
    findings = evaluate(case.current, case.previous, config, case.current.taken_at)
    assert {(f.code, f.entity, f.action) for f in findings} == case.expected
    for f in findings:
        assert f.monitor == "system" and f.message and f.evidence and f.observed_at == case.current.taken_at


@pytest.mark.parametrize("fields, problem", [
    ({"ib_expected_ports": ["mlx5_0"]}, "device/port"),
    ({"ib_expected_ports": ["mlx5_0/x"]}, "device/port"),
    ({"writable_mounts": ["scratch"]}, "absolute"),
    ({"full_threshold_percent": 120}, "between 0 and 100"),
    ({"ib_link_downed_count": 0}, ">= 1"),
    ({"edac_ce_window_seconds": 0}, "> 0"),
    ({"mount_missing_seconds": -1}, ">= 0"),
    ({"expected_memory_gib": 0}, "> 0"),
])
def test_config_rejects(fields, problem):
    with pytest.raises(ValueError, match=problem):
        SystemConfig(**fields).validate()


# ---------------------------------------------------- SystemMonitor on a fake sysfs/proc


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FakeNode:
    """A sysfs and procfs tree in a temporary directory, in the kernel's formats."""

    def __init__(self, root: Path):
        self.root = root
        self.meminfo(total_kb=64 * 1024 * 1024, available_kb=60 * 1024 * 1024)
        self.mounts(f"/dev/vda1 {root} ext4 rw,relatime 0 0")

    def write(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def port(self, name: str, state: str = "4: ACTIVE", phys: str = "5: LinkUp", link_downed: int = 0) -> None:
        device, _, number = name.partition("/")
        base = f"sys/class/infiniband/{device}/ports/{number}"
        self.write(f"{base}/state", state)
        self.write(f"{base}/phys_state", phys)
        self.write(f"{base}/link_layer", "InfiniBand")
        self.write(f"{base}/counters/link_downed", str(link_downed))
        self.write(f"{base}/counters/symbol_error", "0")

    def mc(self, name: str, ce: int = 0, ue: int = 0) -> None:
        self.write(f"sys/devices/system/edac/mc/{name}/ce_count", str(ce))
        self.write(f"sys/devices/system/edac/mc/{name}/ue_count", str(ue))

    def mounts(self, *lines: str) -> None:
        self.write("proc/1/mounts", "\n".join(lines))

    def meminfo(self, total_kb: int, available_kb: int) -> None:
        self.write("proc/meminfo", f"MemTotal:       {total_kb} kB\nMemFree:        1024 kB\n"
                                   f"MemAvailable:   {available_kb} kB\nBuffers:        0 kB")

    def config(self, **fields) -> SystemConfig:
        fields.setdefault("writable_mounts", [str(self.root)])
        config = SystemConfig(sysfs_root=str(self.root), proc_root=str(self.root), **fields)
        config.validate()
        return config


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path)


def codes(findings) -> Set[Tuple[str, Optional[str]]]:
    return {(f.code, f.entity) for f in findings}


def test_is_a_monitor(node: FakeNode):
    assert isinstance(SystemMonitor(node.config()), Monitor)
    assert SystemMonitor(node.config()).name == "system"


def test_port_active_to_down(node: FakeNode):
    node.port("mlx5_0/1")
    node.port("mlx5_1/1")
    node.port("mlx5_2/1", state="1: DOWN", phys="2: Polling")  # no cable: never expected
    clock = Clock()
    monitor = SystemMonitor(node.config(), clock)
    assert monitor.check() == []

    node.port("mlx5_1/1", state="1: DOWN", phys="3: Disabled", link_downed=1)
    clock.now += 10
    assert monitor.check() == []                      # could still be a retrain
    clock.now += 300
    assert monitor.check() == []                      # or a leaf switch rebooting
    clock.now += 300
    [finding] = monitor.check()
    assert (finding.code, finding.entity, finding.action) == ("IB_PORT_DOWN", "mlx5_1 port 1", REBOOT)
    assert finding.message == "mlx5_1 port 1 is DOWN (Disabled)"

    node.port("mlx5_1/1", link_downed=1)
    clock.now += 5
    assert monitor.check() == []


def test_lifetime_link_downed_vs_flapping(node: FakeNode):
    node.port("mlx5_0/1", link_downed=7)             # went down 7 times, last year
    clock = Clock()
    monitor = SystemMonitor(node.config(), clock)
    for _ in range(5):
        assert monitor.check() == []
        clock.now += 60

    node.port("mlx5_0/1", link_downed=10)
    assert monitor.check() == []
    clock.now += 60
    node.port("mlx5_0/1", link_downed=12)
    assert codes(monitor.check()) == {("IB_LINK_FLAPPING", "mlx5_0 port 1")}
    clock.now += 60
    assert codes(monitor.check()) == {("IB_LINK_FLAPPING", "mlx5_0 port 1")}

    clock.now += 600                                  # quiet for a whole window
    assert monitor.check() == []


def test_edac_ue_increment(node: FakeNode):
    node.mc("mc0")
    node.mc("mc1", ce=12, ue=2)                       # counted before the agent started
    clock = Clock()
    monitor = SystemMonitor(node.config(), clock)
    assert monitor.check() == []

    node.mc("mc0", ue=1)
    clock.now += 1
    [finding] = monitor.check()
    assert (finding.code, finding.entity, finding.action) == ("EDAC_UE", "mc0", REPLACE)
    clock.now += 86400                                # still broken until the node is rebooted
    assert codes(monitor.check()) == {("EDAC_UE", "mc0")}


def test_edac_ce_rate(node: FakeNode):
    node.mc("mc0", ce=5)
    clock = Clock()
    monitor = SystemMonitor(node.config(edac_ce_count=10, edac_ce_window_seconds=60), clock)
    assert monitor.check() == []
    clock.now += 30
    node.mc("mc0", ce=15)
    [finding] = monitor.check()
    assert (finding.code, finding.action) == ("EDAC_CE_RATE", NONE)
    clock.now += 61
    assert monitor.check() == []


def test_read_only_and_missing_mounts(node: FakeNode):
    scratch = node.root / "mnt" / "scratch"
    spaced = node.root / "mnt" / "my data"
    for d in (scratch, spaced):
        d.mkdir(parents=True)
    node.mounts(
        f"/dev/vda1 {node.root} ext4 rw,relatime 0 0",
        f"/dev/loop3 {node.root}/snap/core/1 squashfs ro,nodev,relatime 0 0",   # normal: not configured
        f"/dev/md0 {scratch} xfs rw,noatime 0 0",
        f"fs:/data {str(spaced).replace(' ', chr(92) + '040')} nfs4 rw,hard 0 0",
        f"/dev/md0 {scratch} xfs ro,noatime 0 0",                                # remounted ro on top
    )
    gone = str(node.root / "mnt" / "gone")
    clock = Clock()
    monitor = SystemMonitor(node.config(writable_mounts=[str(node.root), str(scratch), str(spaced), gone]), clock)
    assert codes(monitor.check()) == {("FS_READ_ONLY", str(scratch))}
    clock.now += 600                                  # missing that long: not a file server's hiccup
    found = {(f.code, f.entity): f for f in monitor.check()}
    assert set(found) == {("FS_READ_ONLY", str(scratch)), ("FS_MISSING", gone)}
    assert found[("FS_READ_ONLY", str(scratch))].action is REBOOT
    assert found[("FS_MISSING", gone)].action is REBOOT


def test_missing_memory(node: FakeNode):
    node.meminfo(total_kb=30 * 1024 * 1024, available_kb=20 * 1024 * 1024)
    [finding] = SystemMonitor(node.config(expected_memory_gib=32)).check()
    assert (finding.code, finding.action) == ("MEMORY_MISSING", REPLACE)


def test_unreadable_port_does_not_hide_the_others(node: FakeNode):
    node.port("mlx5_0/1")
    node.port("mlx5_1/1")
    clock = Clock()
    monitor = SystemMonitor(node.config(ib_port_down_seconds=0), clock)
    assert monitor.check() == []

    state = node.root / "sys/class/infiniband/mlx5_0/ports/1/state"
    state.unlink()
    state.mkdir()                                     # reading it fails with an OSError, as EIO would
    node.port("mlx5_1/1", state="1: DOWN")
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 1
            assert codes(monitor.check()) == {("IB_PORT_DOWN", "mlx5_1 port 1")}
    events = [e["event"] for e in logs]
    assert events.count("system.read_failed") == 1    # once per change, not every pass
    assert events.count("system.finding") == 1


def test_nothing_readable_raises(tmp_path: Path):
    config = SystemConfig(sysfs_root=str(tmp_path), proc_root=str(tmp_path))
    with pytest.raises(MonitorError, match="meminfo"):
        SystemMonitor(config).check()


def test_disabled_reads_nothing(tmp_path: Path):
    config = SystemConfig(enabled=False, sysfs_root=str(tmp_path), proc_root=str(tmp_path))
    assert SystemMonitor(config).check() == []


def test_hung_mount_is_bounded(node: FakeNode):
    release = threading.Event()
    calls = []

    def stuck_statvfs(path: str) -> os.statvfs_result:
        calls.append(path)
        release.wait(10)
        return os.statvfs(path)

    config = node.config(statvfs_timeout_seconds=0.05)
    probe = StatvfsProbe(config.statvfs_timeout_seconds, stuck_statvfs)
    for at in (0, 1):
        snapshot = collect(config, T0 + at, probe)
        assert codes(evaluate(snapshot, [], config, T0 + at)) == {("FS_UNRESPONSIVE", str(node.root))}
    assert len(calls) == 1                            # the stuck call is not repeated
    release.set()
    for _ in range(100):
        snapshot = collect(config, T0 + 2, probe)
        if not snapshot.mounts[str(node.root)].unresponsive:
            break
        threading.Event().wait(0.02)
    assert evaluate(snapshot, [], config, T0 + 2) == []
    assert snapshot.mounts[str(node.root)].used_percent is not None


def test_this_machine():
    """The real / of the machine running the tests: no RDMA and probably no EDAC here, and it must not raise."""
    monitor = SystemMonitor(SystemConfig())
    for _ in range(2):
        findings = monitor.check()
        assert not [f for f in findings if f.code.startswith(("IB_", "EDAC_"))]
    monitor.close()
