"""The cluster all-reduce check's localisation (issue 10, deliverable 2): the pure search of
hpresilience/deepcheck/localise.py with synthetic measurements, its cost model, what a run's
output counts as (evidence or not), and the check's verdict. The real srun/torch path is
tests/integration/test_deepcheck_cluster.py."""
from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpresilience.deepcheck.cluster import (
    Runner,
    evaluate,
    interpret_nccl,
    interpret_worker,
    program,
    run_cluster_check,
    srun_argv,
)
from hpresilience.deepcheck.cluster_config import ClusterCheckConfig
from hpresilience.deepcheck.config import DeepCheckConfig
from hpresilience.deepcheck.localise import Criteria, Grade, Group, Measurement, Outcome, cost_model, localise
from hpresilience.deepcheck.result import Level, Status
from hpresilience.deepcheck.tool import ToolOutput
from hpresilience.slurm import SlurmGateway
from tests.slurm_model import SlurmModel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deep-checks"
ABSOLUTE = Criteria(min_busbw_gbps=5.0)
RELATIVE = Criteria(min_relative=0.5)


class Fabric:
    """A synthetic cluster: each node's speed (GB/s), some nodes that fail every collective, some
    down (their runs never start). A group runs at its slowest member's speed. Records every round."""

    def __init__(self, n: int, slow: Optional[Dict[str, float]] = None, failing: Set[str] = frozenset(),
                 down: Set[str] = frozenset(), speed: Callable[[str], float] = lambda node: 10.0):
        self.nodes = [f"n{i}" for i in range(1, n + 1)]
        self.speed = {node: speed(node) for node in self.nodes}
        self.speed.update(slow or {})
        self.failing, self.down = set(failing), set(down)
        self.rounds: List[List[Group]] = []

    def __call__(self, groups: Sequence[Group]) -> List[Measurement]:
        self.rounds.append(list(groups))
        return [self.one(g) for g in groups]

    def one(self, group: Group) -> Measurement:
        if self.down & set(group):
            return Measurement(Outcome.NOT_RUN, detail="srun: Required node not available (down)")
        if self.failing & set(group):
            return Measurement(Outcome.FAILED, detail="rank 1 on n?: Connection reset by peer")
        return Measurement(Outcome.OK, min(self.speed[n] for n in group))


def placements(max_n: int, bad_limit: Callable[[int], int], with_down: bool = False):
    """(n, bad nodes, down nodes, seed) with bad + down within bad_limit(n)."""
    @st.composite
    def draw(d):
        n = d(st.integers(2, max_n))
        budget = bad_limit(n)
        nodes = [f"n{i}" for i in range(1, n + 1)]
        chosen = d(st.lists(st.sampled_from(nodes), unique=True, max_size=max(budget, 0)))
        down_count = d(st.integers(0, len(chosen))) if with_down else 0
        return n, set(chosen[down_count:]), set(chosen[:down_count]), d(st.integers(0, 2**32))
    return draw()


def assert_disjoint_rounds(fabric: Fabric) -> None:
    for groups in fabric.rounds:   # a round's runs go at once: no node in two of them
        members = [n for g in groups for n in g]
        assert len(members) == len(set(members)), groups


# ------------------------------------------------------------------ the search


@settings(max_examples=300, deadline=None)
@given(placements(16, lambda n: n - 2))
def test_any_bad_nodes_are_named_exactly_with_the_absolute_criterion(case):
    """Failed or slow below min_busbw_gbps: exact whenever two healthy nodes exist."""
    n, bad, _, seed = case
    rng = random.Random(seed)
    failing = {b for b in bad if rng.random() < 0.5}
    fabric = Fabric(n, slow={b: 1.0 for b in bad - failing}, failing=failing,
                    speed=lambda node: rng.uniform(6, 12))
    found = localise(fabric.nodes, fabric, ABSOLUTE)
    assert set(found.culprits) == bad
    assert set(found.cleared) == set(fabric.nodes) - bad and not found.undetermined
    assert_disjoint_rounds(fabric)


@settings(max_examples=300, deadline=None)
@given(placements(40, lambda n: n // 2 - 1, with_down=True))
def test_slow_nodes_are_named_by_the_relative_criterion_and_down_nodes_never(case):
    """Relative to the best pair (gloo on CPU nodes): exact when the first pair round leaves a
    healthy pair (bad + down < n // 2); a down node is undetermined, never a culprit, and its
    healthy partner is cleared by a re-pair."""
    n, slow, down, seed = case
    rng = random.Random(seed)
    fabric = Fabric(n, slow={s: rng.uniform(0.5, 3.0) for s in slow}, down=down,
                    speed=lambda node: rng.uniform(8, 12))
    found = localise(fabric.nodes, fabric, RELATIVE)
    assert set(found.culprits) == slow
    assert set(found.undetermined) == down
    assert set(found.cleared) == set(fabric.nodes) - slow - down
    assert_disjoint_rounds(fabric)


def test_n3_of_four_takes_a_pair_round_a_re_pair_round_and_a_confirmation():
    fabric = Fabric(4, slow={"n3": 1.5})
    found = localise(fabric.nodes, fabric, RELATIVE)
    assert found.culprits == ("n3",) and found.cleared == ("n1", "n2", "n4")
    assert fabric.rounds == [[("n1", "n2"), ("n3", "n4")], [("n3", "n1"), ("n4", "n2")], [("n3", "n2")]]
    blame = found.rounds[2].tests[0]
    assert blame.grade is Grade.BAD and blame.measurement.busbw_gbps == 1.5
    assert found.rounds[1].reference_gbps == 10.0   # what "half of the best pair" meant


def test_one_slow_pair_between_two_leaf_switches_blames_nobody():
    """Review of issue 10: healthy nodes on two leaves, slower across them. n3 (leaf B) re-paired
    with n1 (leaf A) is slow; confirmed with n2... also leaf A: still slow. With a partner on its own
    leaf it is cleared, so the confirmation must pick a partner other than the first."""
    leaf = {"n1": "A", "n2": "A", "n4": "A", "n3": "B", "n5": "B", "n6": "B"}

    def measure(groups):
        return [Measurement(Outcome.OK, 10.0 if len({leaf[n] for n in g}) == 1 else 4.0) for g in groups]

    found = localise(list(leaf), measure, RELATIVE)
    assert found.culprits == () and set(found.cleared) == set(leaf)


def test_two_nodes_one_bad_names_nobody():
    """Nobody to compare with: a failing pair is evidence against the pair, not against either node."""
    fabric = Fabric(2, failing={"n2"})
    found = localise(fabric.nodes, fabric, ABSOLUTE)
    assert found.culprits == () and found.undetermined == ("n1", "n2")
    assert fabric.rounds == [[("n1", "n2")]]


def test_a_down_node_with_a_healthy_partner_blames_nobody():
    fabric = Fabric(4, down={"n2"})
    found = localise(fabric.nodes, fabric, ABSOLUTE)
    assert found.culprits == () and found.undetermined == ("n2",) and found.cleared == ("n1", "n3", "n4")
    assert [t.grade for t in found.rounds[0].tests] == [Grade.UNKNOWN, Grade.GOOD]


def test_a_fabric_wide_fault_stops_at_max_rounds():
    """Every pair fails: without a cleared node the search tries new pairs, bounded by max_rounds."""
    fabric = Fabric(12, failing={f"n{i}" for i in range(1, 13)})
    found = localise(fabric.nodes, fabric, ABSOLUTE, max_rounds=3)
    assert len(fabric.rounds) == 3 and found.culprits == ()
    assert set(found.undetermined) == set(fabric.nodes)


def test_the_odd_node_out_is_re_paired():
    fabric = Fabric(5, slow={"n5": 1.0})
    found = localise(fabric.nodes, fabric, RELATIVE)
    assert found.culprits == ("n5",)
    assert fabric.rounds == [[("n1", "n2"), ("n3", "n4")], [("n5", "n1")], [("n5", "n3")]]   # another pair


def test_measure_must_answer_every_group():
    with pytest.raises(ValueError, match="1 results for 2 groups"):
        localise(["n1", "n2", "n3", "n4"], lambda groups: [Measurement(Outcome.OK, 1.0)], ABSOLUTE)


# ------------------------------------------------------------------ the cost model


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n // 2 - 1))))
def test_the_cost_model_is_what_the_search_does_in_the_worst_placement(case):
    """Worst placement: each bad node in its own first-round pair. Runs are exact; rounds too
    while one re-pair round suffices, and never more than the model (docs/performance.md)."""
    n, k = case
    fabric = Fabric(n, failing={f"n{2 * i + 1}" for i in range(k)})
    found = localise(fabric.nodes, fabric, ABSOLUTE)
    model = cost_model(n, k, group_test=False)
    assert found.runs == model.runs
    uncleared = 2 * k + n % 2
    if uncleared <= n - uncleared:
        assert len(found.rounds) == model.rounds
    assert len(found.rounds) <= model.rounds


def test_the_model_for_a_thousand_nodes():
    assert cost_model(1000, 1) == cost_model(1000, 1, group_test=True)
    assert cost_model(1000, 1).rounds == 4 and cost_model(1000, 1).runs == 504
    assert cost_model(1000, 0, group_test=False).rounds == 1
    assert cost_model(1000, 10, max_parallel=64).waves == 1 + 8 + 1 + 1
    with pytest.raises(ValueError):
        cost_model(4, 2)


# ------------------------------------------------------------------ what a run says


def out(stdout: str = "", stderr: str = "", rc: int = 0) -> ToolOutput:
    return ToolOutput(argv=["srun"], returncode=rc, stdout=stdout, stderr=stderr, seconds=1.0)


RESULT = '{"ok": true, "rank": 0, "node": "n1", "backend": "gloo", "world": 2, "busbw_gbps": 0.71, "sizes": []}'


def test_worker_result_is_its_bandwidth():
    assert interpret_worker(out("srun noise\n" + RESULT + "\n")) == Measurement(Outcome.OK, 0.71)


def test_a_collective_that_failed_after_the_workers_met_is_evidence():
    line = '{"ok": false, "rank": 1, "node": "n2", "phase": "collective", "error": "RuntimeError: Connection reset"}'
    m = interpret_worker(out(line + "\n", rc=4))
    assert m.outcome is Outcome.FAILED and "rank 1 on n2" in m.detail


@pytest.mark.parametrize("stdout, stderr, rc, why", [
    ('{"ok": false, "rank": 1, "node": "n2", "phase": "rendezvous", "error": "timeout"}', "", 3,
     "the workers never met"),
    ("", "srun: error: Unable to allocate resources: Requested node configuration is not available", 1,
     "Unable to allocate resources"),
    ("Traceback (most recent call last):\nImportError: torch", "", 0, "allreduce_worker printed no result"),
    ('{"ok": true, "rank": 0, "busbw_gbps": "fast"}', "", 0, "allreduce_worker: malformed result"),
    ('{"ok": true, "rank": 0, "busbw_gbps": NaN}', "", 0, "allreduce_worker: malformed result"),
])
def test_a_run_that_could_not_run_is_no_evidence(stdout, stderr, rc, why):
    m = interpret_worker(out(stdout, stderr, rc))
    assert m.outcome is Outcome.NOT_RUN and why in m.detail


@pytest.mark.parametrize("name, outcome, busbw", [
    ("all_reduce_perf-2node.txt", Outcome.OK, 182.8),
    ("all_reduce_perf-2node-p5-srun-label.txt", Outcome.OK, 487.26),
    ("all_reduce_perf-2node-wrong-fail.txt", Outcome.FAILED, None),
    ("all_reduce_perf-2node-mpirun-slots-error.txt", Outcome.NOT_RUN, None),
])
def test_nccl_tests_outputs(name, outcome, busbw):
    m = interpret_nccl(out((FIXTURES / name).read_text(), rc=0 if outcome is Outcome.OK else 1))
    assert m.outcome is outcome and m.busbw_gbps == busbw
    if outcome is Outcome.NOT_RUN:
        assert "all_reduce_perf" in m.detail


def test_nccl_tests_that_crashed_after_its_table_could_not_run():
    m = interpret_nccl(out((FIXTURES / "all_reduce_perf-2node.txt").read_text(), "srun: error: task 1: Killed", 137))
    assert m.outcome is Outcome.NOT_RUN and "Killed" in m.detail


# ------------------------------------------------------------------ the check's verdict


def test_a_slow_group_is_localised():
    fabric = Fabric(4, slow={"n3": 2.0})
    result, culprits = evaluate(fabric.nodes, ClusterCheckConfig(min_busbw_gbps=5.0, min_relative=0.0), fabric)
    assert result.status is Status.FAIL and culprits == ("n3",)
    assert result.evidence["group"]["grade"] == "bad" and result.evidence["culprits"] == ["n3"]
    assert "n3 with n2: 2 GB/s" in result.summary      # the confirming pair


def test_a_passing_group_without_the_relative_criterion_needs_no_pairs():
    fabric = Fabric(4)
    result, culprits = evaluate(fabric.nodes, ClusterCheckConfig(min_busbw_gbps=5.0, min_relative=0.0), fabric)
    assert result.status is Status.PASS and culprits == () and "rounds" not in result.evidence
    assert fabric.rounds == [[("n1", "n2", "n3", "n4")]]


def test_a_slow_group_that_no_pair_explains_fails_without_a_culprit():
    """Every pair passes alone but the whole group is slow (a fault of the fabric at scale)."""
    def fabric(groups):
        return [Measurement(Outcome.OK, 1.0 if len(g) > 2 else 10.0) for g in groups]
    result, culprits = evaluate(["n1", "n2", "n3", "n4"], ClusterCheckConfig(min_busbw_gbps=5.0), fabric)
    assert result.status is Status.FAIL and culprits == () and "no node singled out" in result.summary


def test_two_nodes_are_one_run():
    """The group of two is the only pair: no second run of it, and no culprit from it."""
    fabric = Fabric(2, failing={"n2"})
    result, culprits = evaluate(fabric.nodes, ClusterCheckConfig(), fabric)
    assert result.status is Status.FAIL and culprits == () and fabric.rounds == [[("n1", "n2")]]


def test_a_down_node_is_an_error_not_a_verdict():
    fabric = Fabric(4, down={"n2"})
    result, culprits = evaluate(fabric.nodes, ClusterCheckConfig(), fabric)
    assert result.status is Status.ERROR and culprits == ()
    assert result.summary.startswith("could not test n2: ") and "Required node not available" in result.summary
    assert result.evidence["group"]["grade"] == "unknown" and result.evidence["cleared"] == ["n1", "n3", "n4"]


def test_srun_argv_and_the_program():
    cfg = ClusterCheckConfig(srun_args=["--reservation=maint"], sizes_bytes=[1024, 2048], iterations=3)
    argv = srun_argv(cfg, ("n3", "n1"), program(cfg, {"n3": "10.0.0.3"}, ("n3", "n1")))
    assert argv[:5] == ["srun", "-N", "2", "--ntasks-per-node=1", "-w"] and argv[5] == "n[1,3]"
    assert "--reservation=maint" in argv and "--exclusive" in argv
    worker = argv[argv.index("-m") + 1:]
    assert worker[0] == "hpresilience.deepcheck.allreduce_worker"
    assert worker[worker.index("--sizes") + 1] == "1024,2048" and worker[-2:] == ["--address", "n3=10.0.0.3"]
    site = ClusterCheckConfig(nccl_tests=["/opt/nccl-tests/all_reduce_perf", "-g", "1"], ntasks_per_node=8)
    assert srun_argv(site, ("n1",), program(site, {}, ("n1",)))[-3:] == site.nccl_tests
    assert "--ntasks-per-node=8" in srun_argv(site, ("n1",), [])


@pytest.mark.parametrize("changes, message", [
    ({"collective_timeout_seconds": 300.0}, "below timeout_seconds"),
    ({"backend": "mpi"}, "backend 'mpi'"),
    ({"min_relative": 1.0}, "min_relative"),
    ({"sizes_bytes": []}, "sizes_bytes"),
])
def test_config_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        ClusterCheckConfig(**changes).validate()


# ------------------------------------------------------------------ bad input, end to end


def fake_srun(directory: Path, body: str) -> Dict[str, str]:
    """An `srun` of our own on PATH (the outside tool), ahead of the real one."""
    srun = directory / "srun"
    srun.write_text(f"#!/bin/sh\n{body}\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_srun_missing_is_skip(tmp_path):
    config = DeepCheckConfig(cluster=ClusterCheckConfig(env={"PATH": str(tmp_path)}))
    report = run_cluster_check(config, "n[1-2]", Level.QUICK, SlurmGateway(SlurmModel("n[1-2]")))
    assert report.results[0].status is Status.SKIP and "srun is not installed" in report.results[0].summary


def test_a_hung_run_is_an_error_and_blames_nobody(tmp_path):
    cfg = ClusterCheckConfig(env=fake_srun(tmp_path, "exec sleep 60"), timeout_seconds=1.0,
                             collective_timeout_seconds=0.5, max_rounds=2)
    report = run_cluster_check(DeepCheckConfig(cluster=cfg), "n[1-4]", Level.QUICK, SlurmGateway(SlurmModel()))
    assert report.status is Status.ERROR and report.culprits == ()
    assert "srun did not finish within 1s (killed)" in report.results[0].summary
    assert report.to_dict()["culprits"] == [] and report.nodes == ("n1", "n2", "n3", "n4")


def test_nodes_carrying_jobs_are_never_tested(tmp_path):
    ran = tmp_path / "ran"
    cfg = ClusterCheckConfig(env=fake_srun(tmp_path, f"touch {ran}"))
    assert Runner(cfg, {}).one(("n1", "n3")).outcome is Outcome.NOT_RUN and ran.exists()  # the fake srun runs
    ran.unlink()
    model = SlurmModel()
    job = model.submit("n2")
    report = run_cluster_check(DeepCheckConfig(cluster=cfg), "n[1-4]", Level.QUICK, SlurmGateway(model))
    assert report.status is Status.ERROR and f"n2 runs job(s) {job}" in report.results[0].summary
    assert not ran.exists()


@pytest.mark.parametrize("nodelist, why", [("n1", "two nodes or more"), ("n[1-", "bad node list")])
def test_bad_node_lists(nodelist, why):
    report = run_cluster_check(DeepCheckConfig(), nodelist, Level.QUICK, SlurmGateway(SlurmModel()))
    assert report.status is Status.ERROR and why in report.results[0].summary
