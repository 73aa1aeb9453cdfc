"""deploy/prometheus/alerts.yml (issue 12): valid rules, and each alert fires when it should and not
otherwise, by promtool's own unit tests (alerts_test.yml). promtool comes from Debian's prometheus
package, which scripts/lib/setup.sh installs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: ./scripts/test installs it (apt-get install prometheus)"
    return subprocess.run([exe, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_rules_are_valid():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_fires_in_promtools_unit_tests():
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in yaml.safe_load((RULES / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested, f"alerts without a firing test: {sorted(alerts - tested)}"


def test_the_example_scrape_configuration_is_valid():
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_file_sd_targets_from_sinfo(tmp_path):
    """One target per node at the agent's port, its partitions as a label (sinfo prints a node once
    per partition, the default one with a '*'); none for nodes powered off or powering down."""
    fake = tmp_path / "sinfo"
    fake.write_text("#!/bin/sh\nprintf 'n1 train* idle\\nn1 debug idle\\nn2 train* drain*\\n"
                    "n3 train* idle~\\nn4 train* idle%%\\n'\n")
    fake.chmod(0o755)
    out = tmp_path / "agents.json"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run([str(RULES / "slurm-file-sd"), str(out), "9464"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == [{"targets": ["n1:9464"], "labels": {"partition": "debug,train"}},
                                           {"targets": ["n2:9464"], "labels": {"partition": "train"}}]
    assert list(tmp_path.glob(".hpr-file-sd.*")) == []
