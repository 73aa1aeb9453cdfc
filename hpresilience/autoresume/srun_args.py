"""srun's command line: find `--auto-resume`, the program, and the node options.

Only what stands before the program belongs to srun (`srun -N2 train.sh
--auto-resume` passes the flag to train.sh), so options that take a value
must be known to find where the program starts. The table follows
`srun --help` of Slurm 22.05-25.11; an option we do not know is taken as a
flag, and `--opt=value` forms never need the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# Short options that take a value (`-N 2` or `-N2`).
SHORT_WITH_VALUE = set("AbcdDeiJLMmnNopqrSTtWCwxGBFz")
# Long options that take a value when not written `--opt=value`.
LONG_WITH_VALUE = {
    "account", "acctg-freq", "bb", "bbf", "bcast", "bcast-exclude", "begin", "cpus-per-task", "comment",
    "cpu-freq", "dependency", "deadline", "delay-boot", "chdir", "export", "error", "epilog", "gres",
    "gres-flags", "input", "jobid", "job-name", "licenses", "clusters", "distribution", "mail-type",
    "mail-user", "mcs-label", "mpi", "ntasks", "ntasks-per-node", "nodes", "output", "het-group", "partition",
    "power", "priority", "prolog", "profile", "qos", "relative", "core-spec", "slurmd-debug", "switches",
    "task-epilog", "task-prolog", "thread-spec", "threads", "time", "time-min", "wait", "wckey",
    "cluster-constraint", "constraint", "mem", "mincpus", "reservation", "tmp", "nodelist", "exclude",
    "mem-per-cpu", "sockets-per-node", "cores-per-socket", "threads-per-core", "ntasks-per-core",
    "ntasks-per-socket", "ntasks-per-gpu", "cpus-per-gpu", "gpus", "gpu-bind", "gpu-freq", "gpus-per-node",
    "gpus-per-socket", "gpus-per-task", "mem-per-gpu", "cpu-bind", "mem-bind", "hint", "extra-node-info",
    "nodefile", "uid", "gid", "network", "accel-bind", "kill-on-bad-exit", "signal", "container",
    "tres-per-task", "tres-bind", "extra", "resv-ports",
}
# Options that pick the step's nodes: replaced by an explicit list on a retry.
NODE_SELECTION = {"-N", "--nodes", "-w", "--nodelist", "-x", "--exclude", "-F", "--nodefile",
                  "--use-min-nodes", "--relative", "-r"}
AUTO_RESUME = "--auto-resume"


class UsageError(ValueError):
    pass


@dataclass
class SrunCommand:
    options: List[Tuple[str, Optional[str]]] = field(default_factory=list)  # (option, value), without ours
    program: List[str] = field(default_factory=list)
    auto_resume: Optional[bool] = None     # None: not given; False: =0; True: bare or =1 (or any N > 0)

    def value(self, *names: str) -> Optional[str]:
        """The last value given for any of `names` (srun: the last one wins)."""
        found = None
        for option, value in self.options:
            if option in names:
                found = value
        return found

    @property
    def nodes(self) -> Optional[int]:
        """-N/--nodes as a count (the minimum of a range), or None."""
        text = self.value("-N", "--nodes")
        if text is None:
            return None
        try:
            return int(text.split("-")[0])
        except ValueError:
            raise UsageError(f"cannot read the node count {text!r}") from None

    def argv(self, nodelist: Optional[List[str]] = None) -> List[str]:
        """srun's argv (without srun itself). With `nodelist`, the node options are
        replaced by exactly those nodes (`-N <count> -w <list>`)."""
        from ..slurm.hostlist import fold
        out: List[str] = []
        for option, value in self.options:
            if nodelist is not None and option in NODE_SELECTION:
                continue
            out.append(option if value is None else f"{option}={value}" if option.startswith("--")
                       else f"{option}{value}")
        if nodelist is not None:
            out += [f"--nodes={len(nodelist)}", f"--nodelist={fold(nodelist)}"]
        return out + self.program


def parse_auto_resume(text: Optional[str]) -> bool:
    """`--auto-resume` (bare) and `=1` turn it on, `=0` off; anything else is an error.

    >>> parse_auto_resume(None), parse_auto_resume("1"), parse_auto_resume("0")
    (True, True, False)
    """
    if text is None:
        return True
    if text.strip().isdigit():
        return int(text) > 0
    raise UsageError(f"--auto-resume={text}: expected --auto-resume, --auto-resume=1 or --auto-resume=0")


def parse(argv: List[str]) -> SrunCommand:
    """Split srun's arguments (without argv[0]).

    >>> c = parse(["-N", "2", "--auto-resume=1", "-l", "python", "train.py", "--auto-resume"])
    >>> c.auto_resume, c.nodes, c.program
    (True, 2, ['python', 'train.py', '--auto-resume'])
    """
    cmd = SrunCommand()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            cmd.program = argv[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":
            cmd.program = argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name == AUTO_RESUME:
                cmd.auto_resume = parse_auto_resume(value if eq else None)
            elif eq:
                cmd.options.append((name, value))
            elif name[2:] in LONG_WITH_VALUE:
                if i + 1 >= len(argv):
                    raise UsageError(f"{name} needs a value")
                cmd.options.append((name, argv[i + 1]))
                i += 1
            else:
                cmd.options.append((name, None))
        else:
            letter = arg[1]
            if letter in SHORT_WITH_VALUE:
                if len(arg) > 2:
                    cmd.options.append((arg[:2], arg[2:]))
                elif i + 1 < len(argv):
                    cmd.options.append((arg, argv[i + 1]))
                    i += 1
                else:
                    raise UsageError(f"{arg} needs a value")
            else:
                cmd.options.append((arg, None))  # a flag, or a bundle of flags like -lK
        i += 1
    return cmd
