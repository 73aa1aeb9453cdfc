"""`hpresilience status` and `history`: a real journal, Slurm behind a fake backend."""
import datetime as dt
import json
import re
import time
from typing import List, Optional, Tuple

import pytest
from click.testing import CliRunner

from hpresilience.cli import main, status_cmds
from hpresilience.controller.journal import Journal
from hpresilience.slurm import Job, Node, SlurmGateway, SlurmUnavailable


class FakeBackend:
    """The SlurmBackend protocol over a fixed list of nodes; writes are refused."""

    def __init__(self, nodes: List[Node], error: Optional[Exception] = None):
        self._nodes = nodes
        self.error = error

    def version(self) -> Tuple[int, int, int]:
        return (23, 11, 4)

    def slurm_user(self) -> str:
        return "slurm"

    def show_nodes(self, nodes: Optional[str] = None) -> List[Node]:
        if self.error:
            raise self.error
        return list(self._nodes)

    def show_jobs(self, job_id: Optional[int] = None) -> List[Job]:
        return []

    def update_nodes(self, nodes, state, reason):
        raise AssertionError("status must not change Slurm")

    reboot_nodes = requeue_job = update_job = update_nodes


NODES = [
    Node("n1", "IDLE"),
    Node("n2", "ALLOCATED"),
    Node("n3", "MIXED", flags=frozenset({"DRAIN"}), reason="Action: Reboot; XID 79 GPU fell off the bus"),
    Node("n4", "IDLE", flags=frozenset({"FAIL"}), reason="Action: Replace; XID 74 NVLink error"),
    Node("n5", "DOWN", flags=frozenset({"NOT_RESPONDING"}), reason="Not responding"),
    Node("n6", "IDLE", flags=frozenset({"DRAIN"}), reason="admin: new firmware"),
    Node("n7", "IDLE"),      # in service, but a workflow is verifying it
    Node("n8", "IDLE", flags=frozenset({"REBOOT_ISSUED"})),
]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A config naming a journal in tmp_path, and the gateway `status` builds replaced by the fake."""
    config = tmp_path / "controller.toml"
    config.write_text(f'[controller]\nstate_dir = "{tmp_path / "state"}"\n')
    backend = FakeBackend(NODES)
    monkeypatch.setattr(status_cmds, "make_gateway", lambda _config: SlurmGateway(backend=backend))
    return config, backend


def journal(config) -> Journal:
    return Journal(config.parent / "state" / "journal.sqlite")


def run(*args):
    return CliRunner().invoke(main, list(args))


def run_split(*args):
    """stdout and stderr apart (click 8.2+ always keeps them apart; 8.1 needs mix_stderr=False)."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, list(args))


def populate(config, clock):
    """n3 draining for a reboot, n7 verifying; n4 replaced earlier and done; n9 (gone from Slurm) active."""
    j = journal(config)
    j.clock = clock
    wf = j.open_workflow("n4", "replace", "Action: Replace; XID 74 NVLink error", "wait_jobs", detected_at=clock() - 60)
    j.advance(wf.id, "wait_jobs", "replacing", {"spare": "n99"})
    gate = {"level": "full", "status": "fail", "checks": {"dcgm": "fail"}, "failed": ["dcgm: memory failed on GPU 3"]}
    j.record("n4", "deepcheck", gate, wf.id)
    j.advance(wf.id, "replacing", "in_service", {"deepcheck": gate}, status="done")
    j.open_workflow("n3", "reboot", "Action: Reboot; XID 79 GPU fell off the bus", "wait_jobs", detected_at=clock())
    wf7 = j.open_workflow("n7", "reboot", "Action: Reboot; XID 48", "wait_jobs", detected_at=clock())
    j.advance(wf7.id, "wait_jobs", "verifying")
    j.open_workflow("n9", "replace", "Action: Replace", "replacing", detected_at=clock())
    return j


def test_status_table_lists_out_of_service_and_workflow_nodes_only(cluster):
    config, _ = cluster
    now = time.time()
    populate(config, lambda: now - 192.4).close()
    result = run("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "STEP", "ACTION", "SINCE", "DEEPCHECK", "REASON"]
    listed = [line.split()[0] for line in lines[1:-2]]
    assert listed == ["n3", "n4", "n5", "n6", "n7", "n8", "n9"]   # n1, n2: in service, no workflow
    row = {line.split()[0]: line for line in lines[1:-2]}
    assert re.match(r"n3\s+MIXED\+DRAIN\s+wait_jobs\s+reboot\s+3m1\ds\s+-\s+"
                    r"Action: Reboot; XID 79 GPU fell off the bus$", row["n3"])
    # its workflow is done; its last deep check (issue 10) shows
    assert re.match(r"n4\s+IDLE\+FAIL\s+-\s+-\s+-\s+fail full 3m1\ds ago: dcgm\s+Action: Replace", row["n4"])
    assert re.match(r"n7\s+IDLE\s+verifying\s+reboot\s+3m1\ds", row["n7"])
    assert re.match(r"n9\s+\(not in Slurm\)\s+replacing\s+replace", row["n9"])
    assert lines[-2] == ("8 nodes: 2 idle, 1 allocated, 0 mixed; 2 drained, 1 failed, 1 down, "
                         "1 other out of service. Workflows: 3 active (1 replacing, 1 verifying, 1 wait_jobs)")
    assert lines[-1] == "Circuit breaker: not tripped"


def test_status_all_lists_every_node(cluster):
    config, _ = cluster
    journal(config).close()
    result = run("status", "--config", str(config), "--all")
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines()[1:-2]] == [n.name for n in NODES]


def test_status_shows_a_tripped_breaker_and_how_to_resume(cluster):
    config, _ = cluster
    j = journal(config)
    j.clock = lambda: dt.datetime(2026, 11, 22, 10, 3, 12).timestamp()
    j.trip_breaker("25 nodes flagged in 300s")
    j.close()
    result = run("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(
        "PAUSED: circuit breaker tripped 2026-11-22 10:03:12 (")
    assert result.output.splitlines()[-1].endswith(
        "ago): 25 nodes flagged in 300s — run `hpresilience controller resume`")


def test_status_json_shape(cluster):
    config, _ = cluster
    now = time.time()
    j = populate(config, lambda: now - 30)
    j.trip_breaker("too many")
    j.close()
    result = run("status", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) == {"nodes", "summary", "breaker"}
    n3 = next(r for r in out["nodes"] if r["node"] == "n3")
    assert n3["state"] == "MIXED+DRAIN" and n3["step"] == "wait_jobs" and n3["action"] == "reboot"
    assert n3["step_since"] == pytest.approx(now - 30) and 29 <= n3["step_seconds"] < 60
    assert dt.datetime.fromisoformat(n3["step_since_iso"]).timestamp() == pytest.approx(now - 30, abs=1)
    assert out["summary"] == {"total": 8, "idle": 2, "allocated": 1, "mixed": 0, "drained": 2, "failed": 1,
                              "down": 1, "other": 1,
                              "workflows": {"wait_jobs": 1, "verifying": 1, "replacing": 1},
                              "journal": str(config.parent / "state" / "journal.sqlite")}
    assert out["breaker"]["tripped"] is True and out["breaker"]["detail"] == "too many"
    assert out["breaker"]["tripped_at"] == pytest.approx(now - 30) and out["breaker"]["tripped_at_iso"]


def test_status_without_a_journal_still_shows_slurm_and_creates_nothing(cluster):
    config, _ = cluster
    result = run("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "no controller journal at" in result.output and "no controller has run" in result.output
    assert "n3" in result.output and "Workflows: 0 active" in result.output
    assert "Circuit breaker: unknown (no journal)" in result.output
    assert not (config.parent / "state").exists()
    out = json.loads(run_split("status", "--config", str(config), "--json").stdout)
    assert out["summary"]["journal"] is None and out["breaker"]["tripped"] is None


def test_status_slurm_unreachable_is_one_line_and_exit_2(cluster):
    config, backend = cluster
    backend.error = SlurmUnavailable(["scontrol", "-o", "show", "node"], 1,
                                     "slurm_load_node error:\n Unable to contact slurm controller",
                                     what="slurmctld unreachable")
    result = run("status", "--config", str(config))
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith("hpresilience: cannot read nodes from Slurm: scontrol -o show node failed")
    assert "Unable to contact slurm controller" in result.output


@pytest.mark.parametrize("command", ["status", "history"])
def test_bad_or_missing_config_exits_2(tmp_path, command, cluster):
    bad = tmp_path / "bad.toml"
    bad.write_text("[controller]\nmode = 'sometimes'\n")
    result = run(command, "--config", str(bad))
    assert result.exit_code == 2
    assert "bad configuration" in result.output and "sometimes" in result.output
    result = run(command, "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 2 and "file not found" in result.output


def test_history_table_and_filters(cluster):
    config, _ = cluster
    now = time.time()
    populate(config, lambda: now - 7200).close()
    j = journal(config)
    j.clock = lambda: now - 60
    wf = j.open_workflow("n5", "power_cycle", "Not responding", "power_cycling", detected_at=now - 100)
    j.advance(wf.id, "power_cycling", "in_service", status="done")
    j.close()

    result = run("history", "--config", str(config))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "NODE", "ACTION", "STATUS", "STEP", "DETECTED", "FINISHED", "TO_SERVICE",
                                "DEEPCHECK", "REASON"]
    assert [line.split()[1] for line in lines[1:]] == ["n4", "n3", "n7", "n9", "n5"]   # newest last
    assert re.search(r"n4\s+replace\s+done\s+in_service\s+\S+ \S+\s+\S+ \S+\s+1m00s\s+fail full: dcgm\s+"
                     r"Action: Replace", lines[1])
    assert re.search(r"n5\s+power_cycle\s+done\s+in_service\s+.*\s+40s\s+-\s+Not responding$", lines[5])
    assert re.search(r"n3\s+reboot\s+active\s+wait_jobs\s+\S+ \S+\s+-\s+-\s+-\s+Action: Reboot", lines[2])

    result = run("history", "--config", str(config), "--node", "n3")
    assert [line.split()[1] for line in result.output.splitlines()[1:]] == ["n3"]
    result = run("history", "--config", str(config), "--since", "30m")
    assert [line.split()[1] for line in result.output.splitlines()[1:]] == ["n5"]
    iso = dt.datetime.fromtimestamp(now - 3600).isoformat(timespec="minutes")
    result = run("history", "--config", str(config), "--since", iso)
    assert [line.split()[1] for line in result.output.splitlines()[1:]] == ["n5"]
    result = run("history", "--config", str(config), "--since", "1d", "--node", "n7")
    assert [line.split()[1] for line in result.output.splitlines()[1:]] == ["n7"]
    result = run("history", "--config", str(config), "--node", "n42")
    assert result.exit_code == 0 and result.output == "No workflows for that node.\n"


def test_history_json_has_events_with_times(cluster):
    config, _ = cluster
    now = time.time()
    j = populate(config, lambda: now - 100)
    j.trip_breaker("unrelated")       # not a workflow's event
    j.close()
    result = run("history", "--config", str(config), "--json", "--node", "n4")
    assert result.exit_code == 0, result.output
    (wf,) = json.loads(result.output)
    assert wf["node"] == "n4" and wf["status"] == "done" and wf["action"] == "replace"
    assert wf["time_to_service_seconds"] == pytest.approx(60) and wf["data"]["spare"] == "n99"
    assert wf["data"]["deepcheck"]["failed"] == ["dcgm: memory failed on GPU 3"]
    assert wf["detected_at"] == pytest.approx(now - 160) and wf["finished_at"] == pytest.approx(now - 100)
    assert dt.datetime.fromisoformat(wf["finished_at_iso"]).timestamp() == pytest.approx(now - 100, abs=1)
    assert [e["kind"] for e in wf["events"]] == ["started", "step", "deepcheck", "step"]
    assert wf["events"][1]["detail"]["to"] == "replacing" and wf["events"][1]["at"] == pytest.approx(now - 100)
    assert wf["events"][1]["at_iso"]
    everything = json.loads(run("history", "--config", str(config), "--json").output)
    assert [w["node"] for w in everything] == ["n4", "n3", "n7", "n9"]
    assert [len(w["events"]) for w in everything] == [4, 1, 2, 1]


@pytest.mark.parametrize("value", ["yesterday", "2h30", "-1h", "2026-13-01", "5y"])
def test_history_since_rejects_bad_values_naming_them(cluster, value):
    config, _ = cluster
    result = run("history", "--config", str(config), "--since", value)
    assert result.exit_code == 2
    assert "Invalid value for '--since'" in result.output and repr(value) in result.output


def test_history_without_a_journal(cluster):
    config, _ = cluster
    result = run_split("history", "--config", str(config), "--json")
    assert result.exit_code == 0 and result.stdout == "[]\n"
    assert "no controller journal at" in result.stderr
    assert not (config.parent / "state").exists()


@pytest.mark.parametrize("seconds, text", [(None, "-"), (0, "0s"), (59.9, "59s"), (192, "3m12s"),
                                           (3600, "1h00m"), (90061, "1d01h")])
def test_human_duration(seconds, text):
    assert status_cmds.human_duration(seconds) == text
