"""The drill engine's own logic (issue 13): the canary's lines read back, steps redone, the checks a
scenario gets, refusals, configuration errors. Real files in tmp_path and the in-memory Slurm model
for the gateway; the scenarios themselves run on the real cluster (tests/integration/test_drill.py)."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpresilience.cli import main
from hpresilience.config import ConfigError
from hpresilience.drill.config import DrillConfig
from hpresilience.drill.engine import SCENARIOS, Canary, Drill, DrillError, Timeline
from hpresilience.slurm import NodeState, SlurmGateway
from tests.slurm_model import SlurmModel


def canary(tmp_path: Path, lines) -> Canary:
    out = tmp_path / "canary.out"
    out.write_text("".join(f"step={s} host=n1 attempt={a} t={t:.3f}\n" for s, a, t in lines)
                   + "some other line\nstep=x host=n1 attempt=1 t=bad\n")
    return Canary(7, out, tmp_path / "result.json", tmp_path / "events.jsonl")


def drill(nodes: str = "n[1-4]") -> Drill:
    model = SlurmModel("n[1-5]")
    return Drill(SlurmGateway(model), DrillConfig(), [f"n{i}" for i in range(1, 5)] if nodes == "n[1-4]"
                 else nodes.split(","), Path("/nonexistent"))


def test_the_canarys_step_lines_are_read_and_other_lines_ignored(tmp_path):
    c = canary(tmp_path, [(1, "1", 100.0), (2, "1", 100.5)])
    assert c.steps() == [(1, "1", 100.0), (2, "1", 100.5)]


def test_steps_redone_are_the_steps_run_again_after_the_resume(tmp_path):
    # attempt 1 ran to step 7; attempt 2 resumed from the checkpoint at step 6 (first step 7): 1 redone
    lines = [(s, "1", 100.0 + s) for s in range(1, 8)] + [(s, "2", 120.0 + s) for s in range(7, 10)]
    t = Timeline()
    t.seen("fault_injected", 108.0)
    t.seen("training_resumed", 127.0)
    assert drill()._steps_redone(canary(tmp_path, lines), t) == 1


def test_a_resume_from_a_lost_checkpoint_fails_the_redone_check(tmp_path):
    """Issue 13 review: a resume from step 0 after 13 steps passed an allowance for the stop time
    (2 + ceil(6 s / 0.5 s) + 1 = 15 steps)."""
    lines = [(s, "1", 100.0 + s) for s in range(1, 14)] + [(s, "2", 120.0 + s) for s in range(1, 5)]
    t = Timeline()
    for name, at in [("fault_injected", 110.0), ("node_flagged", 110.5), ("step_stopped", 116.0),
                     ("training_resumed", 121.0), ("node_in_service", 130.0)]:
        t.seen(name, at)
    d = drill()
    d.finals, d.last_job = [], None
    result = d._result(SCENARIOS["xid74_replace"], "n2", canary(tmp_path, lines), t, [], "")
    [redone] = [c for c in result["checks"] if c["name"] == "no more steps redone than since the last checkpoint"]
    assert (redone["passed"], result["steps_redone"], result["passed"]) == (False, 13, False)


def test_a_drill_needs_four_nodes_and_knows_its_scenarios():
    with pytest.raises(DrillError, match="4 or more nodes"):
        drill("n1,n2,n3")
    with pytest.raises(DrillError, match="unknown scenario 'meteor'"):
        drill().run(["meteor"])


def test_drill_nodes_must_be_idle_and_in_service_first():
    d = drill()
    with d.gateway.backend.as_user("admin"):
        d.gateway.set_state("n2", NodeState.DRAIN, "disk swap")
    with pytest.raises(DrillError, match="n2 are not"):
        d.run(["xid74_replace"])


@pytest.mark.parametrize("text, key", [
    ("[canary]\nsteps = 3\n", "canary"),
    ("[canary]\nsbatch = \"/no/such/script\"\n", "canary"),
    ("[commands]\ninject = [\"\"]\n", "commands"),
    ("scenario_timeout_seconds = 0\n", "DrillConfig"),
    ("[commands]\nfly = []\n", "commands.fly"),
])
def test_a_bad_drill_file_names_what_is_wrong(tmp_path, text, key):
    path = tmp_path / "drill.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        DrillConfig.load(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_the_cli_lists_the_scenarios_and_refuses_without_nodes():
    runner = CliRunner()
    listed = runner.invoke(main, ["drill", "--list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in SCENARIOS)
    missing = runner.invoke(main, ["drill"])
    assert missing.exit_code == 2 and "--nodes is required" in missing.output
