"""The quick node check of hang detection (issue 11): a fake `srun` script in tmp_path runs the
check command once per node with SLURMD_NODENAME set and labels its lines as srun --label does."""
import json
import os
import sys
from pathlib import Path

import pytest

from hpresilience.autoresume.node_check import NodeCheck, check_nodes, default_command
from hpresilience.deepcheck.result import CheckResult, Level, Status, SuiteReport

FAKE_SRUN = """\
#!{python}
# srun -N k -n k -w NODES --ntasks-per-node=1 --label --kill-on-bad-exit=0 COMMAND...
import json, os, subprocess, sys
from hpresilience.slurm.hostlist import expand
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_ARGV"], "w") as f:
    json.dump(args, f)
i = 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-N", "-n", "-w") else 1
nodes, command = expand(args[args.index("-w") + 1]), args[i:]
order = list(enumerate(nodes))
if os.environ.get("FAKE_SRUN_SLURM_CONF_ORDER") == "reversed":   # slurm.conf lists the nodes the other way round
    order = [(task, node) for task, node in zip(range(len(nodes)), reversed(nodes))]
width, worst = len(str(len(nodes) - 1)), 0
for task, node in order:
    done = subprocess.run(command, env={{**os.environ, "SLURMD_NODENAME": node}}, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        print(f"{{task:>{{width}}}}: {{line}}")
    for line in done.stderr.splitlines():
        print(f"{{task:>{{width}}}}: {{line}}", file=sys.stderr)
    if done.returncode:
        print(f"srun: error: {{node}}: task {{task}}: Exited with exit code {{done.returncode}}", file=sys.stderr)
    worst = max(worst, done.returncode)
sys.exit(worst)
"""

# The deep check as `hpresilience deepcheck --json` prints it, with the verdict FAKE_VERDICTS gives this node.
FAKE_CHECK = """\
import json, os, sys
from hpresilience.deepcheck.result import CheckResult, Status, SuiteReport, Level
node = os.environ["SLURMD_NODENAME"]
verdict = json.loads(os.environ["FAKE_VERDICTS"]).get(node, "pass")
if verdict == "silent":
    print("Traceback (most recent call last): ImportError: no module named torch", file=sys.stderr)
    sys.exit(2)
if verdict == "garbage":
    print("{{{not json at all")
    sys.exit(0)
status = {"pass": Status.PASS, "fail": Status.FAIL, "error": Status.ERROR}[verdict]
summary = {"pass": "4 GPUs ok", "fail": "memory errors on GPU 3", "error": "dcgmi did not finish within 60s"}[verdict]
results = (CheckResult("nvml", Status.PASS, "ok"), CheckResult("gpu", status, summary))
print(json.dumps({"event": "deepcheck.start"}))
print(json.dumps(SuiteReport(node, Level.QUICK, results, 0.0, 1.0).to_dict()))
sys.exit({"pass": 0, "fail": 1, "error": 2}[verdict])
"""


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def srun(tmp_path):
    return script(tmp_path / "srun", FAKE_SRUN.format(python=sys.executable))


def run_check(tmp_path, srun, nodes, verdicts, timeout=30.0, **env):
    command = [sys.executable, "-c", FAKE_CHECK]
    full_env = {"FAKE_SRUN_ARGV": str(tmp_path / "argv.json"), "FAKE_VERDICTS": json.dumps(verdicts), **env}
    return check_nodes(srun, nodes, full_env, timeout, command)


def test_only_a_fail_verdict_is_failed_everything_unjudged_is_unknown(tmp_path, srun):
    verdicts = {"n2": "fail", "n3": "error", "n4": "garbage", "n5": "silent"}
    check = run_check(tmp_path, srun, ["n3", "n1", "n5", "n2", "n4"], verdicts)
    assert check.passed == ["n1"]
    assert check.failed == {"n2": "gpu: memory errors on GPU 3"}
    assert sorted(check.unknown) == ["n3", "n4", "n5"]
    assert "could not judge it: gpu: dcgmi did not finish within 60s" in check.unknown["n3"]
    assert check.unknown["n4"] == "no report from the node check: {{{not json at all"
    assert "ImportError: no module named torch" in check.unknown["n5"]
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:8] == ["-N", "5", "-n", "5", "-w", "n[1-5]", "--ntasks-per-node=1", "--label"]
    assert argv[8] == "--kill-on-bad-exit=0" and argv[9:11] == [sys.executable, "-c"]


def test_a_report_names_its_node_whatever_the_task_order(tmp_path, srun):
    check = run_check(tmp_path, srun, ["n1", "n2", "n3"], {"n1": "fail", "n3": "silent"},
                      FAKE_SRUN_SLURM_CONF_ORDER="reversed")
    assert check.failed == {"n1": "gpu: memory errors on GPU 3"}     # task 2 ran on n1: its report says so
    assert check.passed == ["n2"] and list(check.unknown) == ["n3"]


def test_garbage_and_padded_labels_from_srun(tmp_path):
    report = SuiteReport("n02", Level.QUICK, (CheckResult("gpu", Status.FAIL, "XID 79"),), 0.0, 1.0).to_dict()
    lines = ["garbage without a label", " 0: {\"half a report\":", f" 1: {json.dumps(report)}",
             "12: task 12 is no task", "\x00\xff binary"]
    fake = script(tmp_path / "srun", "#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\nexit 1\n")
    nodes = [f"n{i:02d}" for i in range(1, 11)]        # ten tasks: srun pads the labels to two digits
    check = check_nodes(fake, nodes, {}, 30.0, ["true"])
    assert check.failed == {"n02": "gpu: XID 79"} and check.passed == []
    assert check.unknown["n01"] == 'no report from the node check: {"half a report":'
    assert check.unknown["n03"] == "no report from the node check: srun exit 1: (nothing)"
    assert len(check.unknown) == 9


def test_a_check_that_does_not_finish_is_killed_and_judges_nothing(tmp_path):
    fake = script(tmp_path / "srun", "#!/bin/sh\necho '0: started'\nsleep 30 &\nwait\n")
    check = check_nodes(fake, ["n1", "n2"], {}, 0.3, ["true"])
    assert check.passed == [] and check.failed == {}
    assert set(check.unknown) == {"n1", "n2"} and "did not finish within 0.3s (killed)" in check.unknown["n1"]


def test_srun_that_fails_or_is_missing(tmp_path):
    fake = script(tmp_path / "srun", "#!/bin/sh\n"
                  "echo 'srun: error: Unable to create step for job 7: Requested node configuration is not "
                  "available' >&2\nexit 1\n")
    check = check_nodes(fake, ["n1"], {}, 30.0, ["true"])
    assert check == NodeCheck(unknown={"n1": "no report from the node check: srun exit 1: srun: error: Unable to "
                                             "create step for job 7: Requested node configuration is not available"})
    check = check_nodes(str(tmp_path / "no-srun"), ["n1"], {}, 30.0, ["true"])
    assert list(check.unknown) == ["n1"] and "not installed" in check.unknown["n1"]


def test_the_default_command_is_this_installation_quick_json_check():
    command = default_command()
    assert command[1:] == ["deepcheck", "--level", "quick", "--json"]
    assert os.access(command[0], os.X_OK) and Path(command[0]).name == "hpresilience"

