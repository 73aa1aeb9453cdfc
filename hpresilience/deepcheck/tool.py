"""Running an outside tool (dcgmi, stress-ng, ib_write_bw, a torch worker) with a timeout.

Issue 10's rules for bad input: a missing tool is SKIP with the reason (never
FAIL); a tool that does not finish in time is killed, with its whole process
group, and the check is ERROR (it could not run; a hung tool is not evidence
that the node is bad, and it never hangs the caller).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .check import CouldNotRun, Skip

# After the kill, how long to wait for the process to be reaped. A process stuck in
# the kernel (a hung GPU driver: state D) cannot die; we leave it rather than hang.
REAP_SECONDS = 5.0


@dataclass(frozen=True)
class ToolOutput:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def first_line(self) -> str:
        """The first non-blank line of stderr, else of stdout: what a tool said when it failed."""
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip():
                    return line.strip()
        return "(no output)"


def find_tool(name: str, env: Optional[Mapping[str, str]] = None) -> str:
    """The tool's path, or Skip naming it."""
    path = shutil.which(name, path=(env or os.environ).get("PATH"))
    if path is None:
        raise Skip(f"{name} is not installed (not on PATH)")
    return path


def run_tool(argv: Sequence[str], timeout: float, env: Optional[Mapping[str, str]] = None,
             tool: Optional[str] = None) -> ToolOutput:
    """Run argv to completion within `timeout` seconds; stdout and stderr captured apart.

    Raises Skip when the program is not installed, CouldNotRun when it does not
    finish in time or cannot be started. A non-zero exit status is returned, not
    raised: some tools print a full report and still exit non-zero (dcgmi's 226)."""
    name = tool or os.path.basename(argv[0])
    full_env = {**os.environ, **(env or {})}
    exe = find_tool(argv[0], full_env)
    began = time.monotonic()
    try:
        proc = subprocess.Popen([exe, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=full_env, text=True, errors="replace",
                                start_new_session=True)  # its own process group: killed whole on timeout
    except OSError as e:
        raise CouldNotRun(f"{name} could not be started: {e.strerror or e}") from e
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CouldNotRun(f"{name} did not finish within {timeout:g}s (killed)") from None
    return ToolOutput(argv=list(argv), returncode=proc.returncode, stdout=out, stderr=err,
                      seconds=time.monotonic() - began)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=REAP_SECONDS)
    except subprocess.TimeoutExpired:
        pass  # unkillable (in the kernel): left behind, never waited on
