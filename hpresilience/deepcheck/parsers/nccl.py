"""Parser for nccl-tests `all_reduce_perf` output (issue 10).

Quirks handled, each seen in a capture in tests/fixtures/deep-checks/:

- Launcher prefixes: Open MPI's `[1,0]<stdout>:` (all_reduce_perf-2node-p5-mpirun-prefixed.txt)
  and `srun -l`'s `0: ` (all_reduce_perf-2node-p5-srun-label.txt) are stripped first.
- Column layouts: with a `root` column and `#wrong` (current), or without `root` and with
  `error` (all_reduce_perf-8gpu-legacy-format.txt). Rows are read from the right: the last
  eight fields are the out-of-place and in-place `time algbw busbw #wrong`, whatever precedes.
- `#wrong` is `N/A` with validation off (legacy file) -> None, and printed in scientific
  notation once large (`1.04858e+06`, all_reduce_perf-2node-wrong-fail.txt) -> float.
- Stray `NCCL INFO` lines inside the table (legacy file) are not rows and are skipped.
- Summary lines `# Out of bounds values : N OK|FAILED` and `# Avg bus bandwidth : X` may be
  missing (the srun-label files keep only the table).
- No table and no summary (Open MPI's "not enough slots", all_reduce_perf-2node-mpirun-slots-error.txt)
  -> ParseError: a run that printed nothing must not read as 0 GB/s or as a pass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import ParseError, finite_number

_TOOL = "all_reduce_perf"
_PREFIX = re.compile(r"^(?:\[\d+,\d+\]<\w+>:|\s*\d+: )")
_VERSION = re.compile(r"NCCL version (\S+)")
_OUT_OF_BOUNDS = re.compile(r"^#\s*Out of bounds values\s*:\s*(\d+)\s+(OK|FAILED)\b")
_AVG_BUSBW = re.compile(r"^#\s*Avg bus bandwidth\s*:\s*(\S+)")
_HALF = 4  # time algbw busbw #wrong


@dataclass(frozen=True)
class NcclRow:
    size: int                   # bytes
    oop_busbw: float            # GB/s, out-of-place
    oop_wrong: Optional[float]  # mismatched elements; None = not validated (N/A)
    ip_busbw: float             # GB/s, in-place
    ip_wrong: Optional[float]
    oop_algbw: float            # GB/s
    ip_algbw: float


@dataclass(frozen=True)
class NcclReport:
    rows: Tuple[NcclRow, ...]
    avg_busbw: Optional[float]       # "# Avg bus bandwidth"; None when the line is missing
    out_of_bounds: Optional[int]     # "# Out of bounds values"; None when the line is missing
    out_of_bounds_failed: bool       # that line said FAILED
    version: Optional[str]           # "NCCL version 2.16.2+cuda11.6", when printed

    @property
    def max_busbw(self) -> Optional[float]:
        """Largest bus bandwidth of any size, either half (GB/s); None without rows."""
        return max((max(r.oop_busbw, r.ip_busbw) for r in self.rows), default=None)

    @property
    def wrong_total(self) -> Optional[float]:
        """Sum of #wrong over all rows and both halves; None when nothing was validated."""
        counts = [w for r in self.rows for w in (r.oop_wrong, r.ip_wrong) if w is not None]
        return sum(counts) if counts else None


def parse_all_reduce_perf(text: str) -> NcclReport:
    rows: List[NcclRow] = []
    avg_busbw: Optional[float] = None
    out_of_bounds: Optional[int] = None
    failed = False
    version: Optional[str] = None
    for raw in text.splitlines():
        line = _PREFIX.sub("", raw, count=1).strip()
        version_match = _VERSION.search(line)
        if version is None and version_match:
            version = version_match.group(1)
        oob = _OUT_OF_BOUNDS.match(line)
        avg = _AVG_BUSBW.match(line)
        if oob:
            out_of_bounds, failed = int(oob.group(1)), oob.group(2) == "FAILED"
        elif avg:
            try:
                avg_busbw = finite_number(avg.group(1))
            except ValueError as e:
                raise ParseError(_TOOL, f"unreadable average bus bandwidth {avg.group(1)!r}") from e
        else:
            rows.extend(_row(line))
    if not rows and avg_busbw is None:
        raise ParseError(_TOOL, "no result table and no '# Avg bus bandwidth' line in the output")
    return NcclReport(tuple(rows), avg_busbw, out_of_bounds, failed, version)


def _row(line: str) -> Tuple[NcclRow, ...]:
    """The table row on this line, or nothing for any other line (headers, NCCL INFO, noise)."""
    fields = line.split()
    if len(fields) < 2 + 2 * _HALF or not (fields[0].isascii() and fields[0].isdigit()):
        return ()
    try:
        oop_algbw, oop_busbw, oop_wrong = _half(fields[-2 * _HALF:-_HALF])
        ip_algbw, ip_busbw, ip_wrong = _half(fields[-_HALF:])
    except ValueError:
        return ()
    return (NcclRow(int(fields[0]), oop_busbw, oop_wrong, ip_busbw, ip_wrong, oop_algbw, ip_algbw),)


def _half(fields: List[str]) -> Tuple[float, float, Optional[float]]:
    """algbw, busbw and #wrong of one half (`time algbw busbw #wrong`); ValueError if not numbers."""
    finite_number(fields[0])
    wrong = None if fields[3] == "N/A" else finite_number(fields[3])
    return finite_number(fields[1]), finite_number(fields[2]), wrong
