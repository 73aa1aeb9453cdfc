"""Parsing of `scontrol -o show node|job` (one record per line, Key=Value).

Why this format and not JSON: `scontrol -o` has kept its keys for a decade
(Slurm 14 to 25.11), while the JSON from sinfo/squeue changes schema with each
openapi plugin version (v0.0.38 on 22.05 ... v0.0.44) and `scontrol --json`
only exists from 23.02. It is also the fastest read on big clusters (10,000
nodes in 0.24 s against 1.1 s for `sinfo --json`, measured on 22.05).

Values may contain spaces (OS=Linux 6.1 #1 SMP ..., free-text reasons), so a
record is cut at " Key=" boundaries, where a key starts a word and contains
no spaces. The one field whose value is free text that may contain "X=y" is a
node's Reason, which Slurm always terminates with "[user@timestamp]": it is
cut out first, by that stamp.
"""
from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from .errors import ParseError
from .hostlist import expand_or_empty
from .models import Job, Node, Reservation, Step

# Whitespace before a "Key=": where one field ends and the next begins.
_FIELD_SPLIT_RE = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_:/.\-]*=)")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_:/.\-]*=")
_REASON_STAMP_RE = re.compile(r"\s\[(?P<user>[^\[\]@\s]+)@(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\]")
# sinfo-style suffixes some versions print on the state word itself.
_STATE_SUFFIX_FLAGS = {"*": "NOT_RESPONDING", "~": "POWERED_DOWN", "#": "POWERING_UP",
                       "%": "POWERING_DOWN", "!": "POWER_DOWN", "@": "REBOOT_REQUESTED", "$": "MAINTENANCE"}
_NULLS = ("", "(null)", "None", "N/A", "Unknown", "n/a")


def _last_stamp(line: str, start: int) -> Optional[re.Match]:
    """The last "[user@time]" after `start`: it ends the reason, whose text may contain brackets."""
    stamp = None
    for stamp in _REASON_STAMP_RE.finditer(line, start):  # noqa: B007 - only the last one is wanted
        pass
    return stamp


def parse_record(line: str) -> Dict[str, str]:
    """Split one `scontrol -o` line into a dict of raw string values.

    >>> parse_record("NodeName=n1 OS=Linux 6.1 #1 SMP State=IDLE")["OS"]
    'Linux 6.1 #1 SMP'
    """
    line = line.rstrip("\n")
    record: Dict[str, str] = {}
    start = line.find(" Reason=") if line.startswith("NodeName=") else -1
    stamp = _last_stamp(line, start) if start >= 0 else None
    if stamp is not None:
        record["Reason"] = line[start + len(" Reason="): stamp.start()].strip()
        record["ReasonUser"] = stamp.group("user")
        record["ReasonTime"] = stamp.group("time")
        line = line[:start] + " " + line[stamp.end():]
    line = line.strip()
    if not _KEY_RE.match(line):
        raise ParseError("scontrol record", line)
    # One C-level split per record: 10,000 nodes parse in a fraction of a second.
    for field in _FIELD_SPLIT_RE.split(line):
        key, _, value = field.partition("=")
        record.setdefault(key, value.strip())
    return record


def parse_records(text: str) -> List[Dict[str, str]]:
    return [parse_record(line) for line in text.splitlines() if line.strip() and "=" in line]


def _opt(value: Optional[str]) -> Optional[str]:
    return None if value is None or value in _NULLS else value


def _int(value: Optional[str]) -> Optional[int]:
    value = _opt(value)
    if value is None:
        return None
    try:
        return int(value.split("-")[0])  # "NumNodes=3-3" is a range
    except ValueError:
        return None


def parse_time(value: Optional[str]) -> Optional[dt.datetime]:
    """Slurm prints local time without a zone; return an aware datetime."""
    value = _opt(value)
    if value is None:
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S").astimezone()
    except ValueError:
        return None


def parse_state(text: str) -> Tuple[str, frozenset]:
    """'IDLE+DRAIN' -> ('IDLE', {'DRAIN'}); 'DOWN*' -> ('DOWN', {'NOT_RESPONDING'})."""
    words = [w for w in text.strip().upper().split("+") if w]
    if not words:
        raise ParseError("node state", text)
    flags = set(words[1:])
    base = words[0]
    while base and base[-1] in _STATE_SUFFIX_FLAGS:
        flags.add(_STATE_SUFFIX_FLAGS[base[-1]])
        base = base[:-1]
    return base, frozenset(flags)


def _list(value: Optional[str]) -> Tuple[str, ...]:
    value = _opt(value)
    return tuple(v for v in value.split(",") if v) if value else ()


def _gres(value: Optional[str]) -> Tuple[str, ...]:
    """'gpu:8(S:0-1),nic:1' -> ('gpu:8', 'nic:1'); 'gres:gpu:2' or 'gres/gpu:2' -> ('gpu:2',)."""
    out = []
    for item in re.split(r",(?![^()]*\))", _opt(value) or ""):
        item = re.sub(r"\(.*\)$", "", item.strip())
        item = re.sub(r"^gres[:/]", "", item)
        if item:
            out.append(item)
    return tuple(out)


def node_from_record(r: Dict[str, str]) -> Node:
    if "NodeName" not in r or "State" not in r:
        raise ParseError("node record (no NodeName/State)", " ".join(f"{k}={v}" for k, v in r.items()))
    state, flags = parse_state(r["State"])
    return Node(
        name=r["NodeName"],
        state=state,
        flags=flags,
        reason=_opt(r.get("Reason")),
        reason_user=r.get("ReasonUser"),
        reason_time=parse_time(r.get("ReasonTime")),
        address=_opt(r.get("NodeAddr")),
        hostname=_opt(r.get("NodeHostName")),
        port=_int(r.get("Port")),
        boot_time=parse_time(r.get("BootTime")),
        slurmd_start_time=parse_time(r.get("SlurmdStartTime")),
        next_state=_opt(r.get("NextState")),
        partitions=_list(r.get("Partitions")),
        features=_list(r.get("ActiveFeatures") or r.get("AvailableFeatures")),
        gres=_gres(r.get("Gres")),
        cpus=_int(r.get("CPUTot")),
        version=_opt(r.get("Version")),
    )


def job_from_record(r: Dict[str, str]) -> Job:
    if "JobId" not in r or "JobState" not in r:
        raise ParseError("job record (no JobId/JobState)", " ".join(f"{k}={v}" for k, v in r.items()))
    nodelist = _opt(r.get("NodeList")) or ""
    gres = _gres(r.get("TresPerNode")) or _gres(r.get("Gres"))
    return Job(
        job_id=int(r["JobId"]),
        name=r.get("JobName", ""),
        state=r["JobState"],
        reason=_opt(r.get("Reason")),
        user=(_opt(r.get("UserId")) or "").split("(")[0] or None,
        partition=_opt(r.get("Partition")),
        nodes=tuple(expand_or_empty(nodelist)),
        nodelist=nodelist,
        requested_nodes=tuple(expand_or_empty(_opt(r.get("ReqNodeList")) or "")),
        excluded_nodes=tuple(expand_or_empty(_opt(r.get("ExcNodeList")) or "")),
        batch_host=_opt(r.get("BatchHost")),
        batch=r.get("BatchFlag") == "1",
        num_nodes=_int(r.get("NumNodes")),
        # --exclusive shows as OverSubscribe=NO (Shared=0 before 16.05).
        exclusive=r.get("OverSubscribe", r.get("Shared")) in ("NO", "0"),
        requeue=r.get("Requeue") == "1",
        restart_count=_int(r.get("Restarts")) or 0,
        gres=gres,
        array_job_id=_int(r.get("ArrayJobId")),
        array_task_id=_opt(r.get("ArrayTaskId")),
        submit_time=parse_time(r.get("SubmitTime")),
        start_time=parse_time(r.get("StartTime")),
        eligible_time=parse_time(r.get("EligibleTime")),
        work_dir=_opt(r.get("WorkDir")),
        std_out=_opt(r.get("StdOut")),
        extra=r,
    )


# `squeue --Format` fields that only Slurm writes (ids, states, node names, times, numbers), with the
# `scontrol show job` key each stands for, so that job_from_record reads both. A line of these cannot
# be forged by user text (issue 11, deliverable 6): `scontrol -o show job` prints the job name, comment,
# command and paths raw, newlines included (measured on 22.05: `sbatch -J 'x NodeList=n9'` showed
# NodeList=n9 first, and a newline in -J or --comment printed a second "JobId=999 ..." line).
# Not read: ExcNodeList (squeue 22.05 has no --Format field for it).
JOB_TABLE_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("JobID", "JobId"), ("ArrayJobID", "ArrayJobId"), ("ArrayTaskID", "ArrayTaskId"), ("State", "JobState"),
    ("UserName", "UserId"), ("Partition", "Partition"), ("NodeList", "NodeList"),
    ("ReqNodes", "ReqNodeList"), ("BatchHost", "BatchHost"), ("BatchFlag", "BatchFlag"), ("NumNodes", "NumNodes"),
    ("OverSubscribe", "OverSubscribe"), ("Requeue", "Requeue"), ("RestartCnt", "Restarts"),
    ("tres-per-node", "TresPerNode"), ("SubmitTime", "SubmitTime"), ("StartTime", "StartTime"),
    ("EligibleTime", "EligibleTime"), ("exit_code", "ExitCode"),
    # Last: an admin's or Slurm's own text (state_desc) may stand here instead of a reason word.
    ("Reason", "Reason"))
# squeue's name for each user-text field we read, with its `scontrol show job` key.
USER_TEXT_FIELDS: Dict[str, str] = {"Name": "JobName", "Comment": "Comment", "WorkDir": "WorkDir",
                                    "STDOUT": "StdOut"}


def squeue_format(fields: Sequence[str]) -> str:
    """--Format with each field unpadded and followed by "|" ("F:|")."""
    return "--Format=" + ",".join(f"{f}:|" for f in fields)


def _exit_code(value: str) -> str:
    """squeue 22.05 prints the raw wait status (768), later ones "3:0" like scontrol: give "exit:signal"."""
    if not value.isdigit():
        return value
    status = int(value)
    return f"{status >> 8}:{status & 0x7F}"


def parse_job_table(text: str) -> List[Dict[str, str]]:
    r"""Records (scontrol keys) from `squeue --noheader` with squeue_format(JOB_TABLE_FIELDS).

    >>> r = parse_job_table("7|7|N/A|RUNNING|bob|train|n[1-2]||n1|1|2|NO|1|0|N/A|2026-01-01T00:00:00|"
    ...     "2026-01-01T00:00:01|2026-01-01T00:00:00|768|held: a|b|\n")[0]
    >>> r["ExitCode"], r["Reason"]
    ('3:0', 'held: a|b')
    """
    records = []
    for line in text.splitlines():
        values = line[:-1].split("|", len(JOB_TABLE_FIELDS) - 1) if line.endswith("|") else []
        if len(values) != len(JOB_TABLE_FIELDS) or not values[0].isdigit():
            raise ParseError("squeue job line", line)   # no field here is user text: never expected
        record = {key: value.strip() for (_, key), value in zip(JOB_TABLE_FIELDS, values)}
        if _opt(record["ArrayTaskId"]) is None:
            del record["ArrayJobId"], record["ArrayTaskId"]   # squeue gives a plain job its own id
        record["ExitCode"] = _exit_code(record["ExitCode"])
        records.append(record)
    return records


def parse_user_text_table(text: str, job_ids: Collection[int]) -> Dict[int, str]:
    r"""One user-text field of the jobs `job_ids` (read from a table only Slurm writes), from lines
    "ID|value|" (squeue_format(["JobID", FIELD])).

    Each job's own line starts a line, whatever its value; a value with a newline runs on over the
    next lines, which can look like other jobs' lines. So a job's value is taken only when its line
    is the one line that starts with its id, ends with "|", and is followed by nothing or by the one
    line of another job: a value that ran on, or a line forged for a job, leaves that job out, for
    the caller to read alone.

    >>> parse_user_text_table("1|x|\n2|a|\n2|evil|\n3|b|c|\n4|d|\n5|\n6|e|\n", {1, 2, 3, 4, 6})
    {3: 'b|c', 6: 'e'}
    """
    lines = text.splitlines()
    ids = [line.partition("|")[0] for line in lines]
    count = Counter(int(i) for i in ids if i.isdigit())

    def alone(i: str) -> bool:
        return i.isdigit() and int(i) in job_ids and count[int(i)] == 1

    return {int(ids[n]): _user_value(line[len(ids[n]) + 1:-1]) for n, line in enumerate(lines)
            if alone(ids[n]) and line.endswith("|") and len(line) > len(ids[n]) and
            (n + 1 == len(lines) or alone(ids[n + 1]))}


def parse_user_text_one(text: str, job_id: int) -> str:
    r"""One user-text field of one job (`squeue --jobs=ID`, squeue_format(["JobID", FIELD])): all of it
    is that job's, newlines and separators included; "(null)" (no value) is "".

    >>> parse_user_text_one("5|a\nJobId=9 b|\n", 5)
    'a\nJobId=9 b'
    """
    prefix = f"{job_id}|"
    body = text[:-1] if text.endswith("\n") else text
    if not body.startswith(prefix) or not body.endswith("|"):
        raise ParseError(f"squeue line of job {job_id}", text[:200])
    return _user_value(body[len(prefix):-1])


def _user_value(value: str) -> str:
    return "" if value == "(null)" else value   # squeue's "no value"


def has_expedited_requeue(text: str) -> bool:
    """Whether `scontrol -o show job ID` (Slurm 25.11+) shows ExpeditedRequeue=Yes: the job was submitted
    with --requeue=expedite. Its own name or comment could fake this, which only changes how its own
    requeue is made eligible at once (by Slurm, not by our comment mark)."""
    return re.search(r"(?:^|\s)ExpeditedRequeue=Yes(?:\s|$)", text) is not None


def parse_nodes(text: str) -> List[Node]:
    return [node_from_record(r) for r in parse_records(text)]


def parse_jobs(text: str) -> List[Job]:
    return [job_from_record(r) for r in parse_records(text)]


def parse_version(text: str) -> Tuple[int, int, int]:
    """'slurm-wlm 22.05.8' or 'slurm 23.11.4' -> (22, 5, 8)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ParseError("Slurm version", text)
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def parse_reservations(text: str) -> List[Reservation]:
    if text.strip().startswith("No reservations"):
        return []
    found = []
    for r in parse_records(text):
        flags = _opt(r.get("Flags"))
        users = _opt(r.get("Users"))
        found.append(Reservation(
            name=r["ReservationName"], nodes=tuple(expand_or_empty(_opt(r.get("Nodes")))),
            flags=frozenset(flags.split(",")) if flags else frozenset(),
            users=tuple(users.split(",")) if users else (), state=r.get("State", ""),
            start_time=parse_time(r.get("StartTime")), end_time=parse_time(r.get("EndTime"))))
    return found


# Printed after the step's Name (user text): the last occurrence is Slurm's.
_SRUN_HOST_PID_RE = re.compile(r"\sSrunHost:Pid=[^\s:]+:(?P<pid>\d+)")


def parse_steps(text: str) -> List[Step]:
    r"""`scontrol -o show step`, one step per line.

    >>> parse_steps("StepId=7.0 State=RUNNING NodeList=n[1-2] Name=x SrunHost:Pid=n1:4242")[0].srun_pid
    4242
    """
    if not text.strip() or text.strip().startswith("No job steps"):
        return []
    steps = []
    for line in text.splitlines():
        if not line.strip() or "=" not in line:
            continue
        r = parse_record(line)
        if "StepId" not in r:
            continue
        srun = list(_SRUN_HOST_PID_RE.finditer(line))
        steps.append(Step(step_id=r["StepId"], state=r.get("State", ""),
                          nodes=tuple(expand_or_empty(_opt(r.get("NodeList")))), name=r.get("Name", ""),
                          srun_pid=int(srun[-1].group("pid")) if srun else None))
    return steps


def parse_slurm_user(text: str) -> str:
    r"""SlurmUser from `scontrol show config`.

    >>> parse_slurm_user("SlurmctldPort = 6817\nSlurmUser               = slurm(64030)\n")
    'slurm'
    """
    match = re.search(r"^SlurmUser\s*=\s*(?P<user>[^\s(]+)", text, re.MULTILINE)
    if not match:
        raise ParseError("SlurmUser in scontrol show config", text[:200])
    return match.group("user")


PENDING_JOB_FIELDS = "--Format=JobID:|,Reason:|,RestartCnt:|,SubmitTime:|"   # ":|": unpadded, "|" after


def parse_pending_jobs(text: str) -> List[Tuple[int, str, int, Optional[dt.datetime]]]:
    r"""(job id, pending reason, restart count, submit time) rows of `squeue PENDING_JOB_FIELDS`.
    None of these fields is user text, so a line is a record.

    >>> [row[:3] for row in parse_pending_jobs("12|BeginTime|1|2026-11-29T20:55:58|\n13|Priority|0|N/A|\n")]
    [(12, 'BeginTime', 1), (13, 'Priority', 0)]
    """
    rows = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[0].strip().isdigit() and parts[2].strip().isdigit():
            submitted = parse_time(parts[3].strip()) if len(parts) >= 4 else None
            rows.append((int(parts[0]), parts[1].strip(), int(parts[2]), submitted))
    return rows
