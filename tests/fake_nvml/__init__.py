"""Build the fake libnvidia-ml.so.1 and write its state file (format: README.md).

Tests put the built directory on LD_LIBRARY_PATH of a *subprocess* (the dynamic
loader reads it at process start) and point HPR_FAKE_NVML_STATE at a file that
`FakeGpuState` writes; the real pynvml then talks to the fake library."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

SOURCE = Path(__file__).resolve().with_name("fake_nvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "HPR_FAKE_NVML_STATE"
CALL_LOG_ENV = "HPR_FAKE_NVML_CALL_LOG"  # the library appends "<function> <GPU index>" per call (README.md)


class FakeNvmlUnavailable(RuntimeError):
    """The fake library cannot be built here (no C compiler or no nvml.h)."""


def nvml_include_dir() -> Path:
    """The directory holding the real nvml.h from the nvidia-nvml-dev wheel."""
    try:
        import nvidia  # namespace package shared by NVIDIA's wheels
    except ImportError:
        raise FakeNvmlUnavailable("nvidia-nvml-dev is not installed (pip install nvidia-nvml-dev)") from None
    for root in nvidia.__path__:
        headers = sorted(Path(root).glob("*/include/nvml.h"))
        if headers:
            return headers[-1].parent
    raise FakeNvmlUnavailable("nvml.h not found under the nvidia namespace package (pip install nvidia-nvml-dev)")


def build_fake_nvml(dest_dir: Path) -> Path:
    """Compile the library into dest_dir (once per source/header change); return dest_dir."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FakeNvmlUnavailable("gcc not found: cannot build the fake NVML library")
    include = nvml_include_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(SOURCE.read_bytes() + (include / "nvml.h").read_bytes()).hexdigest()
    library, stamp = dest_dir / LIBRARY_NAME, dest_dir / f"{LIBRARY_NAME}.sha256"
    if library.exists() and stamp.exists() and stamp.read_text() == digest:
        return dest_dir
    # Build under a temporary name and rename, so a concurrent build or a
    # process loading the library never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(SOURCE), f"-I{include}"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"building the fake NVML library failed:\n{proc.stderr}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp.write_text(digest)
    return dest_dir


def fake_nvml_env(lib_dir: Path, state_file: Path, base: Optional[Dict[str, str]] = None,
                  call_log: Optional[Path] = None) -> Dict[str, str]:
    """Environment for a subprocess that should load the fake library with this state
    (and log every NVML call to `call_log`, see `read_call_log`)."""
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    env[STATE_ENV] = str(state_file)
    if call_log is not None:
        env[CALL_LOG_ENV] = str(call_log)
    return env


def read_call_log(call_log: Path) -> List[Tuple[str, int]]:
    """The (function, GPU index or -1) of each NVML call logged so far, in call order."""
    if not call_log.exists():
        return []
    return [(name, int(gpu)) for name, gpu in (line.split() for line in call_log.read_text().splitlines())]


class FakeGpuState:
    """Writes the state file; every setter rewrites it atomically, so a running
    process sees either the old or the new state, never a torn one.

    Setters return self to allow chaining: FakeGpuState(p).gpus(4).lost(2)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._values: Dict[str, str] = {}
        self._next_event = 1
        self._mtime_ns = 0
        self._write()

    def set(self, key: str, value: Union[int, float, str]) -> FakeGpuState:
        self._values[key] = str(value)
        self._write()
        return self

    def gpus(self, count: int) -> FakeGpuState:
        return self.set("gpus", count)

    def hang(self, seconds: float) -> FakeGpuState:
        return self.set("hang_seconds", seconds)

    def nvlinks(self, count: int, gpu: Optional[int] = None) -> FakeGpuState:
        """Links per GPU (0 = a PCIe GPU without NVLink); node-wide when gpu is None."""
        return self.set("nvlinks" if gpu is None else f"gpu.{gpu}.nvlinks", count)

    def lost(self, gpu: int, lost: bool = True) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.lost", int(lost))

    def uuid(self, gpu: int, uuid: str) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.uuid", uuid)

    def pci(self, gpu: int, bus_id: str) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.pci", bus_id)

    def ecc(self, gpu: int, dbe_volatile: Optional[int] = None, dbe_aggregate: Optional[int] = None,
            sbe_volatile: Optional[int] = None, sbe_aggregate: Optional[int] = None) -> FakeGpuState:
        return self._fields(gpu, ecc_dbe_volatile=dbe_volatile, ecc_dbe_aggregate=dbe_aggregate,
                            ecc_sbe_volatile=sbe_volatile, ecc_sbe_aggregate=sbe_aggregate)

    def remap(self, gpu: int, pending: Optional[bool] = None, failure: Optional[bool] = None,
              correctable: Optional[int] = None, uncorrectable: Optional[int] = None) -> FakeGpuState:
        return self._fields(gpu, remap_pending=pending, remap_failure=failure, remap_correctable=correctable,
                            remap_uncorrectable=uncorrectable)

    def retired_pending(self, gpu: int, pending: bool = True) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.retired_pending", int(pending))

    def nvlink(self, gpu: int, link: int, active: Optional[bool] = None, replay: Optional[int] = None,
               recovery: Optional[int] = None, crc_flit: Optional[int] = None, crc_data: Optional[int] = None,
               ecc_data: Optional[int] = None) -> FakeGpuState:
        return self._fields(gpu, prefix=f"nvlink.{link}.", state=active, replay=replay, recovery=recovery,
                            crc_flit=crc_flit, crc_data=crc_data, ecc_data=ecc_data)

    def throttle(self, gpu: int, reasons: int) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.throttle", hex(reasons))

    def recovery_action(self, gpu: int, action: int) -> FakeGpuState:
        return self.set(f"gpu.{gpu}.recovery_action", action)

    def error(self, function: str, code: int, gpu: Optional[int] = None) -> FakeGpuState:
        """Make an NVML entry point (full C name, e.g. nvmlDeviceGetRemappedRows) return `code`."""
        return self.set(f"error.{function}" if gpu is None else f"gpu.{gpu}.error.{function}", code)

    def event_types(self, gpu: int, mask: int) -> FakeGpuState:
        """The nvmlEventType* bits GPU `gpu` supports (default XID | DBE); registering others fails."""
        return self.set(f"gpu.{gpu}.event_types", hex(mask))

    def add_xid(self, gpu: int, xid: int) -> int:
        """Queue an XID critical-error event; returns its sequence number."""
        return self._add_event(f"{gpu},{xid}")

    def add_dbe(self, gpu: int) -> int:
        """Queue a double-bit ECC error event (nvmlEventTypeDoubleBitEccError); returns its sequence number."""
        return self._add_event(f"{gpu},dbe")

    def _add_event(self, value: str) -> int:
        # One sequence for all event types: the library delivers them in this order.
        seq = self._next_event
        self._next_event += 1
        self.set(f"event.{seq}", value)
        return seq

    def _fields(self, gpu: int, prefix: str = "", **fields: Optional[Union[bool, int]]) -> FakeGpuState:
        for name, value in fields.items():
            if value is not None:
                self._values[f"gpu.{gpu}.{prefix}{name}"] = str(int(value))
        self._write()
        return self

    def _write(self) -> None:
        text = "".join(f"{key}={value}\n" for key, value in self._values.items())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(text)
        # The library notices changes by (inode, size, mtime); two quick writes of
        # equal size can share a coarse file-system timestamp and a recycled inode,
        # so give every write a strictly later mtime.
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1)
        os.utime(tmp, ns=(self._mtime_ns, self._mtime_ns))
        os.replace(tmp, self.path)
