"""The quick node check `srun --auto-resume` runs on a stalled step's nodes (issue 11, hang detection).

One srun inside the job's allocation runs `hpresilience deepcheck --level quick --json` once
on each node; each node's one-line JSON report (`SuiteReport.to_dict()`) says PASS, FAIL or
ERROR. Only a FAIL drops a node: a node the check could not judge (no report, ERROR, the
check timed out, srun failed) is *unknown* and stays in the job. Dropping a node on a guess
would shrink a job for what may be the check's own problem; an unknown node that really is
bad makes the retry stall again, and the runner's bound on stalls without progress ends the job.

Each node's output goes to a file of its own (`srun --output=<dir>/node-check-<job>-%N.out`:
Slurm writes it on the node, named by the node): no labels to map to nodes, and a report is
read whole. Read through `--label` instead, srun cut a DCGM report of ~1.3 kB into several
labelled pieces on the test cluster, and the node's FAIL went unseen (issue 11). The
directory must be one the batch host and every node see (the runner's state directory).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..controller.verdict import gate_report
from ..deepcheck.check import CouldNotRun, Skip
from ..deepcheck.result import Status, describe
from ..deepcheck.tool import run_tool
from ..slurm.hostlist import expand, fold
from ..slurm.models import StepResult


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
                command: Optional[Sequence[str]], out_dir: Path) -> NodeCheck:
    """Run the quick check once on each of `nodes` in one srun (within `timeout` seconds,
    the whole process group killed past it) and sort the nodes by its verdict."""
    ordered = expand(fold(list(nodes)))
    tag = f"node-check-{env.get('SLURM_JOB_ID', 'job')}-{os.getpid()}"
    for node in ordered:   # a file left by an earlier check must not pass for this one's report
        (out_dir / f"{tag}-{node}.out").unlink(missing_ok=True)
    # -n as well as -N: a SLURM_NTASKS inherited from the batch script would otherwise win
    # over --ntasks-per-node and ask for more tasks than one per node.
    argv = [real_srun, "-N", str(len(ordered)), "-n", str(len(ordered)), "-w", fold(ordered),
            "--ntasks-per-node=1", f"--output={out_dir}/{tag}-%N.out", "--kill-on-bad-exit=0",
            *(command or default_command())]
    try:
        out = run_tool(argv, timeout, env=env, tool="srun (node check)")
    except (Skip, CouldNotRun) as e:
        return NodeCheck(unknown={n: f"node check did not run: {e}" for n in ordered})
    srun_said = _last_words(out.stderr.splitlines() + out.stdout.splitlines())
    check = NodeCheck()
    for node in ordered:
        path = out_dir / f"{tag}-{node}.out"
        try:
            text = path.read_text(errors="replace")
            path.unlink()
        except OSError:
            text = None
        report = gate_report(StepResult(out.returncode, text)) if text else None
        if report is None or report.node not in (node, None, ""):
            said = _last_words(text.splitlines()) if text else f"srun exit {out.returncode}: {srun_said}"
            check.unknown[node] = "no report from the node check: " + said
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
