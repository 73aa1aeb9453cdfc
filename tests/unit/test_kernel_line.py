"""kernel_line.parse_line: every form a kernel-log line arrives in, and garbage that must not raise."""
import datetime as dt
import random

import pytest

from hpresilience.agent.kernel_line import MAX_LINE_CHARS, KernelLine, parse_line
from hpresilience.agent.logsource import parse_kmsg_record

XID = "NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link 6"
# 2026-11-22 12:00 local time: syslog dates, which have no year, are placed relative to it.
NOW = dt.datetime(2026, 11, 22, 12, 0, 0).timestamp()


def local(*args: int) -> float:
    return dt.datetime(*args).timestamp()


@pytest.mark.parametrize("raw, expected", [
    # syslog / journalctl -k (short)
    (f"Nov 22 11:20:21 n2 kernel: {XID}",
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 22, 11, 20, 21), host="n2")),
    (f"Nov  2 11:20:21 n2 kernel: {XID}",                       # space-padded day
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 2, 11, 20, 21), host="n2")),
    (f"Nov 22 11:20:21 kernel: {XID}",                          # template without the host
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 22, 11, 20, 21))),
    (f"Nov 22 11:20:21.250000 n2 kernel: {XID}",                # journalctl -o short-precise
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 22, 11, 20, 21) + 0.25, host="n2")),
    (f"Nov 22 11:20:21 n2 kernel: [12345.678901] {XID}",        # rsyslog imklog keeps the kernel stamp
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 22, 11, 20, 21), uptime=12345.678901, host="n2")),
    (f"<4>Nov 22 11:20:21 n2 kernel: {XID}",                    # raw syslog priority
     KernelLine(XID, "syslog", wall_time=local(2026, 11, 22, 11, 20, 21), host="n2", level=4)),
    # RFC 3339 (rsyslog file format, journalctl -o short-iso)
    (f"2026-11-22T11:20:21.123456+00:00 n2 kernel: {XID}",
     KernelLine(XID, "rfc3339", wall_time=1795346421.123456, host="n2")),
    (f"2026-11-22T13:20:21+02:00 n2 kernel: {XID}",
     KernelLine(XID, "rfc3339", wall_time=1795346421.0, host="n2")),
    (f"2026-11-22T11:20:21+0000 n2 kernel: {XID}",
     KernelLine(XID, "rfc3339", wall_time=1795346421.0, host="n2")),
    (f"2026-11-22T11:20:21Z n2 kernel: {XID}",
     KernelLine(XID, "rfc3339", wall_time=1795346421.0, host="n2")),
    (f"2026-11-22T11:20:21Z n2 kernel: [  123.456000][ T1234] {XID}",  # imklog keeps the printk caller too
     KernelLine(XID, "rfc3339", wall_time=1795346421.0, uptime=123.456, host="n2")),
    (f"2026-11-22T11:20:21Z n2 kernel: [123.4][ C3]{XID}",
     KernelLine(XID, "rfc3339", wall_time=1795346421.0, uptime=123.4, host="n2")),
    (f"2026-11-22T11:20:21 n2 kernel: {XID}",                   # no offset: local time
     KernelLine(XID, "rfc3339", wall_time=local(2026, 11, 22, 11, 20, 21), host="n2")),
    # dmesg
    (f"[12345.678901] {XID}", KernelLine(XID, "dmesg", uptime=12345.678901)),
    (f"[    8.951695] {XID}", KernelLine(XID, "dmesg", uptime=8.951695)),
    (f"[  123.456000][ T1234] {XID}", KernelLine(XID, "dmesg", uptime=123.456)),    # CONFIG_PRINTK_CALLER
    (f"kern  :err   : [12345.678901] {XID}", KernelLine(XID, "dmesg", uptime=12345.678901, level=3)),  # dmesg -x
    (f"[12345.678901] n2 kernel: {XID}",                        # journalctl -k -o short-monotonic
     KernelLine(XID, "dmesg", uptime=12345.678901, host="n2")),
    # dmesg -T
    (f"[Sun Nov 22 11:20:21 2026] {XID}", KernelLine(XID, "dmesg_t", wall_time=local(2026, 11, 22, 11, 20, 21))),
    (f"[Sun Nov  1 11:20:21 2026] {XID}", KernelLine(XID, "dmesg_t", wall_time=local(2026, 11, 1, 11, 20, 21))),
    (f"[Sun Mar 29 19:20:37] {XID}", KernelLine(XID, "dmesg_t", wall_time=local(2026, 3, 29, 19, 20, 37))),
    # /dev/kmsg
    (f"6,1234,5678901,-;{XID}", KernelLine(XID, "kmsg", uptime=5.678901, level=6, seq=1234)),
    (f"3,99,12,c,caller=T812;{XID}", KernelLine(XID, "kmsg", uptime=0.000012, level=3, seq=99)),
    # bare messages (what an admin pastes, what the log source hands over)
    (XID, KernelLine(XID, "bare")),
    (f"   {XID}  \r\n", KernelLine(XID, "bare")),
    ("[Hardware Error]: Uncorrected, software restartable error.",   # "[" that is not a timestamp
     KernelLine("[Hardware Error]: Uncorrected, software restartable error.", "bare")),
    ("8021q: adding VLAN 0 to HW filter on device ens1", KernelLine("8021q: adding VLAN 0 to HW filter on device ens1",
                                                                    "bare")),
])
def test_forms(raw, expected):
    assert parse_line(raw, now=NOW) == expected


@pytest.mark.parametrize("raw", [
    "Nov 22 11:20:21 n2 user[1234]: NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.",  # logger
    "2026-11-22T11:20:21Z n2 python3: Out of memory: Killed process 1 (init)",
    "30,1234,5678901,-;systemd[1]: Started foo.service",                      # kmsg, facility daemon
    "<14>Nov 22 11:20:21 n2 kernel: spoofed through the user facility",
    "user  :warn  : [12345.678901] NVRM: Xid (PCI:0000:b9:00): 79, x",          # dmesg -x, user facility
])
def test_lines_not_from_the_kernel_are_marked(raw):
    line = parse_line(raw, now=NOW)
    assert line is not None and not line.from_kernel


@pytest.mark.parametrize("raw", [
    "", "   ", "\n", "\r\n",
    " SUBSYSTEM=pci",                       # /dev/kmsg continuation lines: metadata, not messages
    " DEVICE=+pci:0000:b9:00.0",
    "-- Boot 8f2e1d0c5a3b4e9f8a7b6c5d4e3f2a1b --",
    "-- No entries --",
    "6,1234,5678901,-;",                    # a record with an empty message
])
def test_no_message(raw):
    assert parse_line(raw) is None


def test_syslog_year_is_the_one_not_in_the_future():
    # Read on January 1st, a December 31st line is from the year before.
    new_year = local(2027, 1, 1, 0, 5, 0)
    assert parse_line("Dec 31 23:59:59 n2 kernel: x", now=new_year).wall_time == local(2026, 12, 31, 23, 59, 59)
    # Feb 29 read in a year that has none: the last year that had one.
    assert parse_line("Feb 29 10:00:00 n2 kernel: x", now=local(2029, 3, 1)).wall_time == local(2028, 2, 29, 10)


@pytest.mark.parametrize("raw", [
    "Nov 22 11:2", "Nov 22 11:20:21", "Nov 22 11:20:21 n2", "2026-11-22T", "2026-11-22T11:20:21+0",
    "6,1234,", "6,1234,5678901", "[12345.678", "[Sun Nov 22 11:20", "<", "<6>", "<999>x", "kern  :err   : ",
    "Feb 30 10:00:00 n2 kernel: impossible date", "2026-02-30T10:00:00Z n2 kernel: impossible date",
    "[Sun Feb 30 10:00:00 2026] impossible date", "9999999999999999999999,1,1,-;x",
    "2026-11-22T11:20:21+99:99 n2 kernel: x",
])
def test_truncated_and_odd_lines_never_raise(raw):
    line = parse_line(raw, now=NOW)
    assert line is None or isinstance(line.text, str)


def test_impossible_dates_keep_the_message():
    line = parse_line("Feb 30 10:00:00 n2 kernel: EXT4-fs error (device sda1): x", now=NOW)
    assert line.text == "EXT4-fs error (device sda1): x" and line.wall_time is None


@pytest.mark.parametrize("raw, text", [
    (b"Nov 22 11:20:21 n2 kernel: NVRM: Xid (PCI:0000:b9:00): 79, x", "NVRM: Xid (PCI:0000:b9:00): 79, x"),
    (b"\xff\xfe kernel junk \xc3", "\ufffd\ufffd kernel junk \ufffd"),
    (bytearray(b"[1.0] hi"), "hi"),
    ("NUL\x00inside", "NUL\ufffdinside"),
    (b"6,1,2,-;a\x00b", "a\ufffdb"),
])
def test_bytes_and_nul(raw, text):
    assert parse_line(raw).text == text


@pytest.mark.parametrize("raw", [None, 42, 4.2, ["NVRM: Xid"], object()])
def test_not_a_line_at_all(raw):
    assert parse_line(raw) is None


def test_huge_line_is_capped():
    line = parse_line("Nov 22 11:20:21 n2 kernel: " + "x" * 1_000_000)
    assert line.form == "syslog" and len(line.text) <= MAX_LINE_CHARS
    assert len(parse_line(b"y" * 1_000_000).text) == MAX_LINE_CHARS


def test_random_binary_never_raises():
    rng = random.Random(1234)
    prefixes = [b"", b"Nov 22 11:20:21 n2 kernel: ", b"6,1,2,-;", b"[1.5] ", b"[Sun Nov 22 11:20:21 2026] ", b"<3>"]
    for _ in range(3000):
        raw = rng.choice(prefixes) + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        line = parse_line(raw)
        assert line is None or isinstance(line.text, str)
        line = parse_line(raw.decode("latin-1"))
        assert line is None or isinstance(line.text, str)


def test_pasted_kmsg_lines_use_the_one_kmsg_parser():
    """kernel_line reads `cat /dev/kmsg` lines with logsource's record parser: escapes undone alike."""
    raw = "6,7,99,-;caf\\xc3\\xa9 \\x5c"
    assert parse_line(raw).text == parse_kmsg_record(raw.encode()).message == "caf\u00e9 \\"
    assert parse_line("12,7,99,-;NVRM: Xid").from_kernel is False   # facility user
