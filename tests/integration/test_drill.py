"""Issue 13: `hpresilience drill` on the real test cluster passes every scenario with its report's
invariants checked: the agents' drill injection (root-only socket), a node's power loss, slurmctld
restarted mid-job, the controller SIGKILLed mid-workflow, and no spare capacity, each under a
canary `srun --auto-resume` job that must finish at its final step. A fifth node carries an
admin's reason the drill must leave exactly as it was."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from hpresilience.drill.engine import SCENARIOS
from hpresilience.drill.result import load_result
from hpresilience.slurm import NodeState, SlurmGateway

from .conftest import REPO, LiveCluster, private_cluster

PORT_BASE = 22000
ADMIN_REASON = "disk swap, ticket 4242 (Ann)"


@pytest.fixture(scope="module")
def drill_cluster(tmp_path_factory) -> Iterator[LiveCluster]:
    # The srun shim first on PATH, as on a site that installed it: the canaries' batch scripts
    # (--export=ALL) run `srun --auto-resume`.
    path = f"{REPO / 'scripts'}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    with private_cluster(tmp_path_factory, "drill", 5, PORT_BASE, "--agents", "--controller",
                         env={"PATH": path}) as c:
        # The drill measures the product, not the deep-check gate (its own tests are test_controller's);
        # a 2 s grace before a silent node's power cycle keeps power_loss short (issue 13: suite time).
        conf = c.dir / "controller.toml"
        text = conf.read_text().replace("unresponsive_grace_seconds = 30", "unresponsive_grace_seconds = 2")
        gate_off = '[deepcheck]\nafter_reboot = "none"\nafter_power_cycle = "none"\nafter_replace = "none"\n'
        conf.write_text(text.replace("[deepcheck]\n", gate_off))
        c.tc("controller", "stop")
        c.tc("controller", "start")
        yield c


def drill_config(c: LiveCluster, path: Path) -> Path:
    """The cluster's own drill configuration (testcluster drill-config), as the demo uses it."""
    c.tc("drill-config", "--out", str(path))
    return path


def test_the_drill_passes_every_scenario_with_its_invariants_checked(drill_cluster, tmp_path):
    gw = SlurmGateway()
    gw.set_state("n5", NodeState.DRAIN, ADMIN_REASON)
    before = gw.node("n5")
    out = tmp_path / "drill"
    done = subprocess.run(["hpresilience", "drill", "--nodes", "n[1-4]", "--id", "t13",
                           "--config", str(drill_config(drill_cluster, tmp_path / "drill.toml")), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    result = load_result(out / "report.json")
    assert result.passed and [s.name for s in result.scenarios] == list(SCENARIOS)
    by_name = {s.name: s for s in result.scenarios}
    for s in result.scenarios:
        assert s.passed and s.checks and all(c.passed for c in s.checks), s
        if SCENARIOS[s.name].node_fault:   # each fact of a node fault was seen, in a sensible order
            t = s.times
            assert None not in (t.detect_seconds, t.stop_seconds, t.resume_seconds, t.repair_seconds), s
            assert t.stop_seconds <= t.resume_seconds, s
    assert by_name["slurmctld_restart"].steps_redone == 0
    # The admin's reason on a node outside the drill, and the invariant that says so.
    after = gw.node("n5")
    assert (after.reason, after.reason_user, after.reason_time) == (before.reason, before.reason_user,
                                                                    before.reason_time)
    [untouched] = [i for i in result.invariants if i.name == "no reason we did not write was changed"]
    assert untouched.passed and "1 such reason" in untouched.detail
    # The drill id is in the reasons the agents wrote, so in the controller's history.
    history = subprocess.run(["hpresilience", "history", "--config",
                              str(drill_cluster.dir / "controller.toml"), "--json"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    drilled = [w for w in json.loads(history) if "DRILL t13" in w["reason"]]
    assert {w["action"] for w in drilled} >= {"reboot", "replace"}
    # Markdown, JSON and the page with one timeline per scenario.
    html = (out / "report.html").read_text()
    assert html.count("<svg") == len(SCENARIOS) and (out / "report.md").exists()
