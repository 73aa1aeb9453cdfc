"""Every option srun accepts, keyed by its long name, with how it takes a value (issue 11).

Why a table: srun stops reading options at the program, so finding where the program
starts (and whether `--auto-resume` is srun's or the program's) needs to know which
options eat the next argv word. `srun --help` does not say so reliably: it prints
`--bcast=<dest_path>` and `--kill-on-bad-exit` although both take an *optional* value
(issue 11: treating them as required took `--auto-resume=1` as their value), and
`--usage` lists options srun no longer accepts (`--mpi-combine`, `--ctrl-comm-ifhn`).

Source: Slurm's getopt table, `common_options[]` in src/common/slurm_opt.c (entries with
`set_func` or `set_func_srun`; `has_arg` gives the kind, `val` the short letter), at tag
slurm-22-05-8-1 (the srun installed on our test cluster) and every release up to
25.11 and master; `since`/`until` give the first release that has / no longer has an
option. Where the kind changed, the newest is kept: `--pty` and `--external-launcher`
went from flag to optional value, which parses the same for a long option (its value
only ever comes as `--opt=value`). tests/unit/test_srun_options_match_installed.py
checks this table against the installed srun by running it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

FLAG = "flag"            # never a value
VALUE = "value"          # a required value: `--opt=v`, `--opt v`, `-Xv`, `-X v`
OPTIONAL = "optional"    # a value only when attached: `--opt=v`, `-Xv` (never the next word)


@dataclass(frozen=True)
class Option:
    kind: str
    short: Optional[str] = None        # the one-letter form, if any
    since: str = "22.05"               # 22.05: in 22.05 (or older)
    until: Optional[str] = None        # first release without it
    alias_of: Optional[str] = None     # the same option under another long name


OPTIONS: Dict[str, Option] = {
    "accel-bind": Option(VALUE),
    "account": Option(VALUE, "A"),
    "acctg-freq": Option(VALUE),
    "async": Option(FLAG, since="25.11+"),
    "autocomplete": Option(VALUE, since="23.02"),
    "bb": Option(VALUE),
    "bbf": Option(VALUE),
    "bcast": Option(OPTIONAL),
    "bcast-exclude": Option(VALUE),
    "begin": Option(VALUE, "b"),
    "chdir": Option(VALUE, "D"),
    "cluster": Option(VALUE),
    "cluster-constraint": Option(VALUE),
    "clusters": Option(VALUE, "M"),
    "comment": Option(VALUE),
    "compress": Option(OPTIONAL),
    "consolidate-segments": Option(FLAG, since="25.11"),
    "constraint": Option(VALUE, "C"),
    "container": Option(VALUE),
    "container-id": Option(VALUE, since="23.02"),
    "context": Option(VALUE),
    "contiguous": Option(FLAG),
    "core-spec": Option(VALUE, "S"),
    "cores-per-socket": Option(VALUE),
    "cpu-bind": Option(VALUE),
    "cpu-freq": Option(VALUE),
    "cpu_bind": Option(VALUE, alias_of="cpu-bind"),
    "cpus-per-gpu": Option(VALUE),
    "cpus-per-task": Option(VALUE, "c"),
    "deadline": Option(VALUE),
    "debugger-test": Option(FLAG),
    "delay-boot": Option(VALUE),
    "dependency": Option(VALUE, "d"),
    "disable-status": Option(FLAG, "X"),
    "distribution": Option(VALUE, "m"),
    "epilog": Option(VALUE),
    "error": Option(VALUE, "e"),
    "exact": Option(FLAG),
    "exclude": Option(VALUE, "x"),
    "exclusive": Option(OPTIONAL),
    "export": Option(VALUE),
    "external-launcher": Option(OPTIONAL, since="23.11"),
    "extra": Option(VALUE, since="23.02"),
    "extra-node-info": Option(VALUE, "B"),
    "gid": Option(VALUE, until="23.11"),
    "gpu-bind": Option(VALUE),
    "gpu-freq": Option(VALUE),
    "gpus": Option(VALUE, "G"),
    "gpus-per-node": Option(VALUE),
    "gpus-per-socket": Option(VALUE),
    "gpus-per-task": Option(VALUE),
    "gres": Option(VALUE),
    "gres-flags": Option(VALUE),
    "help": Option(FLAG, "h"),
    "het-group": Option(VALUE),
    "hint": Option(VALUE),
    "hold": Option(FLAG, "H"),
    "ignore-signals": Option(VALUE, since="25.11+"),
    "immediate": Option(OPTIONAL, "I"),
    "input": Option(VALUE, "i"),
    "interactive": Option(FLAG),
    "job-name": Option(VALUE, "J"),
    "jobid": Option(VALUE),
    "kill-on-bad-exit": Option(OPTIONAL, "K"),
    "label": Option(FLAG, "l"),
    "licenses": Option(VALUE, "L"),
    "mail-type": Option(VALUE),
    "mail-user": Option(VALUE),
    "mcs-label": Option(VALUE),
    "mem": Option(VALUE),
    "mem-bind": Option(VALUE),
    "mem-per-cpu": Option(VALUE),
    "mem-per-gpu": Option(VALUE),
    "mem-update": Option(VALUE, since="25.11+"),
    "mincpus": Option(VALUE),
    "mpi": Option(VALUE),
    "msg-timeout": Option(VALUE),
    "multi-prog": Option(FLAG),
    "network": Option(VALUE),
    "nice": Option(OPTIONAL),
    "no-allocate": Option(FLAG, "Z"),
    "no-kill": Option(OPTIONAL, "k"),
    "nodefile": Option(VALUE, "F"),
    "nodelist": Option(VALUE, "w"),
    "nodes": Option(VALUE, "N"),
    "ntasks": Option(VALUE, "n"),
    "ntasks-per-core": Option(VALUE),
    "ntasks-per-gpu": Option(VALUE),
    "ntasks-per-node": Option(VALUE),
    "ntasks-per-socket": Option(VALUE),
    "ntasks-per-tres": Option(VALUE),
    "oom-kill-step": Option(OPTIONAL, since="24.11"),
    "open-mode": Option(VALUE),
    "output": Option(VALUE, "o"),
    "overcommit": Option(FLAG, "O"),
    "overlap": Option(OPTIONAL),
    "oversubscribe": Option(FLAG, "s"),
    "pack-group": Option(VALUE, alias_of="het-group"),
    "parsable": Option(FLAG, since="25.11+"),
    "partition": Option(VALUE, "p"),
    "power": Option(VALUE, until="24.05"),
    "prefer": Option(VALUE),
    "preserve-env": Option(FLAG, "E"),
    "priority": Option(VALUE),
    "profile": Option(VALUE),
    "prolog": Option(VALUE),
    "propagate": Option(OPTIONAL),
    "pty": Option(OPTIONAL),
    "qos": Option(VALUE, "q"),
    "quiet": Option(FLAG, "Q"),
    "quit-on-interrupt": Option(FLAG),
    "reboot": Option(FLAG),
    "relative": Option(VALUE, "r"),
    "reservation": Option(VALUE),
    "resources": Option(VALUE, since="25.11"),
    "resv-ports": Option(OPTIONAL),
    "runtime": Option(VALUE, since="25.11+"),
    "segment": Option(VALUE, since="24.05"),
    "send-libs": Option(OPTIONAL),
    "signal": Option(VALUE),
    "slurmd-debug": Option(VALUE),
    "sockets-per-node": Option(VALUE),
    "spread-job": Option(FLAG),
    "spread-segments": Option(FLAG, since="25.11"),
    "stepmgr": Option(FLAG, since="24.05"),
    "switches": Option(VALUE),
    "task-epilog": Option(VALUE),
    "task-prolog": Option(VALUE),
    "tasks-per-node": Option(VALUE, alias_of="ntasks-per-node"),
    "test-only": Option(FLAG),
    "thread-spec": Option(VALUE),
    "threads": Option(VALUE, "T"),
    "threads-per-core": Option(VALUE),
    "time": Option(VALUE, "t"),
    "time-min": Option(VALUE),
    "tmp": Option(VALUE),
    "treewidth": Option(VALUE, since="23.11"),
    "tres-bind": Option(VALUE, since="23.11"),
    "tres-per-task": Option(VALUE, since="23.02"),
    "uid": Option(VALUE, until="23.11"),
    "unbuffered": Option(FLAG, "u"),
    "usage": Option(FLAG),
    "use-min-nodes": Option(FLAG),
    "verbose": Option(FLAG, "v"),
    "version": Option(FLAG, "V"),
    "wait": Option(VALUE, "W"),
    "wait-for-children": Option(FLAG, since="25.05"),
    "wckey": Option(VALUE),
    "whole": Option(FLAG),
    "x11": Option(OPTIONAL),
}
