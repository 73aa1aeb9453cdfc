"""srun's command line: find `--auto-resume`, the program, and the node options.

srun reads options with getopt_long in "+" mode, and so do we (issue 11):
- options end at the first word that is not an option (the program) or at `--`;
  everything after belongs to the program, so `srun -N2 train.sh --auto-resume`
  passes the flag to train.sh;
- an option with a required value takes `--opt=v`, `--opt v`, `-Xv` or `-X v`;
  one with an optional value (`--kill-on-bad-exit`, `--bcast`, `-K`, `-I`...) takes
  it only attached (`--opt=v`, `-Xv`), never the next word: issue 11's defect was
  `srun --kill-on-bad-exit --auto-resume=1 python t.py` losing `--auto-resume=1`
  as the value;
- short options bundle (`-lN2` is `-l -N 2`); a long option may be abbreviated to
  any unambiguous prefix (`--node=2`), an exact name winning over longer ones.
The table of options is srun_options.OPTIONS (from Slurm's own getopt table). An
option it does not know (a SPANK plugin's, say) is read as a flag; its `--opt=value`
form needs no table.

`--auto-resume[=N]` is ours, an optional-value option like srun's: bare or N > 0
turns it on, `=0` off, and `--auto-resume 1` leaves `1` as the program. Given more
than once, the last one wins (as for srun's own options). A word srun would reject
(a value missing at the end) is an error only when `--auto-resume` was found;
without it the shim hands argv to srun untouched and srun says what is wrong.
Only the first component of a heterogeneous step (before ` : `) is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .srun_options import FLAG, OPTIONAL, OPTIONS, VALUE

AUTO_RESUME = "--auto-resume"
# Long names of the options that pick the step's nodes: replaced by an explicit list on a retry.
NODE_SELECTION = {"nodes", "nodelist", "exclude", "nodefile", "use-min-nodes", "relative"}
_BY_SHORT = {opt.short: name for name, opt in OPTIONS.items() if opt.short}


class UsageError(ValueError):
    pass


def long_name(option: str) -> Optional[str]:
    """The table's canonical long name of an option as written (`-w`, `--nodel`,
    `--nodelist`: "nodelist"), or None for an option srun's table does not have.

    >>> long_name("-N"), long_name("--nodel"), long_name("--tasks-per-node"), long_name("--mem"), long_name("--node")
    ('nodes', 'nodelist', 'ntasks-per-node', 'mem', None)
    """
    if not option.startswith("--"):
        name = _BY_SHORT.get(option[1:])
    elif option[2:] in OPTIONS:
        name = option[2:]
    else:
        # getopt_long: an unambiguous prefix names the option.
        found = {_canonical(n) for n in OPTIONS if n.startswith(option[2:])}
        name = found.pop() if len(found) == 1 and option[2:] else None
    return None if name is None else _canonical(name)


def _canonical(name: str) -> str:
    return OPTIONS[name].alias_of or name


def _kind(option: str) -> str:
    name = long_name(option)
    return OPTIONS[name].kind if name else FLAG


@dataclass
class SrunCommand:
    options: List[Tuple[str, Optional[str]]] = field(default_factory=list)  # (option, value), without ours
    program: List[str] = field(default_factory=list)
    auto_resume: Optional[bool] = None     # None: not given; False: =0; True: bare or =1 (or any N > 0)

    def value(self, *names: str) -> Optional[str]:
        """The last value given for any of `names`, however each was spelled
        (`-w`, `--nodelist`, `--nodel`): srun takes the last one."""
        wanted = {long_name(n) for n in names} - {None}
        found = None
        for option, value in self.options:
            if long_name(option) in wanted:
                found = value
        return found

    @property
    def nodes(self) -> Optional[int]:
        """-N/--nodes as a count (the minimum of a range), or None."""
        text = self.value("--nodes")
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
            if nodelist is not None and long_name(option) in NODE_SELECTION:
                continue
            out += _words(option, value)
        if nodelist is not None:
            out += [f"--nodes={len(nodelist)}", f"--nodelist={fold(nodelist)}"]
        # A program that looks like an option was written after `--`, and must be again.
        return out + (["--"] if self.program[:1] and self.program[0].startswith("-") else []) + self.program


def _words(option: str, value: Optional[str]) -> List[str]:
    """One option as srun reads it back: `--opt=v`, `-Xv`; an empty short value as
    its own word, since `-X` alone would take the next word (or none) instead."""
    if value is None:
        return [option]
    if option.startswith("--"):
        return [f"{option}={value}"]
    return [option + value] if value else [option, value]


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

    >>> c = parse(["-N", "2", "--kill-on-bad-exit", "--auto-resume=1", "-l", "python", "train.py", "--auto-resume"])
    >>> c.auto_resume, c.nodes, c.program
    (True, 2, ['python', 'train.py', '--auto-resume'])
    """
    cmd = SrunCommand()
    missing: Optional[str] = None
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
            taken, missing = _long(cmd, arg, argv[i + 1:])
        else:
            taken, missing = _shorts(cmd, arg, argv[i + 1:])
        i += 1 + taken
    if cmd.auto_resume is not None:
        if missing:
            raise UsageError(f"{missing} needs a value")
        unsure = [o for o, v in cmd.options if o.startswith("--") and "=" not in o and v is None and _ambiguous(o)]
        if unsure:
            # Issue 11 review: `--par debug` is --partition to srun 22.05 but matches several options
            # across Slurm releases; read as a flag, the retry would run `debug` as the program.
            raise UsageError(f"{unsure[0]} is an abbreviation of more than one srun option across Slurm "
                             "releases: spell the option out")
    return cmd


def _ambiguous(option: str) -> bool:
    """A long option written as a prefix that more than one option of the table starts with.

    >>> _ambiguous("--par"), _ambiguous("--partition"), _ambiguous("--nodel")
    (True, False, False)
    """
    name = option[2:]
    return name not in OPTIONS and len({_canonical(n) for n in OPTIONS if n.startswith(name)}) > 1


def _long(cmd: SrunCommand, arg: str, rest: List[str]) -> Tuple[int, Optional[str]]:
    """Read one `--opt[=v]` word into `cmd`; return the words after it that it took
    (0 or 1) and the option if its required value is missing."""
    name, eq, value = arg.partition("=")
    if name == AUTO_RESUME:
        cmd.auto_resume = parse_auto_resume(value if eq else None)
        return 0, None
    if eq or _kind(name) != VALUE:
        cmd.options.append((name, value if eq else None))
        return 0, None
    if not rest:
        cmd.options.append((name, None))
        return 0, name
    cmd.options.append((name, rest[0]))
    return 1, None


def _shorts(cmd: SrunCommand, arg: str, rest: List[str]) -> Tuple[int, Optional[str]]:
    """Read a bundle of short options (`-lK`, `-lN2`, `-N`); like _long."""
    for j in range(1, len(arg)):
        option, attached = "-" + arg[j], arg[j + 1:]
        kind = _kind(option)
        if kind == FLAG:
            cmd.options.append((option, None))
        elif attached or kind == OPTIONAL:
            cmd.options.append((option, attached or None))
            return 0, None
        elif rest:
            cmd.options.append((option, rest[0]))
            return 1, None
        else:
            cmd.options.append((option, None))
            return 0, option
    return 0, None

