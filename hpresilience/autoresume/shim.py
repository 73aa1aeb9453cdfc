"""Entry point behind the `srun` shim (scripts/srun): find the real srun, pass
through untouched without `--auto-resume`, else run the auto-resume loop."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Mapping, Optional

SHIM_MARKER = b"hpresilience-srun-shim"


def is_shim(path: Path) -> bool:
    """Our own shim (any copy of it), recognised by a marker near its start."""
    try:
        with open(path, "rb") as f:
            return SHIM_MARKER in f.read(512)
    except OSError:
        return False


def find_real_srun(env: Mapping[str, str], configured: Optional[str] = None) -> Optional[str]:
    """The first srun on PATH that is not a copy of the shim (so a shim installed
    ahead of Slurm's srun never finds itself)."""
    if configured:
        return configured
    for directory in env.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "srun"
        if candidate.is_file() and os.access(candidate, os.X_OK) and not is_shim(candidate):
            return str(candidate)
    return None


def main(argv: List[str]) -> int:
    from ..config import ConfigError
    from ..log import configure
    from ..slurm import SlurmError
    from .runner import AutoResumeError, Runner
    from .settings import load_settings
    from .srun_args import UsageError, parse

    env = os.environ
    try:
        settings = load_settings(env)
    except ConfigError as e:
        print(f"[auto-resume] bad settings: {e}", file=sys.stderr)
        return 2
    real = find_real_srun(env, settings.real_srun)
    if real is None:
        print("[auto-resume] no srun found on PATH besides this shim", file=sys.stderr)
        return 2
    try:
        cmd = parse(argv)
    except UsageError as e:
        print(f"[auto-resume] {e}", file=sys.stderr)
        return 2
    if not cmd.auto_resume:
        # --auto-resume=0, or the flag belonged to the program: exactly srun, with our flag removed
        # only when it was srun's.
        args = cmd.argv() if cmd.auto_resume is False else argv
        os.execv(real, [real, *args])
    configure(level="warning", json=True)
    try:
        return Runner(cmd, settings, real).run()
    except (AutoResumeError, UsageError) as e:   # UsageError: e.g. a node count srun reads, we cannot
        print(f"[auto-resume] {e}", file=sys.stderr)
        return 2
    except SlurmError as e:
        print(f"[auto-resume] Slurm: {e}", file=sys.stderr)
        return 2

