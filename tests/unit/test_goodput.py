"""`hpresilience goodput`: the simulator's validation (issue 13; tolerances as in docs/goodput.md).

- no failures: goodput = 1 - checkpoint overhead, to 1e-9;
- the simulated optimum interval within 15% of Daly's (2006), and goodput at Young's and at
  Daly's interval within 0.5% (relative) of the simulated optimum's;
- at Llama 3's scale and duration with the default table: mean interruptions over 20 runs within
  5% of the paper's 466, and goodput over 90% (the paper: "higher than 90% effective training time");
- the simulated goodput within 1% (relative) of Daly's analytic model when spares are enough.
"""
import json
import math

import pytest
from click.testing import CliRunner

from hpresilience.cli.goodput_cmds import goodput
from hpresilience.goodput.optimise import (
    arrivals,
    best_interval,
    daly,
    daly_goodput,
    mean_goodput,
    mtbf,
    simulate_all,
    young,
)
from hpresilience.goodput.rates import LLAMA3_INTERRUPTIONS, LLAMA3_TABLE, RateTable, llama3, load_rates
from hpresilience.goodput.report import SCHEMA
from hpresilience.goodput.sim import DEFAULT_REMEDIES, RemedyTimes, RunSetup, simulate

DAY = 86400.0
NO_FAILURES = RateTable("none", ())


def setup(**changes) -> RunSetup:
    values = dict(gpus=16384, gpus_per_node=8, interval=450.0, checkpoint_cost=10.0, restart_cost=120.0,
                  remedies=DEFAULT_REMEDIES, spares=1000, budget=54 * DAY)
    values.update(changes)
    return RunSetup(**values)


def invoke(*args: str):
    return CliRunner().invoke(goodput, list(args), prog_name="hpresilience goodput")


def closes(r) -> float:
    return r.useful + r.checkpoint + r.waiting + sum(r.redone.values()) + sum(r.down.values()) - r.wall


# ------------------------------------------------------------ no failures
@pytest.mark.parametrize("budget", [100 * 110.0, 12345.6])
def test_without_failures_goodput_is_one_minus_checkpoint_overhead(budget):
    s = setup(interval=100.0, checkpoint_cost=10.0, budget=budget)
    r = simulate(s, arrivals(NO_FAILURES, s.gpus, 0, 1)[0])
    assert r.checkpoint > 0 and not r.interruptions
    assert r.goodput == pytest.approx(1 - r.checkpoint / budget, abs=1e-9)
    if budget == 100 * 110.0:   # a whole number of periods: exactly the steady-state overhead
        assert r.goodput == pytest.approx(1 - 10.0 / 110.0, abs=1e-9)


def test_without_failures_a_work_target_takes_work_plus_its_checkpoints():
    s = setup(interval=100.0, checkpoint_cost=10.0, budget=None, work_target=5000.0)
    r = simulate(s, arrivals(NO_FAILURES, s.gpus, 0, 1)[0])
    assert r.wall == pytest.approx(5500.0) and r.goodput == pytest.approx(1 - 10.0 / 110.0, abs=1e-9)


# ------------------------------------------------------------ exact timelines
REMEDIES = {"replace": RemedyTimes(detect=5, resume=30, repair=1000),
            "restart": RemedyTimes(detect=50, resume=100, repair=0)}


@pytest.mark.parametrize("failures, spares, expected", [
    # 2 periods saved, 30 s redone; 30 s to relaunch + 20 s restart; 700 s run: 6 periods and 40 s in progress
    ([(250, "gpu", "replace")], 1, dict(useful=840, checkpoint=80, redone=30, down=50, waiting=0)),
    # no spare: the job waits for the node (back at 1250 s) until the end of the budget
    ([(250, "gpu", "replace")], 0, dict(useful=200, checkpoint=20, redone=30, down=30, waiting=720)),
    # a second fault during the recovery starts it over: 10 s to the first cause, 100 + 20 s to the second
    ([(250, "gpu", "replace"), (260, "bug", "restart")], 1,
     dict(useful=770, checkpoint=70, redone=30, down=130, waiting=0)),
])
def test_a_timeline_is_accounted_exactly(failures, spares, expected):
    s = setup(interval=100.0, checkpoint_cost=10.0, restart_cost=20.0, remedies=REMEDIES, spares=spares,
              budget=1000.0)
    r = simulate(s, failures + [(math.inf, "", "")])
    got = dict(useful=r.useful, checkpoint=r.checkpoint, redone=sum(r.redone.values()), down=sum(r.down.values()),
               waiting=r.waiting)
    assert got == pytest.approx(expected)


def test_a_planned_stop_checkpoints_first_and_loses_no_training():
    table = RateTable("planned only", tuple(c for c in llama3().causes if c.remedy == "planned"))
    results = simulate_all(setup(), arrivals(table, 16384, 0, 3))
    assert all(r.interruptions and sum(r.down.values()) > 0 for r in results)
    assert all(sum(r.redone.values()) == 0 for r in results)


def test_every_second_is_accounted_and_too_few_spares_make_the_job_wait():
    enough, none = (simulate_all(setup(spares=n), arrivals(llama3(), 16384, 0, 3)) for n in (1000, 0))
    for r in enough + none:
        assert abs(closes(r)) < 1e-6 * r.wall
    assert all(sum(r.interruptions.values()) > 400 and r.waiting == 0 for r in enough)
    assert all(r.waiting > DAY for r in none)


# ------------------------------------------------------------ Llama 3 at its scale (the CLI's defaults)
@pytest.fixture(scope="module")
def llama() -> dict:
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_llama3_interruption_count_and_effective_training_time(llama):
    assert llama["inputs"]["gpus"] == 16384 and llama["inputs"]["budget_seconds"] == 54 * DAY
    assert llama["inputs"]["runs"] == 20
    assert llama["interruptions"]["mean"] == pytest.approx(LLAMA3_INTERRUPTIONS, rel=0.05)
    assert llama["goodput"]["mean"] > 0.90


def test_llama3_optimum_agrees_with_young_and_daly(llama):
    interval = llama["interval"]
    assert interval["optimum_seconds"] == pytest.approx(interval["daly_seconds"], rel=0.15)
    for formula in ("young", "daly"):
        assert interval[f"{formula}_goodput"] == pytest.approx(interval["optimum_goodput"], rel=0.005)
    assert llama["inputs"]["checkpoint_interval_from"] == "optimum"
    assert llama["inputs"]["checkpoint_interval_seconds"] == interval["optimum_seconds"]


def test_llama3_spares_poisson_and_simulated_agree(llama):
    spares = llama["spares"]
    assert spares["poisson"] > 0 and abs(spares["poisson"] - spares["simulated"]) <= 2
    assert llama["inputs"]["spares"] == spares["poisson"]


def test_json_schema_is_stable(llama):
    assert llama["schema"] == SCHEMA
    assert set(llama) == {"schema", "inputs", "goodput", "wall_seconds", "interruptions", "lost_seconds",
                          "interval", "spares"}
    assert set(llama["goodput"]) == {"mean", "min", "max", "daly_model"}
    assert set(llama["interruptions"]) == {"mean", "expected"}
    assert set(llama["lost_seconds"]) == {"by_cause", "checkpoints", "waiting_for_spares"}
    assert {name for name, _, _ in LLAMA3_TABLE} == set(llama["lost_seconds"]["by_cause"])
    assert all(set(v) == {"interruptions", "redone_seconds", "down_seconds"}
               for v in llama["lost_seconds"]["by_cause"].values())
    assert set(llama["interval"]) == {"mtbf_seconds", "optimum_seconds", "optimum_goodput", "young_seconds",
                                      "young_goodput", "daly_seconds", "daly_goodput"}
    assert set(llama["spares"]) == {"probability", "mean_nodes_out", "poisson", "simulated"}
    assert set(llama["inputs"]) == {"gpus", "gpus_per_node", "nodes", "budget_seconds", "work_target_seconds",
                                    "seed", "runs", "checkpoint_interval_seconds", "checkpoint_interval_from",
                                    "checkpoint_cost_seconds", "restart_cost_seconds", "spares",
                                    "spare_probability", "remedies", "time_sources", "rates"}


# ------------------------------------------------------------ against the analytic model
def test_simulation_matches_dalys_model_when_spares_are_enough():
    s = setup(interval=daly(10.0, mtbf(setup(), llama3())))
    assert mean_goodput(s, arrivals(llama3(), 16384, 1, 10)) == pytest.approx(daly_goodput(s, llama3()), rel=0.01)


def test_optimum_agrees_with_daly_when_checkpoints_are_costly():
    """Checkpoint cost 300 s: Daly's correction to Young is about 8% here."""
    s = setup(checkpoint_cost=300.0)
    streams = arrivals(llama3(), 16384, 2, 8)
    optimum = best_interval(s, llama3(), streams)
    m = mtbf(s, llama3())
    assert optimum.interval == pytest.approx(daly(300.0, m), rel=0.15)
    assert young(300.0, m) > daly(300.0, m) * 1.05
    at_daly = mean_goodput(setup(checkpoint_cost=300.0, interval=daly(300.0, m)), streams)
    assert at_daly == pytest.approx(optimum.goodput, rel=0.005)


def test_no_failures_no_optimum_the_interval_must_be_given(tmp_path):
    rates = tmp_path / "none.toml"
    rates.write_text('source = "a quiet cluster"\n[causes."faulty GPU"]\nrate_per_gpu_hour = 0\n')
    result = invoke("--rates", str(rates), "--gpus", "64", "--runs", "1")
    assert result.exit_code == 2 and "give --checkpoint-interval" in result.output
    result = invoke("--rates", str(rates), "--gpus", "64", "--runs", "1", "--checkpoint-interval", "10", "--json")
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["lost_seconds"]["checkpoints"] > 0 and p["interval"]["optimum_seconds"] is None
    assert p["goodput"]["mean"] == pytest.approx(1 - p["lost_seconds"]["checkpoints"] / p["wall_seconds"], abs=1e-9)


# ------------------------------------------------------------ the CLI
SMALL = ("--gpus", "1024", "--days", "10", "--runs", "3")


def test_same_seed_same_result_other_seed_other_result():
    first, again, other = (invoke(*SMALL, "--seed", seed, "--json") for seed in ("7", "7", "8"))
    assert first.exit_code == 0, first.output
    assert first.output == again.output
    assert json.loads(first.output)["goodput"] != json.loads(other.output)["goodput"]


def test_text_report_names_the_source_the_optimum_and_the_spares():
    result = invoke(*SMALL, "--checkpoint-interval", "20")
    assert result.exit_code == 0, result.output
    assert "The Llama 3 Herd of Models" in result.output
    assert "checkpoint every 20.0 min (given)" in result.output
    for line in ("simulated optimum", "Young (1974)", "Daly (2006)", "spare nodes for full size 99.00%"):
        assert line in result.output


def drill_report(tmp_path, scenarios):
    """A drill report.json as `hpresilience drill` writes it, with these scenarios."""
    path = tmp_path / "report.json"
    path.write_text(json.dumps({
        "drill": "t", "started_at": 1.0, "finished_at": 2.0, "cluster": "test",
        "canary": {"nodes": "n[1-4]", "command": "canary", "final_step_expected": 30, "final_step_seen": 30},
        "scenarios": [{"checks": [], **s} for s in scenarios]}))
    return path


def test_drill_report_medians_replace_the_default_times(tmp_path):
    """Detect and resume from the passed scenarios; repair stays the site's (here --repair)."""
    report = drill_report(tmp_path, [
        {"name": "xid74_replace", "passed": True, "times": {"detect_seconds": 2, "stop_seconds": 3,
                                                            "resume_seconds": 40, "repair_seconds": 90}},
        {"name": "xid73_reboot", "passed": True, "times": {"detect_seconds": 4, "resume_seconds": 60,
                                                           "repair_seconds": 70}},
        {"name": "no_spare_capacity", "passed": True, "times": {"resume_seconds": 1000}},
        {"name": "power_loss", "passed": False, "times": {"detect_seconds": 900, "resume_seconds": 5000},
         "checks": [{"name": "training resumed after the fault", "passed": False}]},
    ])
    result = invoke(*SMALL, "--drill-report", str(report), "--repair", "600", "--json")
    assert result.exit_code == 0, result.output
    inputs = json.loads(result.output)["inputs"]
    assert inputs["remedies"]["replace"] == {"detect_seconds": 3.0, "resume_seconds": 60.0, "repair_seconds": 600.0}
    assert inputs["remedies"]["reboot"] == inputs["remedies"]["replace"]
    assert inputs["remedies"]["restart"]["resume_seconds"] == DEFAULT_REMEDIES["restart"].resume
    assert inputs["time_sources"] == {"detect": f"{report} (median of 2 scenario(s))",
                                      "resume": f"{report} (median of 3 scenario(s))", "repair": "--repair"}


def test_a_drill_reports_repair_time_is_not_projected(tmp_path):
    report = drill_report(tmp_path, [{"name": "xid74_replace", "passed": True,
                                      "times": {"detect_seconds": 1, "resume_seconds": 2, "repair_seconds": 9}}])
    result = invoke(*SMALL, "--drill-report", str(report), "--json")
    assert result.exit_code == 0, result.output
    inputs = json.loads(result.output)["inputs"]
    assert inputs["remedies"]["replace"]["repair_seconds"] == DEFAULT_REMEDIES["replace"].repair
    assert inputs["time_sources"]["repair"] == "defaults"


def test_a_rates_file_gives_the_same_rates_as_the_default_table(tmp_path):
    rates = tmp_path / "llama.json"
    rates.write_text(json.dumps({"source": "Table 5 again", "gpus": 16384, "hours": 54 * 24,
                                 "causes": {name: {"count": count} for name, count, _ in LLAMA3_TABLE}}))
    assert load_rates(rates).causes == llama3().causes


@pytest.mark.parametrize("args, message", [
    (("--gpus", "0"), "'--gpus': 0 is not in the range x>=1"),
    (("--gpus", "100"), "--gpus (100) must be a multiple of --gpus-per-node (8)"),
    (("--checkpoint-cost", "-5"), "'--checkpoint-cost': -5.0 is not in the range x>0"),
    (("--restart-cost", "-1"), "'--restart-cost': -1.0 is not in the range x>=0"),
    (("--runs", "0"), "'--runs': 0 is not in the range x>=1"),
    (("--spare-probability", "1"), "'--spare-probability'"),
    (("--days", "1", "--work-days", "1"), "give --days or --work-days, not both"),
    (("--detect", "500"), "resume (180 s) is counted from the fault, so it cannot be shorter than detect (500 s)"),
])
def test_bad_options_are_named(args, message):
    result = invoke(*args)
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "source = \n", "not valid TOML"),
    ("bad.json", "{", "not valid JSON"),
    ("gremlin.toml", 'source = "s"\ngpus = 8\nhours = 1\n[causes.gremlins]\ncount = 1\n',
     "causes.gremlins: unknown cause: give its remedy"),
    ("remedy.toml", 'source = "s"\n[causes.x]\nrate_per_gpu_hour = 1e-6\nremedy = "pray"\n',
     "causes.x: remedy: expected one of replace, reboot, restart, planned, got 'pray'"),
    ("negative.toml", 'source = "s"\ngpus = 8\nhours = 1\n[causes.CPU]\ncount = -1\n',
     "causes.CPU: count: must be 0 or more, got -1"),
    ("exposure.toml", 'source = "s"\n[causes.CPU]\ncount = 1\n', "causes.CPU: a count needs the observed run's"),
    ("both.toml", 'source = "s"\n[causes.CPU]\ncount = 1\nrate_per_gpu_hour = 1.0\n', "exactly one of count"),
    ("key.toml", 'source = "s"\nsauce = 1\n[causes.CPU]\nrate_per_gpu_hour = 1.0\n', "unknown keys ['sauce']"),
    ("nosource.toml", '[causes.CPU]\nrate_per_gpu_hour = 1.0\n', "source: say where the numbers come from"),
    ("empty.toml", 'source = "s"\n', "causes: expected at least one cause"),
])
def test_bad_rates_files_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    result = invoke("--rates", str(path))
    assert result.exit_code == 2 and "'--rates'" in result.output and message in result.output, result.output


@pytest.mark.parametrize("data, message", [
    ({"scenario": []}, "missing"),
    ({"drill": "t", "started_at": 1, "finished_at": 2, "cluster": "c", "scenarios": "none",
      "canary": {"nodes": "n1", "command": "x", "final_step_expected": 1}}, "scenarios"),
])
def test_bad_drill_reports_are_named(tmp_path, data, message):
    path = tmp_path / "drill.json"
    path.write_text(json.dumps(data))
    result = invoke("--drill-report", str(path))
    assert result.exit_code == 2 and "'--drill-report'" in result.output and message in result.output, result.output


def test_a_drill_report_with_a_bad_time_names_the_field(tmp_path):
    report = drill_report(tmp_path, [{"name": "a", "passed": True, "times": {"detect_seconds": -1}}])
    result = invoke("--drill-report", str(report))
    assert result.exit_code == 2 and "scenarios[0].times.detect_seconds" in result.output, result.output


def test_work_target_runs_report_their_wall_clock():
    result = invoke("--gpus", "1024", "--work-days", "5", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    p = json.loads(result.output)
    assert p["inputs"]["budget_seconds"] is None and p["wall_seconds"] > 5 * DAY
    assert p["goodput"]["mean"] == pytest.approx(5 * DAY / p["wall_seconds"], rel=0.05)

