"""One kernel-log line, in whatever form it arrives, reduced to its message.

The agent reads /dev/kmsg, the journal or a syslog file, and admins paste
lines from any of them into the CLI; the rules only ever see the message::

    >>> parse_line("Nov 22 11:20:21 n2 kernel: NVRM: Xid (PCI:0000:b9:00): 74, NVLink").text
    'NVRM: Xid (PCI:0000:b9:00): 74, NVLink'
    >>> parse_line("6,1234,5678901,-;NVRM: GPU at PCI:0000:b9:00").uptime
    5.678901
    >>> parse_line(" SUBSYSTEM=pci") is None      # /dev/kmsg metadata continuation
    True

Forms, told apart by their prefix:

    syslog     Nov 22 11:20:21 n2 kernel: ...   (also `journalctl -k`, short and short-precise)
    rfc3339    2026-11-22T11:20:21.123456+00:00 n2 kernel: ...   (rsyslog, journalctl -o short-iso)
    dmesg      [12345.678901] ...   `dmesg -x`: kern  :err   : [12345.678901] ...
               `journalctl -k -o short-monotonic`: [12345.678901] n2 kernel: ...
    dmesg -T   [Sun Nov 22 11:20:21 2026] ...
    kmsg       6,1234,5678901,-;...   (/dev/kmsg; parse_kmsg_record is the one parser of its records)
    bare       NVRM: ...
    journal    a journal entry's MESSAGE (built by the journal source, never parsed from text)

Anything else is taken as a bare message. Parsing never raises: kernel-log
bytes are untrusted input, and an exception here would be a crash loop in the
agent. Only the first MAX_LINE_CHARS characters are looked at: fault lines are
short, and a 1 MB line must not cost the agent a megabyte of regex work.

mask_user_text() replaces what users control in a message (process names,
file names, mount options, cgroup paths) before any rule reads it (issue 9,
defect 1): a process named `EDAC MC0: UE` must not read as a memory error.
"""
from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from typing import Optional, Tuple, Union

MAX_LINE_CHARS = 4096

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_MONTH_RE = "(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_CLOCK_RE = r"(?P<hh>\d\d):(?P<mi>\d\d):(?P<ss>\d\d)"

# "<6>" in front of a line read from /proc/kmsg or sent raw over syslog.
_PRI_RE = re.compile(r"<(?P<pri>\d{1,3})>")
# /dev/kmsg: "priority,sequence,microseconds,flags[,more];message"; newer kernels add fields
# such as caller=T123 after the flags.
_KMSG_HEADER_RE = re.compile(
    rb"(?P<pri>\d{1,4}),(?P<seq>\d{1,20}),(?P<usec>\d{1,20}),[^,;]{0,8}(?:,[^;]{0,64})?")
_KMSG_ESCAPE_RE = re.compile(rb"\\x([0-9a-fA-F]{2})")
# The host is optional (some syslog templates drop it); it never contains a colon, which is what
# keeps "Nov 22 11:20:21 kernel: NVRM: Xid" from reading as host "kernel:", tag "NVRM".
_HEADER_TAIL = r" (?:(?P<host>[^\s:]{1,255}) )?(?P<tag>[^\s:\[\]]{1,128})(?:\[\d{1,10}\])?: ?"
_SYSLOG_RE = re.compile(_MONTH_RE + r" {1,2}(?P<dd>\d{1,2}) " + _CLOCK_RE + r"(?P<frac>\.\d{1,9})?" + _HEADER_TAIL)
_RFC3339_RE = re.compile(
    r"(?P<yy>\d{4})-(?P<mo>\d\d)-(?P<dd>\d\d)[T ]" + _CLOCK_RE
    + r"(?P<frac>\.\d{1,9})?(?P<tz>Z|[+-]\d\d:?\d\d)?" + _HEADER_TAIL
)
_DMESG_X_RE = re.compile(r"(?P<facility>[a-z]{2,8}) *:(?P<level>[a-z]{3,6}) *: ")
_UPTIME_RE = re.compile(r"\[ *(?P<uptime>\d{1,12}\.\d{1,9})\] ?")
_DMESG_T_RE = re.compile(
    r"\[(?:[A-Z][a-z]{2} )?" + _MONTH_RE + r" {1,2}(?P<dd>\d{1,2}) " + _CLOCK_RE + r"(?: (?P<yy>\d{4}))?\] ?"
)
# `journalctl -k -o short-monotonic`: "[12345.678901] n2 kernel: ...".
_JOURNAL_MONO_RE = re.compile(r"(?:(?P<host>[^\s:]{1,255}) )?kernel: ")
# CONFIG_PRINTK_CALLER adds "[ T1234]" (task) or "[ C3]" (CPU) after the timestamp.
_CALLER_RE = re.compile(r"\[ *[TC]\d{1,10}\] ?")
# `journalctl` markers such as "-- Boot 8f2e... --" and "-- No entries --".
_JOURNAL_MARKER_RE = re.compile(r"-- .* --\Z")
# A /dev/kmsg continuation line: " SUBSYSTEM=pci", " DEVICE=+pci:0000:b9:00.0".
_KMSG_META_RE = re.compile(r"\s+[A-Za-z_][\w.-]*=")

_DMESG_X_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")


@dataclass(frozen=True)
class KernelLine:
    """The message of one log line and what its prefix said about it."""
    text: str                          # the message alone: timestamps, host and "kernel:" stripped
    form: str                          # syslog, rfc3339, dmesg, dmesg_t, kmsg, journal, bare
    wall_time: Optional[float] = None  # epoch seconds, when the line carries a date
    uptime: Optional[float] = None     # seconds since boot (dmesg, /dev/kmsg)
    host: Optional[str] = None
    level: Optional[int] = None        # 0 (emerg) .. 7 (debug), when the line says
    seq: Optional[int] = None          # /dev/kmsg sequence number: tells replays and gaps
    # False when the prefix says another program wrote it: a syslog tag other than "kernel",
    # a /dev/kmsg record with a userspace facility. `logger "NVRM: Xid ... 79"` from a job
    # must not be able to take a node out of service.
    from_kernel: bool = True


def parse_line(line: Union[str, bytes], *, now: Optional[float] = None) -> Optional[KernelLine]:
    """The message in `line`, or None when the line holds none (blank, metadata, journal marker).

    `now` (epoch seconds) places syslog dates, which have no year: the year is the one that puts
    the date at most a day in the future."""
    if isinstance(line, (bytes, bytearray, memoryview)):
        line = bytes(line[: MAX_LINE_CHARS * 4]).decode("utf-8", errors="replace")
    if not isinstance(line, str):
        return None
    line = line[:MAX_LINE_CHARS].replace("\x00", "\ufffd").rstrip("\r\n")
    if not line.strip() or _KMSG_META_RE.match(line):
        return None
    line = line.strip()
    if _JOURNAL_MARKER_RE.fullmatch(line):
        return None

    level: Optional[int] = None
    from_kernel = True
    pri = _PRI_RE.match(line)
    if pri:
        level, from_kernel = _decode_priority(int(pri["pri"]))
        line = line[pri.end():]
    parsed = (_parse_kmsg(line) or _parse_syslog(line, level, from_kernel, now)
              or _parse_dmesg(line, level, from_kernel, now))
    if parsed is None:
        parsed = KernelLine(text=line, form="bare", level=level, from_kernel=from_kernel)
    return parsed if parsed.text else None


def _decode_priority(pri: int) -> Tuple[int, bool]:
    """Syslog priority → (level, facility is the kernel)."""
    return pri & 7, pri >> 3 == 0


def _parse_kmsg(line: str) -> Optional[KernelLine]:
    if not line[:1].isdigit():
        return None
    record = parse_kmsg_record(line.encode("utf-8", "surrogatepass"))
    return record.kernel_line() if record is not None else None


@dataclass(frozen=True)
class KmsgRecord:
    """One /dev/kmsg record: its header and its message (the " KEY=value" lines after it are
    dropped; no rule reads them)."""
    facility: int
    level: int        # syslog severity, 0 (emerg) .. 7 (debug)
    seq: int
    usec: int         # printk time: microseconds since boot
    message: str

    def kernel_line(self, boot_wall_time: Optional[float] = None) -> KernelLine:
        """The record as the rules read it; `boot_wall_time` (epoch seconds of the kernel's boot)
        turns the printk stamp into the line's wall time (issue 9, defect 10)."""
        wall = boot_wall_time + self.usec / 1e6 if boot_wall_time is not None else None
        return KernelLine(text=self.message.strip(), form="kmsg", wall_time=wall, uptime=self.usec / 1e6,
                          level=self.level, seq=self.seq, from_kernel=self.facility == 0)


def _unescape_kmsg(body: bytes) -> bytes:
    """Undo the kernel's \\xNN escaping, so text matches what syslog files hold.

    Control bytes stay escaped: a message must stay one line."""
    def byte(m: re.Match) -> bytes:
        value = int(m.group(1), 16)
        return bytes([value]) if value >= 0x20 and value != 0x7F else m.group(0)

    return _KMSG_ESCAPE_RE.sub(byte, body) if b"\\x" in body else body


def parse_kmsg_record(raw: bytes) -> Optional[KmsgRecord]:
    """One /dev/kmsg record, or None if it is malformed. The only parser of the format: the
    kmsg source reads records with it, parse_line reads pasted `cat /dev/kmsg` lines with it.

    >>> r = parse_kmsg_record(b"4,1203,5123456,-;NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.\\n")
    >>> (r.level, r.seq, r.usec, r.message)
    (4, 1203, 5123456, 'NVRM: Xid (PCI:0000:b9:00): 79, GPU has fallen off the bus.')
    >>> parse_kmsg_record(b"garbage") is None
    True
    """
    header, sep, rest = raw.partition(b";")
    m = _KMSG_HEADER_RE.fullmatch(header) if sep else None
    if m is None:
        return None
    prio = int(m["pri"])
    first = rest.partition(b"\n")[0]
    message = _unescape_kmsg(first.replace(b"\x00", b"")).decode("utf-8", "replace")
    return KmsgRecord(facility=prio >> 3, level=prio & 7, seq=int(m["seq"]), usec=int(m["usec"]), message=message)


def _parse_syslog(line: str, level: Optional[int], from_kernel: bool, now: Optional[float]) -> Optional[KernelLine]:
    first = line[:1]
    if first.isdigit():
        m = _RFC3339_RE.match(line)
        form = "rfc3339"
    elif first.isalpha():
        m = _SYSLOG_RE.match(line)
        form = "syslog"
    else:
        return None
    if m is None:
        return None
    wall = _rfc3339_time(m) if form == "rfc3339" else _syslog_time(m, now)
    rest = line[m.end():]
    # rsyslog's imklog keeps the kernel's own "[12345.678901]" in front of the message.
    uptime = None
    up = _UPTIME_RE.match(rest)
    if up:
        uptime = float(up["uptime"])
        rest = rest[up.end():]
        # ... and with CONFIG_PRINTK_CALLER the caller after it: "[123.4][ T12] INFO: task ..."
        caller = _CALLER_RE.match(rest)
        if caller:
            rest = rest[caller.end():]
    return KernelLine(text=rest.strip(), form=form, wall_time=wall, uptime=uptime, host=m["host"],
                      level=level, from_kernel=from_kernel and m["tag"] == "kernel")


def _parse_dmesg(line: str, level: Optional[int], from_kernel: bool, now: Optional[float]) -> Optional[KernelLine]:
    x = _DMESG_X_RE.match(line)
    if x:
        from_kernel = x["facility"] == "kern"
        if x["level"] in _DMESG_X_LEVELS:
            level = _DMESG_X_LEVELS.index(x["level"])
        line = line[x.end():]
    if not line.startswith("["):
        return KernelLine(text=line.strip(), form="dmesg", level=level, from_kernel=from_kernel) if x else None
    up = _UPTIME_RE.match(line)
    if up:
        rest, form, uptime, wall = line[up.end():], "dmesg", float(up["uptime"]), None
    else:
        t = _DMESG_T_RE.match(line)
        if t is None:
            return KernelLine(text=line, form="dmesg", level=level, from_kernel=from_kernel) if x else None
        rest, form, uptime, wall = line[t.end():], "dmesg_t", None, _syslog_time(t, now)
    host = None
    journal = _JOURNAL_MONO_RE.match(rest) if form == "dmesg" else None
    if journal:
        host, rest = journal["host"], rest[journal.end():]
    caller = _CALLER_RE.match(rest)
    if caller:
        rest = rest[caller.end():]
    return KernelLine(text=rest.strip(), form=form, wall_time=wall, uptime=uptime, host=host, level=level,
                      from_kernel=from_kernel)


def _syslog_time(m: re.Match, now: Optional[float]) -> Optional[float]:
    """Local time of a "Nov 22 11:20:21" stamp; the year, when absent, is inferred from `now`."""
    now = time.time() if now is None else now
    try:
        month, day = _MONTHS[m["mon"]], int(m["dd"])
        hms = (int(m["hh"]), int(m["mi"]), int(m["ss"]))
        frac = float(m["frac"]) if "frac" in m.re.groupindex and m["frac"] else 0.0
        year_text = m["yy"] if "yy" in m.re.groupindex else None
        if year_text:
            return dt.datetime(int(year_text), month, day, *hms).timestamp() + frac
        year = dt.datetime.fromtimestamp(now).year
        for candidate in (year, year - 1):
            try:
                stamp = dt.datetime(candidate, month, day, *hms).timestamp() + frac
            except ValueError:
                continue  # Feb 29 outside a leap year: try the year before
            if stamp <= now + 86400:
                return stamp
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _rfc3339_time(m: re.Match) -> Optional[float]:
    try:
        tz = m["tz"]
        if tz is None:
            tzinfo = None  # no offset: local time, like syslog
        elif tz == "Z":
            tzinfo = dt.timezone.utc
        else:
            digits = tz[1:].replace(":", "")
            offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            tzinfo = dt.timezone(offset if tz[0] == "+" else -offset)
        stamp = dt.datetime(int(m["yy"]), int(m["mo"]), int(m["dd"]), int(m["hh"]), int(m["mi"]), int(m["ss"]),
                            tzinfo=tzinfo).timestamp()
        return stamp + (float(m["frac"]) if m["frac"] else 0.0)
    except (ValueError, OverflowError, OSError):
        return None


# ------------------------------------------------------------------ user-controlled text

USER_MASK = "<user>"
# A task's comm is at most 15 bytes, but a byte the kernel or syslog escapes (\xNN, rsyslog's #011)
# takes 4 characters: 64 characters always cover it. Every user group is one repeat, bounded or to the
# end of the line, never nested, so a mask costs time linear in the line whatever a user writes.
_COMM = r"(?P<user>.{1,64})"
# A comm at the start of a message may follow a fixed prefix ("traps: "): the start masks cover both.
_LEAD = r"\A(?P<user>.{1,80})"
# Where the kernel echoes text users control (issue 9, defect 1). Each pattern names the user field
# by the kernel's own fixed text around it (the format strings cited), and its `user` group is
# replaced by USER_MASK before any rule reads the message. Each field is matched greedily up to the
# kernel text that closes it, so whatever a name holds (brackets, colons, commas) the mask covers
# all of it; the closing text is longer than a comm, so a name cannot fake it.
_FIELDS = tuple(re.compile(p) for p in (
    # Lines that start with the comm, recognised by the kernel text after it (16+ characters, more
    # than a comm holds, so no name elsewhere in a line can make a subsystem's line look like one):
    # x86 show_signal_msg "%s%s[%d]: segfault at %lx ip %px sp %px error %lx"; arm64/riscv
    # "%s[%d]: unhandled signal %d code 0x%x at ..." and "%s[%d]: unhandled exception: ";
    # x86 signal_fault "%s[%d] bad frame in %s frame:%p ip:%lx sp:%lx orax:%lx";
    # x86 warn_bad_vsyscall "%s%s[%d] %s ip:%lx cs:%lx ..." with "misaligned vsyscall (exploit attempt
    # or buggy program) ...", "vsyscall attempted with vsyscall=none", "vsyscall fault (exploit
    # attempt?)", "vsyscall read attempt denied ...", "seccomp tried to change syscall nr or ip";
    # x86 traps "traps: %s[%d] general protection fault ip:..." and "traps: %s[%d] trap %s ip:...";
    # fs/drop_caches.c "%s (%d): drop_caches: %d"; ipc/shm.c "%s (%d): Using mlock ulimits for
    # SHM_HUGETLB ..."; kernel/exit.c "%s (%d) used greatest stack depth:
    # %lu bytes left"; mm/oom_kill.c "%s invoked oom-killer: gfp_mask=..."; mm/page_alloc.c warn_alloc
    # "%s: %pV, mode:..." with "page allocation failure: order:%u" and mm/vmalloc.c "vmalloc error:
    # size %lu, ..."; x86 pgtable_bad "%s: Corrupted page table at address %lx".
    _LEAD + r"(?:\[\d{1,10}\](?:: segfault at |: unhandled (?:signal|exception)| bad frame in "
    r"| misaligned vsyscall | vsyscall (?:attempted|fault|read attempt)| seccomp tried to change"
    r"| general protection | trap )"
    r"| \(\d{1,10}\)(?:: drop_caches: | used greatest stack depth: |: Using mlock ulimits for SHM_HUGETLB)"
    r"| invoked oom-killer: "
    r"|: (?:page allocation failure: |vmalloc error: size |vmalloc: allocation failure|Corrupted page table ))",
    # NVIDIA: "NVRM: Xid (PCI:%s): %d, pid=%s, name=%s, %s". The name may hold ", ": it runs to the
    # recovery text of XID 154 (longer than a comm, so never inside one), else to the end of the line
    # (no rule reads the driver's text after the name of another XID).
    r"\ANVRM: Xid \([^()]{0,40}\): \d{1,5}, pid=[^,]{0,16}, name="
    r"(?P<user>.{0,64}?(?=, GPU recovery action changed from )|.*)",
    # mm/oom_kill.c: "%s: Killed process %d (%s) total-vm:...", older "Kill process %d (%s) score",
    # oom_reaper: "reaped process %d (%s), now anon-rss:".
    r"\b(?:[Kk]ill(?:ed)?|reaped) process \d{1,10} \((?P<user>.{0,64})\)",
    # kernel/hung_task.c: "INFO: task %s:%d blocked for more than %ld seconds." (and "can't die").
    r"\AINFO: task " + _COMM + r":\d{1,10} (?:blocked|can't die) for more than ",
    # kernel/watchdog.c: "BUG: soft lockup - CPU#%d stuck for %us! [%s:%d]".
    r"\bsoft lockup - CPU#\d{1,5} stuck for \d{1,10}s! \[(?P<user>.{0,64}):\d{1,10}\]",
    # ext4: "... inode #%lu: comm %s: %pV", "... block %llu: comm %s: %pV": the name, then text
    # no rule reads.
    r": comm (?P<user>.*)",
    # mm/oom_kill.c: "oom-kill:constraint=%s,nodemask=%*pbl,cpuset=%s,mems_allowed=...,oom_memcg=%s,
    # task_memcg=%s,task=%s,pid=%d,uid=%d": cgroup paths and the comm, to the end.
    r"\Aoom-kill:(?P<user>.*)",
    r"\AMemory cgroup stats for (?P<user>.*)",                     # mm/memcontrol.c
    r"\Acgroup: fork rejected by pids controller in (?P<user>.*)",  # kernel/cgroup/pids.c
    r"\"(?P<user>.*)\"",                                # quoted names, options, paths: first to last quote
    r"\b(?:comm|name|exe|path|task|cgroup|dev|profile)=(?P<user>[^\s,]{1,255})",  # audit (hex if spaced)
    r"\bunknown mount option \[(?P<user>.*)\]",        # XFS
    r"\bOpts: (?P<user>.*)",                            # ext4 "mounted filesystem ... Opts: %s"
    # Last, any other line that starts with a comm and its pid ("%s[%d]: ", "%s[%d] ", also a known
    # carrier cut short): after the fields above, so a name inside a subsystem's line (`name=x[1]: `)
    # is already masked. Not " (%d) ": subsystems print that themselves ("nvme nvme3: I/O tag 258 (1102)").
    _LEAD + r"\[\d{1,10}\][: ]",
))


def mask_user_text(text: str) -> str:
    """`text` with every field users control replaced by USER_MASK.

    Rules are matched at the start of the message, where the subsystem writes its own prefix; a
    message that starts with USER_MASK is about a process (a segfault, a trap) and no rule reads it
    (kernel_rules.RuleSet.classify).
    Inside a message this masks process, file and cgroup names, mount options, quoted strings.

    >>> mask_user_text("EDAC MC0: UE[4242]: segfault at 0 ip 0 sp 0 error 4 in a.out[400000+1000]")
    '<user>[4242]: segfault at 0 ip 0 sp 0 error 4 in a.out[400000+1000]'
    >>> mask_user_text("NVRM: Xid (PCI:0000:b9:00): 48, pid=7, name=x[1]: , DBE (0x1,0x2)")
    'NVRM: Xid (PCI:0000:b9:00): 48, pid=7, name=<user>'
    """
    for pattern in _FIELDS:
        m = pattern.search(text)
        if m is not None and m.group("user"):
            text = text[:m.start("user")] + USER_MASK + text[m.end("user"):]
    return text
