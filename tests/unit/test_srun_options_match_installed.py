"""The option table against the srun installed here (issue 11): a new Slurm must not drift silently.

`srun --help` does not tell how an option takes its value (it prints `--bcast=<dest_path>`
for an optional value and `--kill-on-bad-exit` for one too), so each option is asked of the
binary itself, with getopt's own answers: `srun --opt --version` prints the version unless
`--opt` ate `--version` as its required value; `srun --opt=1 --version` says "doesn't allow
an argument" for a flag. The names to ask come from `--help` and `--usage` as well as from
our table, so an option srun prints that we lack fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Set, Tuple

import pytest

from hpresilience.autoresume.shim import find_real_srun
from hpresilience.autoresume.srun_options import FLAG, OPTIONAL, OPTIONS, VALUE

SRUN = find_real_srun(os.environ)
pytestmark = pytest.mark.skipif(SRUN is None, reason="no srun installed (Slurm's client commands are not here)")
# These exit as soon as getopt hands them over, so `-h1` cannot show how `-h` treats "1".
EXITS_AT_ONCE = {"h", "V"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Dict[str, str]:
    # srun 22.05 will not even print its help without a configuration; a stub one is enough.
    conf = tmp_path_factory.mktemp("slurm") / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\n")
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SLURM_CONF": str(conf)}


def srun(env: Dict[str, str], *args: str) -> str:
    proc = subprocess.run([SRUN, *args], capture_output=True, text=True, env=env, timeout=60)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def version(env) -> Tuple[int, int]:
    found = re.search(r"(\d+)\.(\d+)\.\d+", srun(env, "--version"))
    assert found, "srun --version printed no version"
    return int(found[1]), int(found[2])


def printed_options(text: str) -> Tuple[Set[str], Set[str]]:
    """Long names and short letters in `srun --help`/`--usage` text: `-N, --nodes=N`,
    `-B  --extra-node-info=S[:C[:T]]`, `--bcast=<dest_path>`, `[--nice[=value]]`, `[-N nnodes]`."""
    longs = set(re.findall(r"(?:^|[\s\[])--([a-z][a-z0-9_-]*[a-z0-9])", text, re.M))
    shorts = set(re.findall(r"(?:^|[\s\[])-([A-Za-z])(?=[,\s\]])", text, re.M))
    return longs, shorts


def probe(env: Dict[str, str], option: str) -> Optional[str]:
    """How the installed srun's getopt takes `option`'s value (`--name` or `-X`); None: not an option."""
    first = srun(env, option, "--version")
    if "unrecognized option" in first or "invalid option" in first:
        return None
    if not re.search(r"\d+\.\d+\.\d+|^Usage:", first, re.M):
        return VALUE                        # `--version` went as the value
    if option.startswith("--"):
        return FLAG if "doesn't allow an argument" in srun(env, f"{option}=1", "--version") else OPTIONAL
    if option[1] in EXITS_AT_ONCE:
        return FLAG
    return FLAG if "invalid option -- '1'" in srun(env, f"{option}1", "--version") else OPTIONAL


def same_kind(ours: str, installed: str, option: str) -> bool:
    # A long option's value only ever comes as `--opt=v` unless required, so flag and
    # optional parse the same (newer Slurm made `--pty` optional; the table keeps the newest).
    return ours == installed or (option.startswith("--") and {ours, installed} == {FLAG, OPTIONAL})


def release(text: str) -> Tuple[int, int]:
    major, minor = text.rstrip("+").split(".")
    return int(major), int(minor)


def table_options(installed: Tuple[int, int]) -> List[str]:
    """Our table's options the installed release has, as srun spells them."""
    out = []
    for name, opt in OPTIONS.items():
        if release(opt.since) <= installed and (opt.until is None or installed < release(opt.until)):
            out.append(f"--{name}")
            if opt.short:
                out.append(f"-{opt.short}")
    return out


def kind_in_table(option: str) -> Optional[str]:
    if option.startswith("--"):
        return OPTIONS[option[2:]].kind if option[2:] in OPTIONS else None
    return next((o.kind for o in OPTIONS.values() if o.short == option[1]), None)


def test_every_option_srun_has_is_in_the_table_with_the_same_kind(env, version):
    longs, shorts = printed_options(srun(env, "--help") + srun(env, "--usage"))
    assert {"nodes", "kill-on-bad-exit", "bcast"} <= longs and {"N", "K"} <= shorts  # the help was read
    printed = [f"--{n}" for n in sorted(longs)] + [f"-{s}" for s in sorted(shorts)]
    asked = sorted(set(printed) | set(table_options(version)))
    with ThreadPoolExecutor(8) as pool:
        installed = dict(zip(asked, pool.map(lambda o: probe(env, o), asked)))
    assert installed["--kill-on-bad-exit"] == OPTIONAL and installed["--nodes"] == VALUE  # the probe works
    wrong = {o: (kind_in_table(o), k) for o, k in installed.items()
             if k is not None and (kind_in_table(o) is None or not same_kind(kind_in_table(o), k, o))}
    assert wrong == {}, "option: (table, installed srun)"
    # The table's options for this release all exist; printed names srun rejects are stale help text.
    missing = [o for o in table_options(version) if installed[o] is None]
    assert missing == []
    stale = {o for o in printed if installed[o] is None}
    assert not stale & set(table_options(version))


def test_printed_options_reads_every_help_notation():
    text = ("  -A, --account=name   x\n  -B  --extra-node-info=S[:C[:T]]  y\n      --nice[=value]  z\n"
            "Usage: srun [-N nnodes] [--kill-on-bad-exit] [--bcast=<dest_path>] [-w hosts...]\n")
    assert printed_options(text) == ({"account", "extra-node-info", "nice", "kill-on-bad-exit", "bcast"},
                                     {"A", "B", "N", "w"})
