"""Parsers for fabric bandwidth tools: perftest `ib_write_bw` and libfabric `fi_pingpong` (issue 10).

Both yield one BandwidthReport with bandwidth normalised to Gbit/s (10^9 bit/s), the
unit of link speeds and of the fabric thresholds in tests/fixtures/deep-checks/README.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import ParseError, finite_number

# perftest divides bytes/s by 0x100000 for MB/sec and by 125000000 for Gb/sec
# (perftest_parameters.c, print_report_bw: format_factor), so its "MB" is a MiB.
_PERFTEST_UNITS: Dict[str, float] = {"MB/sec": 0x100000 * 8 / 1e9, "Gb/sec": 1.0}
_PERFTEST_HEADER = re.compile(r"#bytes\s+#iterations\s+.*BW average\[([^\]]+)\]")
_PINGPONG_HEADER = re.compile(r"bytes\s+#sent\s+#ack\s+total\s+time\s+MB/sec\s+usec/xfer")
_SUFFIXED = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmg]?)")
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(frozen=True)
class BandwidthRow:
    size: int                     # message size, bytes
    iterations: int
    gbits: float                  # average bandwidth, Gbit/s
    usec_per_xfer: Optional[float] = None  # fi_pingpong only


@dataclass(frozen=True)
class BandwidthReport:
    rows: Tuple[BandwidthRow, ...]  # never empty
    peak_gbits: float               # the best average bandwidth of any message size
    tool: str                       # "ib_write_bw" or "fi_pingpong"


def parse_ib_write_bw(text: str) -> BandwidthReport:
    """`ib_write_bw` (client or server side, any message sizes).

    - The unit comes from each table header: `BW average[MB/sec]` (default,
      ib_write_bw-loopback-superbench.txt) or `BW average[Gb/sec]` (--report_gbits,
      ib_write_bw.txt); another unit is a ParseError.
    - Rows are `#bytes #iterations BW-peak BW-average MsgRate`, split on whitespace (the
      docs copy lost perftest's one-space margin, and the loopback log has tabs).
    - A loopback log interleaves the server's and the client's output, each with its own
      table (loopback-superbench file): every table's rows are kept, in order.
    """
    rows: List[BandwidthRow] = []
    gbits_per_unit: Optional[float] = None
    for line in text.splitlines():
        header = _PERFTEST_HEADER.search(line)
        if header:
            unit = header.group(1)
            if unit not in _PERFTEST_UNITS:
                raise ParseError("ib_write_bw", f"unknown bandwidth unit {unit!r}")
            gbits_per_unit = _PERFTEST_UNITS[unit]
        elif gbits_per_unit is not None:
            rows.extend(_perftest_row(line.split(), gbits_per_unit))
    return _report("ib_write_bw", rows)


def parse_fi_pingpong(text: str) -> BandwidthReport:
    """`fi_pingpong` (either side).

    - Columns `bytes #sent #ack total time MB/sec usec/xfer Mxfers/sec` (fi_pingpong.txt);
      sizes carry k/m suffixes (powers of 1024: `1m` = 1048576), `#ack` reads `=10`.
      MB/sec is bytes per microsecond (10^6 B/s), so 1m at 479.75 usec/xfer is 2185.67.
    - An `[error]` line (fi_pingpong-efa-fail-connect.txt: "failed to connect: Connection
      refused" on the out-of-band control socket) -> ParseError quoting it, even if some
      rows were printed: the run did not complete, so it yields no measurement. Whether
      that fails the node is the caller's call from the exit status, which the README
      names as the signal for this tool.
    """
    errors = [line.strip() for line in text.splitlines() if line.lstrip().startswith("[error]")]
    if errors:
        raise ParseError("fi_pingpong", "; ".join(errors))
    rows: List[BandwidthRow] = []
    in_table = False
    for line in text.splitlines():
        if _PINGPONG_HEADER.search(line):
            in_table = True
        elif in_table:
            rows.extend(_pingpong_row(line.split()))
    return _report("fi_pingpong", rows)


def _perftest_row(fields: List[str], gbits_per_unit: float) -> Tuple[BandwidthRow, ...]:
    if len(fields) != 5:
        return ()
    return _parsed(lambda: BandwidthRow(_count(fields[0]), _count(fields[1]),
                                        finite_number(fields[3]) * gbits_per_unit))


def _pingpong_row(fields: List[str]) -> Tuple[BandwidthRow, ...]:
    if len(fields) != 8:
        return ()
    return _parsed(lambda: BandwidthRow(_count(fields[0]), _count(fields[1]), finite_number(fields[5]) * 8 / 1e3,
                                        usec_per_xfer=finite_number(fields[6])))


def _parsed(build: Callable[[], BandwidthRow]) -> Tuple[BandwidthRow, ...]:
    """The row, or nothing when a field is not a number (a line of another kind)."""
    try:
        return (build(),)
    except ValueError:
        return ()


def _report(tool: str, rows: Iterable[BandwidthRow]) -> BandwidthReport:
    rows = tuple(rows)
    if not rows:
        raise ParseError(tool, "no bandwidth table in the output")
    return BandwidthReport(rows, max(r.gbits for r in rows), tool)


def _count(field: str) -> int:
    """A count or byte size, with fi_pingpong's k/m/g suffixes (powers of 1024)."""
    match = _SUFFIXED.fullmatch(field)
    if not match:
        raise ValueError(f"not a size: {field}")
    return round(float(match.group(1)) * _SUFFIX[match.group(2)])
