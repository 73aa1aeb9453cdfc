"""The quick node check `srun --auto-resume` runs on a stalled step's nodes (issue 11, hang detection).

One srun inside the job's allocation runs `hpresilience deepcheck --level quick --json` once
on each node; each node's one-line JSON report (`SuiteReport.to_dict()`) says PASS, FAIL or
ERROR. Only a FAIL drops a node: a node the check could not judge (no report, ERROR, the
check timed out, srun failed) is *unknown* and stays in the job. Dropping a node on a guess
would shrink a job for what may be the check's own problem; an unknown node that really is
bad makes the retry stall again, and the runner's bound on stalls without progress ends the job.

Which node a report belongs to: the report names its node itself (`SLURMD_NODENAME`, which
slurmd sets for every task), and that name is used when it is one of the step's nodes, so a
FAIL never depends on task order. Only a task that printed no usable report is mapped
through srun's `--label` task number: with `-N k -n k --ntasks-per-node=1` and the default
block distribution task i runs on the i-th node of the step, and Slurm orders a step's nodes
by their place in slurm.conf, which is assumed here to be the hostlist order of the names
(true of the usual `NodeName=n[1-64]`; where it is not, only the node named in an "unknown"
message can be wrong, never the node dropped).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..controller.verdict import gate_report
from ..deepcheck.check import CouldNotRun, Skip
from ..deepcheck.result import Status, SuiteReport, describe
from ..deepcheck.tool import ToolOutput, run_tool
from ..slurm.hostlist import expand, fold
from ..slurm.models import StepResult

# srun --label: "<task>: <line>", the task number right-aligned to the width of the largest one.
LABELLED = re.compile(r"^\s*(\d+): ?(.*)$")


@dataclass
class NodeCheck:
    """What the quick check said of each node of the step."""
    passed: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)    # node -> the failing checks, described
    unknown: Dict[str, str] = field(default_factory=dict)   # node -> why there is no verdict


def default_command() -> List[str]:
    """`hpresilience deepcheck --level quick --json`, by the console script of this
    installation (the package has no `__main__`, so `python -m hpresilience` does not run)."""
    beside = Path(sys.executable).parent / "hpresilience"
    program = str(beside) if os.access(beside, os.X_OK) else shutil.which("hpresilience") or "hpresilience"
    return [program, "deepcheck", "--level", "quick", "--json"]


def check_nodes(real_srun: str, nodes: Sequence[str], env: Mapping[str, str], timeout: float,
                command: Optional[Sequence[str]] = None) -> NodeCheck:
    """Run the quick check once on each of `nodes` in one srun (within `timeout` seconds,
    the whole process group killed past it) and sort the nodes by its verdict."""
    ordered = expand(fold(list(nodes)))
    # -n as well as -N: a SLURM_NTASKS inherited from the batch script would otherwise win
    # over --ntasks-per-node and ask for more tasks than one per node.
    argv = [real_srun, "-N", str(len(ordered)), "-n", str(len(ordered)), "-w", fold(ordered),
            "--ntasks-per-node=1", "--label", "--kill-on-bad-exit=0", *(command or default_command())]
    try:
        out = run_tool(argv, timeout, env=env, tool="srun (node check)")
    except (Skip, CouldNotRun) as e:
        return NodeCheck(unknown={n: f"node check did not run: {e}" for n in ordered})
    return _sort(out, ordered)


def _sort(out: ToolOutput, ordered: List[str]) -> NodeCheck:
    by_task: Dict[int, List[str]] = {}
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        m = LABELLED.match(line)
        if m is not None:
            by_task.setdefault(int(m.group(1)), []).append(m.group(2))
    reports: Dict[str, SuiteReport] = {}
    said: Dict[str, str] = {}
    for task, lines in by_task.items():
        report = gate_report(StepResult(out.returncode, "\n".join(lines)))
        node = (report.node if report is not None and report.node in ordered
                else ordered[task] if task < len(ordered) else None)
        if node is not None and report is not None:
            reports[node] = report
        elif node is not None:
            said[node] = _last_words(lines)
    srun_said = _last_words([line for line in out.stderr.splitlines() if not LABELLED.match(line)])
    check = NodeCheck()
    for node in ordered:
        report = reports.get(node)
        if report is None:
            check.unknown[node] = "no report from the node check: " + (
                said.get(node) or f"srun exit {out.returncode}: {srun_said}")
        elif report.status is Status.FAIL:
            check.failed[node] = "; ".join(describe(r, 200) for r in report.failed())
        elif report.status is Status.PASS:
            check.passed.append(node)
        else:
            errors = [describe(r, 200) for r in report.results if r.status is Status.ERROR]
            check.unknown[node] = "the node check could not judge it: " + (
                "; ".join(errors) or "every check was skipped")
    return check


def _last_words(lines: List[str]) -> str:
    """What a task printed last (its error, usually), cut short for a message."""
    text = next((line.strip() for line in reversed(lines) if line.strip()), "(nothing)")
    return text if len(text) <= 200 else text[:197] + "..."
