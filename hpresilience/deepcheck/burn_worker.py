"""The GPU burn workload of the gpu_burn deep check (issue 10), run in its own process.

    python -m hpresilience.deepcheck.burn_worker --device cuda --seconds 60
    python /path/to/burn_worker.py ...       (any interpreter with torch: stdlib and torch only)

The check runs this as a subprocess under run_tool's timeout, so a CUDA call that
hangs (a GPU that fell off the bus) is killed with the process, never hanging the
caller. Prints one JSON document on stdout (see `main`); exits 0 when it printed one.

Every device (each CUDA GPU at once, one thread each; or with --device cpu, one or
more CPU "devices", how the unit tests run this very code without a GPU):
1. burn: the same product A @ B of fixed-seed `--matrix-size` inputs in `--dtype`
   (bf16: the tensor cores), in batches, for `--seconds`. Busy time is measured with
   CUDA events around each batch, so a GPU waiting for nothing is not charged;
   TFLOPS = 2 n^3 products / busy time. Each batch's product is compared with the
   first one: cuBLAS gives bit-identical results on one GPU for one input, so a
   product that changes under load is a fault (`unstable_batches`).
2. verify: a `--verify-size` product in float32 (TF32 off: NVIDIA_TF32_OVERRIDE=0
   and torch's matmul precision "highest"), compared here with a float64 reference
   computed once on the CPU (`max_error`, relative to the largest reference
   element) and with the other devices' results (`max_disagreement`, same scale,
   against the consensus: the largest group of bit-identical results).
3. memory: device-to-device copies of `--mem-mb`; GB/s counts bytes read plus bytes
   written, as CUDA's bandwidthTest does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

SEED = 20240610
DTYPES = ("bf16", "fp16", "fp32")
# A batch is grown until it takes this long: the event and synchronisation cost per
# batch is then negligible against the kernels, however fast the GPU.
BATCH_SECONDS = 0.25


@dataclass
class DeviceResult:
    index: int
    label: str                     # "GPU 3" or "cpu 0": how the check names the device
    name: str                      # torch's device name
    iterations: int = 0            # products in the burn
    batches: int = 0
    unstable_batches: int = 0      # batches whose product differed from the first one
    busy_seconds: float = 0.0
    tflops: float = 0.0
    mem_bw_gbs: float = 0.0
    max_error: Optional[float] = None          # vs the float64 reference; None: not finite (NaN/Inf)
    max_disagreement: Optional[float] = None   # vs the consensus of all devices; None: not finite
    agree: bool = False                        # bit-identical to the consensus
    error: Optional[str] = None                # the exception that stopped this device


@dataclass(frozen=True)
class Options:
    device: str
    cpu_devices: int
    seconds: float
    matrix_size: int
    dtype: str
    verify_size: int
    mem_mb: int
    mem_seconds: float
    inject_corruption: Optional[Tuple[int, float]]   # tests only: (device index, relative size)


def parse_args(argv: Sequence[str]) -> Options:
    p = argparse.ArgumentParser(prog="burn_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--cpu-devices", type=int, default=1, help="with --device cpu: how many CPU 'devices'")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--matrix-size", type=int, default=8192)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--verify-size", type=int, default=2048)
    p.add_argument("--mem-mb", type=int, default=1024)
    p.add_argument("--mem-seconds", type=float, default=1.0)
    p.add_argument("--inject-corruption", metavar="DEVICE:RELATIVE",
                   help="TESTS ONLY: add RELATIVE x the largest reference element to one element of "
                        "DEVICE's verification result, to prove the comparison catches it")
    a = p.parse_args(list(argv))
    corruption = None
    if a.inject_corruption:
        device, _, size = a.inject_corruption.partition(":")
        corruption = (int(device), float(size))
    return Options(a.device, a.cpu_devices, a.seconds, a.matrix_size, a.dtype, a.verify_size, a.mem_mb,
                   a.mem_seconds, corruption)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class Device:
    """One device's work; `run` records into `result` and never raises."""

    def __init__(self, torch: Any, opts: Options, index: int, inputs: Dict[str, Any]) -> None:
        self.torch = torch
        self.opts = opts
        self.index = index
        self.inputs = inputs
        self.verification: Optional[Any] = None       # the float32 verification result, on the CPU
        is_cuda = opts.device == "cuda"
        self.device = torch.device("cuda", index) if is_cuda else torch.device("cpu")
        self.result = DeviceResult(index=index, label=f"GPU {index}" if is_cuda else f"cpu {index}", name="")

    def run(self) -> None:
        try:
            if self.opts.device == "cuda":
                self.torch.cuda.set_device(self.index)  # the current device is per thread
                self.result.name = self.torch.cuda.get_device_name(self.index)
            else:
                self.result.name = platform.processor() or platform.machine()
            self._burn()
            self._verify()
            self._memory()
        except Exception as e:  # a CUDA error on this device: reported for it, the others go on
            self.result.error = _first_line(e)

    def _timed(self, work: Callable[[], None]) -> float:
        """Seconds the device spent on `work` (CUDA events on its stream; wall time on the CPU)."""
        torch = self.torch
        if self.opts.device != "cuda":
            began = time.perf_counter()
            work()
            return time.perf_counter() - began
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _repeat(self, batch_work: Callable[[], None], seconds: float, after: Callable[[], None]) -> Tuple[int, float]:
        """Runs batches of growing size for `seconds` of wall time (at least one batch);
        calls `after` after each; returns (operations, busy seconds)."""
        batch, done, busy = 1, 0, 0.0
        deadline = time.monotonic() + seconds

        def work() -> None:
            for _ in range(batch):
                batch_work()

        while True:
            took = self._timed(work)
            done, busy = done + batch, busy + took
            after()
            if time.monotonic() >= deadline:
                return done, max(busy, 1e-9)
            if took < BATCH_SECONDS:
                batch *= 2

    def _burn(self) -> None:
        torch, n, r = self.torch, self.opts.matrix_size, self.result
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.opts.dtype]
        a = self.inputs["a"].to(self.device, dtype)
        b = self.inputs["b"].to(self.device, dtype)
        c = torch.matmul(a, b)        # warm-up: cuBLAS handle, kernel choice
        first = c.clone()

        def check_stable() -> None:
            r.batches += 1
            if not torch.equal(c, first):
                r.unstable_batches += 1

        r.iterations, r.busy_seconds = self._repeat(lambda: torch.matmul(a, b, out=c), self.opts.seconds,
                                                    check_stable)
        r.tflops = 2.0 * n ** 3 * r.iterations / r.busy_seconds / 1e12

    def _verify(self) -> None:
        a = self.inputs["va"].to(self.device)
        b = self.inputs["vb"].to(self.device)
        self.verification = self.torch.matmul(a, b).cpu()

    def _memory(self) -> None:
        torch = self.torch
        nbytes = self.opts.mem_mb << 20
        src = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)   # warm-up
        copies, busy = self._repeat(lambda: dst.copy_(src), self.opts.mem_seconds, lambda: None)
        self.result.mem_bw_gbs = 2.0 * nbytes * copies / busy / 1e9


def compare(torch: Any, devices: List[Device], reference: Any, corruption: Optional[Tuple[int, float]]) -> None:
    """Fills max_error, max_disagreement and agree of every device that produced a result."""
    scale = float(reference.abs().max())
    done = [d for d in devices if d.verification is not None]
    if corruption is not None:
        index, size = corruption
        for d in done:
            if d.index == index:
                d.verification[0, 0] += size * scale
    for d in done:
        d.result.max_error = _finite_or_none(float((d.verification.double() - reference).abs().max()) / scale)
    groups: List[List[Device]] = []
    for d in done:
        group = next((g for g in groups if torch.equal(g[0].verification, d.verification)), None)
        if group is None:
            groups.append([d])
        else:
            group.append(d)
    if not groups:
        return
    # The consensus: the most devices with one identical result; on a tie, the one nearest the reference.
    consensus = max(groups, key=lambda g: (len(g), -(g[0].result.max_error if g[0].result.max_error is not None
                                                      else math.inf)))[0].verification
    for d in done:
        diff = float((d.verification.double() - consensus.double()).abs().max()) / scale
        d.result.max_disagreement = _finite_or_none(diff)
        d.result.agree = torch.equal(d.verification, consensus)


def run(opts: Options) -> Dict[str, Any]:
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"   # before CUDA starts: cuBLAS reads it once
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        return {"skip": f"torch is not installed for {sys.executable}"}
    doc: Dict[str, Any] = {"torch": torch.__version__, "device_type": opts.device, "dtype": opts.dtype,
                           "matrix_size": opts.matrix_size, "verify_size": opts.verify_size, "seconds": opts.seconds}
    if opts.device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            built = "" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"
            return {**doc, "skip": f"no CUDA GPU visible to torch{built}"}
        count = torch.cuda.device_count()
    else:
        count = opts.cpu_devices
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # Inputs on the CPU from a fixed seed: every device gets the same bits.
    g = torch.Generator().manual_seed(SEED)
    n, v = opts.matrix_size, opts.verify_size
    inputs = {"a": torch.randn(n, n, generator=g), "b": torch.randn(n, n, generator=g),
              "va": torch.randn(v, v, generator=g), "vb": torch.randn(v, v, generator=g)}
    devices = [Device(torch, opts, i, inputs) for i in range(count)]
    threads = [threading.Thread(target=d.run, name=f"burn-{d.result.label}") for d in devices]
    for t in threads:
        t.start()
    reference = inputs["va"].double() @ inputs["vb"].double()   # on the CPU while the devices burn
    for t in threads:
        t.join()
    compare(torch, devices, reference, opts.inject_corruption)
    doc["devices"] = [asdict(d.result) for d in devices]
    return doc


def main(argv: Optional[Sequence[str]] = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    doc = {"worker": "burn_worker", **run(opts)}
    print(json.dumps(doc, allow_nan=False))


if __name__ == "__main__":
    main()
