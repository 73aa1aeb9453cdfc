"""The quick node check of hang detection (issue 11): a fake `srun` script in tmp_path runs the
check command once per node with SLURMD_NODENAME set and writes each node's output to the file
`--output=...%N...` names, as Slurm does."""
import json
import os
import sys
from pathlib import Path

import pytest

from hpresilience.autoresume.node_check import NodeCheck, check_nodes, default_command
from hpresilience.deepcheck.result import CheckResult, Level, Status, SuiteReport

FAKE_SRUN = """\
#!{python}
# srun -N k -n k -w NODES --ntasks-per-node=1 --output=DIR/TAG-%N.out --kill-on-bad-exit=0 COMMAND...
import json, os, subprocess, sys
from hpresilience.slurm.hostlist import expand
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_ARGV"], "w") as f:
    json.dump(args, f)
i = 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-N", "-n", "-w") else 1
nodes, command = expand(args[args.index("-w") + 1]), args[i:]
pattern = next(a[len("--output="):] for a in args if a.startswith("--output="))
worst = 0
for task, node in enumerate(nodes):
    with open(pattern.replace("%N", node), "w") as out:
        done = subprocess.run(command, env={{**os.environ, "SLURMD_NODENAME": node}}, stdout=out, stderr=out)
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
evidence = {"raw": os.environ.get("FAKE_PADDING", "")}   # a long report (dcgmi's is ~1.3 kB)
results = (CheckResult("nvml", Status.PASS, "ok", evidence=evidence), CheckResult("gpu", status, summary))
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
    full_env = {"FAKE_SRUN_ARGV": str(tmp_path / "argv.json"), "FAKE_VERDICTS": json.dumps(verdicts),
                "SLURM_JOB_ID": "7", **env}
    return check_nodes(srun, nodes, full_env, timeout, command, tmp_path)


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
    assert argv[:7] == ["-N", "5", "-n", "5", "-w", "n[1-5]", "--ntasks-per-node=1"]
    assert argv[7] == f"--output={tmp_path}/node-check-7-{os.getpid()}-%N.out"
    assert argv[8] == "--kill-on-bad-exit=0" and argv[9:11] == [sys.executable, "-c"]
    assert not list(tmp_path.glob("node-check-*.out"))   # read and removed


def test_a_long_report_is_read_whole(tmp_path, srun):
    """srun --label cut a ~1.3 kB DCGM report into labelled pieces on the test cluster (issue 11):
    the node's FAIL went unseen. Its own output file holds the line whole."""
    check = run_check(tmp_path, srun, ["n1", "n2"], {"n2": "fail"}, FAKE_PADDING="x" * 5000)
    assert check.failed == {"n2": "gpu: memory errors on GPU 3"} and check.passed == ["n1"]


def test_a_report_left_by_an_earlier_check_is_not_this_ones(tmp_path, srun):
    stale = tmp_path / f"node-check-7-{os.getpid()}-n1.out"
    stale.write_text(json.dumps(SuiteReport("n1", Level.QUICK, (CheckResult("gpu", Status.PASS, "ok"),),
                                            0.0, 1.0).to_dict()))
    fake = script(tmp_path / "srun-dies", "#!/bin/sh\necho 'srun: error: Unable to create step' >&2\nexit 1\n")
    check = check_nodes(fake, ["n1"], {"SLURM_JOB_ID": "7"}, 30.0, ["true"], tmp_path)
    assert check.passed == [] and "Unable to create step" in check.unknown["n1"]


def test_a_check_that_does_not_finish_is_killed_and_judges_nothing(tmp_path):
    fake = script(tmp_path / "srun", "#!/bin/sh\necho started\nsleep 30 &\nwait\n")
    check = check_nodes(fake, ["n1", "n2"], {}, 0.3, ["true"], tmp_path)
    assert check.passed == [] and check.failed == {}
    assert set(check.unknown) == {"n1", "n2"} and "did not finish within 0.3s (killed)" in check.unknown["n1"]


def test_srun_that_fails_or_is_missing(tmp_path):
    fake = script(tmp_path / "srun", "#!/bin/sh\n"
                  "echo 'srun: error: Unable to create step for job 7: Requested node configuration is not "
                  "available' >&2\nexit 1\n")
    check = check_nodes(fake, ["n1"], {}, 30.0, ["true"], tmp_path)
    assert check == NodeCheck(unknown={"n1": "no report from the node check: srun exit 1: srun: error: Unable to "
                                             "create step for job 7: Requested node configuration is not available"})
    check = check_nodes(str(tmp_path / "no-srun"), ["n1"], {}, 30.0, ["true"], tmp_path)
    assert list(check.unknown) == ["n1"] and "not installed" in check.unknown["n1"]


def test_the_default_command_is_this_installation_quick_json_check():
    command = default_command()
    assert command[1:] == ["deepcheck", "--level", "quick", "--json"]
    assert os.access(command[0], os.X_OK) and Path(command[0]).name == "hpresilience"

