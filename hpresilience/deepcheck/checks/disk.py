"""Disk: write, fsync and read back a file on each configured path (issue 10).

Throughput below `min_write_mb_s` / `min_read_mb_s` fails (a disk that still
works but at a fraction of its speed slows every checkpoint); data that reads
back different from what was written fails whatever the speed. The read comes
after the page cache was told to drop the file, so it measures the device.
Runs in a worker thread with a deadline: a hung filesystem (a dead NFS server)
is ERROR, not a hung check.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Tuple

from ..check import Check, Context, CouldNotRun, Skip, per_level
from ..result import Status, Verdict

CHUNK = 1 << 20


@dataclass(frozen=True)
class DiskSample:
    path: str
    size_bytes: int
    write_seconds: float     # write + fsync
    read_seconds: float
    intact: bool

    @property
    def write_mb_s(self) -> float:
        return self.size_bytes / 1e6 / max(self.write_seconds, 1e-9)

    @property
    def read_mb_s(self) -> float:
        return self.size_bytes / 1e6 / max(self.read_seconds, 1e-9)


def measure(path: str, size_bytes: int) -> DiskSample:
    """Write `size_bytes` of non-repeating data to a file in `path`, fsync, drop it from the
    page cache, read it back; compare digests. The file is removed."""
    block = os.urandom(CHUNK)
    written = hashlib.sha256()
    began = time.monotonic()
    # A fresh name, created exclusively: run as root in a world-writable directory, a
    # predictable name could be a user's symlink (issue 10 review).
    fd, target = tempfile.mkstemp(prefix=".hpresilience-deepcheck-", dir=path)
    try:
        for i in range(max(1, size_bytes // CHUNK)):
            chunk = i.to_bytes(8, "little") + block[8:]  # every chunk different: no dedup, no compression win
            view = memoryview(chunk)
            while view:  # a short write is not an error: write the rest
                view = view[os.write(fd, view):]
            written.update(chunk)
        os.fsync(fd)
        write_seconds = time.monotonic() - began
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    read = hashlib.sha256()
    began = time.monotonic()
    try:
        with open(target, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                read.update(chunk)
        read_seconds = time.monotonic() - began
    finally:
        os.unlink(target)
    size = max(1, size_bytes // CHUNK) * CHUNK
    return DiskSample(path, size, write_seconds, read_seconds, written.digest() == read.digest())


class DiskCheck(Check):
    name = "disk"
    params = {
        "paths": ["/tmp"],                                      # directories on the disks to test
        "size_mb": {"quick": 64, "standard": 256, "full": 1024},
        "min_write_mb_s": 20.0,                                 # a broken disk, not a slow model
        "min_read_mb_s": 20.0,
        "timeout_seconds": {"quick": 60.0, "standard": 180.0, "full": 600.0},
    }

    def collect(self, ctx: Context) -> List[DiskSample]:
        paths = list(ctx.params["paths"])
        if not paths:
            raise Skip("no paths configured (deepcheck.checks.disk.paths)")
        size = int(per_level(ctx.params["size_mb"], ctx.level)) * CHUNK
        timeout = float(per_level(ctx.params["timeout_seconds"], ctx.level))
        samples: List[DiskSample] = []
        for path in paths:
            if not os.path.isdir(path):
                raise CouldNotRun(f"disk: {path} is not a directory")
            samples.append(_with_deadline(lambda p=path: measure(p, size), timeout, path))
        return samples

    def evaluate(self, observed: List[DiskSample], params: Mapping[str, Any]) -> Verdict:
        evidence: Dict[str, Any] = {s.path: {"write_mb_s": round(s.write_mb_s, 1), "read_mb_s": round(s.read_mb_s, 1),
                                             "size_mb": s.size_bytes // CHUNK, "intact": s.intact} for s in observed}
        problems: List[Tuple[str, str]] = []
        for s in observed:
            if not s.intact:
                problems.append((s.path, "data read back differs from what was written"))
            if s.write_mb_s < params["min_write_mb_s"]:
                problems.append((s.path, f"write {s.write_mb_s:.1f} MB/s < {params['min_write_mb_s']:g}"))
            if s.read_mb_s < params["min_read_mb_s"]:
                problems.append((s.path, f"read {s.read_mb_s:.1f} MB/s < {params['min_read_mb_s']:g}"))
        if problems:
            return Verdict(Status.FAIL, "; ".join(f"{p}: {why}" for p, why in problems), evidence)
        worst = min(observed, key=lambda s: min(s.write_mb_s, s.read_mb_s))
        return Verdict(Status.PASS, f"{len(observed)} path(s); slowest {worst.path}: write {worst.write_mb_s:.0f} MB/s,"
                                    f" read {worst.read_mb_s:.0f} MB/s", evidence)


def _with_deadline(work: Callable[[], DiskSample], timeout: float, what: str) -> DiskSample:
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except OSError as e:
            box["error"] = e

    thread = threading.Thread(target=run, name=f"deepcheck-disk-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CouldNotRun(f"disk: {what} did not finish within {timeout:g}s (filesystem hung?)")
    if "error" in box:
        raise CouldNotRun(f"disk: {what}: {box['error']}")
    return box["value"]
