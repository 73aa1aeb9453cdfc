"""Finding the node that makes a multi-node all-reduce slow or fail (issue 10, deliverable 2).

Pure: the nodes and a function that measures a round of disjoint groups (each group's
all-reduce runs at the same time as the others) go in, the culprits and every test
with its evidence come out. cluster.py supplies the real measurement (srun), the unit
tests synthetic ones.

Strategy (pairs, then re-pairing with known-good nodes):

1. Pair round: the nodes in disjoint pairs, (n1,n2) (n3,n4) ..., all pairs at once;
   an odd node out waits for step 2. A pair that passes clears both its nodes.
2. Re-pair rounds: every node not cleared (in a failing pair, in a pair that could not
   run, or the odd one) is paired with a distinct cleared node, all at once. With a
   known-good partner the test speaks about the node alone: pass -> cleared; could not
   run -> undetermined; a slow or failed all-reduce -> suspect, confirmed in one more
   round with a second, different known-good partner (slow again -> culprit, pass ->
   cleared): one slow pair can be the fabric between two leaf switches, not the node.
3. No cleared node yet (every pair of step 1 failed): new pairs among the uncleared
   nodes, never a pair tried before, until one passes and gives step 2 its partners.
   When none is left to try, the rest are undetermined.

What counts as evidence against a node (only this names a culprit): a slow or failed
collective that was measured (the workers started, met, and the all-reduce ran below
the threshold or raised or summed wrong) in a pair whose partner passed elsewhere. A
run that could not start (srun could not allocate a node that is down, drained or
busy; the workers never met), that hung past its timeout or printed nothing readable
is no evidence: the nodes in it are undetermined, never culprits, and a healthy
partner of a dead node is cleared by its own re-pair.

Criteria: an absolute one, bus bandwidth >= `min_busbw_gbps` (meaningful with NCCL on
a known fabric), and a relative one for localisation, a pair below `min_relative` of
the best pair measured so far is slow (gloo on CPU nodes, where the absolute number
means little). The relative criterion needs one pair of two healthy nodes in the first
pair round, which k bad nodes among N always leave when k < N // 2; the absolute one
(and outright failures) only needs two healthy nodes in all.

Cost, N nodes with k bad (the model below, checked against this code by the unit
tests; worst case, every bad node in its own pair):

- rounds: 1 (the group test, cluster.py) + 1 (pairs) + ceil(u / (N - u)) re-pair
  rounds, u = 2k + N mod 2 the uncleared nodes (one re-pair round whenever u <= N / 2),
  + 1 confirmation round after each re-pair round that found a slow node.
- runs: 1 + floor(N / 2) + u + k.
- N = 1,000, k = 1: 4 rounds (group, 500 pairs at once, 2 re-pairs, 1 confirmation),
  504 runs. A round lasts as long as its slowest run (launch, start-up of the workers,
  rendezvous, the timed all-reduces), so the whole search costs about four all-reduce
  runs of wall time, against log2(N) = 10 sequential rounds for bisection, which also
  cannot test halves at once without a second fabric. With at most P runs at once (the
  launcher's limit, `max_parallel`) the pair round becomes ceil(500 / P) waves.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

Group = Tuple[str, ...]


class Outcome(str, enum.Enum):
    OK = "ok"             # the all-reduce ran: bandwidth measured
    FAILED = "failed"     # it ran and failed (raised after the workers met, wrong sums): evidence
    NOT_RUN = "not_run"   # could not run (launch, hang, unreadable output): no evidence


class Grade(str, enum.Enum):
    GOOD = "good"
    BAD = "bad"           # slow or failed: evidence against someone in the group
    UNKNOWN = "unknown"   # no evidence either way


@dataclass(frozen=True)
class Measurement:
    outcome: Outcome
    busbw_gbps: Optional[float] = None
    detail: str = ""      # why it failed or could not run; what the tool said

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"outcome": self.outcome.value}
        if self.busbw_gbps is not None:
            out["busbw_gbps"] = round(self.busbw_gbps, 4)
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class Criteria:
    min_busbw_gbps: float = 0.0   # absolute; 0 = off
    min_relative: float = 0.0     # of the best pair; 0 = off

    def grade(self, m: Measurement, reference: Optional[float] = None) -> Grade:
        """The verdict on one run; `reference` (the best pair's bandwidth) only for pairs."""
        if m.outcome is Outcome.NOT_RUN:
            return Grade.UNKNOWN
        if m.outcome is Outcome.FAILED or m.busbw_gbps is None:
            return Grade.BAD
        if m.busbw_gbps < self.min_busbw_gbps:
            return Grade.BAD
        if reference is not None and m.busbw_gbps < self.min_relative * reference:
            return Grade.BAD
        return Grade.GOOD


@dataclass(frozen=True)
class Trial:
    group: Group
    measurement: Measurement
    grade: Grade

    def to_dict(self) -> Dict[str, Any]:
        return {"nodes": list(self.group), "grade": self.grade.value, **self.measurement.to_dict()}


@dataclass(frozen=True)
class Round:
    purpose: str          # "pairs", "re-pair with known-good", "new pairs"
    tests: Tuple[Trial, ...]
    reference_gbps: Optional[float]   # the best pair so far, what min_relative compared with

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"purpose": self.purpose, "tests": [t.to_dict() for t in self.tests]}
        if self.reference_gbps is not None:
            out["reference_gbps"] = round(self.reference_gbps, 4)
        return out


@dataclass(frozen=True)
class Localisation:
    culprits: Tuple[str, ...]
    cleared: Tuple[str, ...]
    undetermined: Tuple[str, ...]     # no evidence either way (could not run, or nobody to compare with)
    rounds: Tuple[Round, ...]

    @property
    def runs(self) -> int:
        return sum(len(r.tests) for r in self.rounds)


# One round: the groups (disjoint) measured at the same time, one Measurement each, in order.
MeasureRound = Callable[[Sequence[Group]], Sequence[Measurement]]


class _Search:
    def __init__(self, nodes: Sequence[str], measure: MeasureRound, criteria: Criteria, max_rounds: Optional[int]):
        self.order = list(dict.fromkeys(nodes))
        self.measure, self.criteria, self.max_rounds = measure, criteria, max_rounds
        self.good: List[str] = []
        self.culprits: List[str] = []
        self.undetermined: List[str] = []
        self.pending: List[str] = []          # not cleared, not yet judged
        self.tried: Set[frozenset] = set()
        self.first_pair: Dict[str, frozenset] = {}   # each node's first pair (its neighbours)
        self.rounds: List[Round] = []
        self.best: Optional[float] = None

    def run_round(self, purpose: str, groups: List[Group]) -> List[Trial]:
        measurements = list(self.measure(groups))
        if len(measurements) != len(groups):
            raise ValueError(f"measure returned {len(measurements)} results for {len(groups)} groups")
        self.tried.update(frozenset(g) for g in groups)
        for m in measurements:
            if m.outcome is Outcome.OK and m.busbw_gbps is not None:
                self.best = m.busbw_gbps if self.best is None else max(self.best, m.busbw_gbps)
        reference = self.best if self.criteria.min_relative > 0 else None
        tests = [Trial(g, m, self.criteria.grade(m, reference)) for g, m in zip(groups, measurements)]
        self.rounds.append(Round(purpose, tuple(tests), reference))
        return tests

    def clear(self, nodes: Sequence[str]) -> None:
        for node in nodes:
            if node in self.pending:
                self.pending.remove(node)
            if node not in self.good:
                self.good.append(node)

    def pairs_round(self, purpose: str, candidates: List[str]) -> bool:
        """Disjoint pairs among `candidates`, none tried before; False when there are none."""
        pairs: List[Group] = []
        free = list(candidates)
        while free:
            a = free.pop(0)
            b = next((x for x in free if frozenset((a, x)) not in self.tried), None)
            if b is not None:
                free.remove(b)
                pairs.append((a, b))
        if not pairs:
            return False
        for pair in pairs:
            for node in pair:
                self.first_pair.setdefault(node, frozenset(pair))
        for test in self.run_round(purpose, pairs):
            if test.grade is Grade.GOOD:
                self.clear(test.group)
        return True

    def repair_round(self) -> None:
        """Each pending node with a distinct known-good partner: the test speaks about the node alone.
        A node found slow is confirmed with a second, different known-good partner before it is
        named: one slow pair can be the fabric between the two (two leaf switches), not the node
        (issue 10 review)."""
        tested = self.pending[: len(self.good)]
        groups: List[Group] = list(zip(tested, self.good))
        suspects: List[Group] = []
        for (node, partner), test in zip(groups, self.run_round("re-pair with known-good", groups)):
            self.pending.remove(node)
            if test.grade is Grade.BAD:
                suspects.append((node, partner))
            else:
                self._judge(node, test.grade)
        if suspects:
            self.confirm_round(suspects)

    def confirm_round(self, suspects: List[Group]) -> None:
        """The second partner comes, where possible, from another first-round pair than the
        first partner: nodes paired first are neighbours in the list, often on one switch."""
        spare = [g for g in self.good if g not in {p for _, p in suspects}] + [p for _, p in suspects]
        groups: List[Group] = []
        unconfirmable: List[str] = []
        for node, first in suspects:
            # Neither its first partner's neighbours nor its own first partner (a pair already tried).
            near = self.first_pair.get(first, frozenset((first,))) | self.first_pair.get(node, frozenset())
            other = (next((g for g in spare if g not in near), None)
                     or next((g for g in spare if g != first and frozenset((node, g)) not in self.tried), None))
            if other is None:
                unconfirmable.append(node)   # a single known-good node: its word alone
                continue
            spare.remove(other)
            groups.append((node, other))
        self.culprits.extend(unconfirmable)
        if groups:
            for (node, _), test in zip(groups, self.run_round("confirm with another known-good", groups)):
                self._judge(node, test.grade)

    def _judge(self, node: str, grade: Grade) -> None:
        if grade is Grade.GOOD:
            self.good.append(node)
        elif grade is Grade.BAD:
            self.culprits.append(node)
        else:
            self.undetermined.append(node)

    def search(self) -> Localisation:
        self.pending = list(self.order)
        self.pairs_round("pairs", list(self.order))
        while self.pending and (self.max_rounds is None or len(self.rounds) < self.max_rounds):
            if self.good:
                self.repair_round()
            elif not self.pairs_round("new pairs", list(self.pending)):
                break
        self.undetermined.extend(self.pending)
        rank = {n: i for i, n in enumerate(self.order)}
        return Localisation(culprits=tuple(sorted(self.culprits, key=rank.get)),
                            cleared=tuple(sorted(self.good, key=rank.get)),
                            undetermined=tuple(sorted(self.undetermined, key=rank.get)),
                            rounds=tuple(self.rounds))


def localise(nodes: Sequence[str], measure: MeasureRound, criteria: Criteria,
             max_rounds: Optional[int] = None) -> Localisation:
    """Which of `nodes` make the all-reduce slow or fail: pairs, then re-pairs with cleared nodes.

    `max_rounds` bounds the search when no pair passes (a fabric-wide fault: step 3 would
    otherwise try pair after pair); nodes still unjudged then are undetermined.

    >>> slow = {"n3"}
    >>> def measure(groups):
    ...     return [Measurement(Outcome.OK, 1.0 if slow & set(g) else 10.0) for g in groups]
    >>> found = localise(["n1", "n2", "n3", "n4"], measure, Criteria(min_relative=0.5))
    >>> found.culprits, found.cleared, [len(r.tests) for r in found.rounds]
    (('n3',), ('n1', 'n2', 'n4'), [2, 2, 1])
    """
    if len(set(nodes)) < 2:
        raise ValueError("localisation needs at least two nodes")
    return _Search(nodes, measure, criteria, max_rounds).search()


@dataclass(frozen=True)
class Cost:
    rounds: int     # sequential rounds; the runs of a round run at the same time
    runs: int       # all-reduce runs in all
    waves: int      # sequential launches when at most `max_parallel` runs go at once


def cost_model(n: int, bad: int = 1, group_test: bool = True, max_parallel: Optional[int] = None) -> Cost:
    """Rounds and runs the search needs for `n` nodes with `bad` culprits in the worst
    placement (each bad node in its own pair), with the group test first (cluster.py).

    >>> cost_model(1000, 1)
    Cost(rounds=4, runs=504, waves=4)
    >>> cost_model(1000, 1, max_parallel=128)
    Cost(rounds=4, runs=504, waves=7)
    """
    if not 0 <= bad < n // 2:
        raise ValueError("the model needs n >= 2 and fewer bad nodes than pairs (bad < n // 2)")
    limit = max_parallel or n
    # After the pair round the uncleared nodes, in order: each bad node and its partner, then the odd one.
    pending = [True, False] * bad + [False] * (n % 2)
    good = n - len(pending)
    rounds, runs, waves = int(group_test), int(group_test), int(group_test)
    rounds, runs, waves = rounds + 1, runs + n // 2, waves + math.ceil(n // 2 / limit)
    while pending:
        batch, pending = pending[:good], pending[good:]
        rounds, runs, waves = rounds + 1, runs + len(batch), waves + math.ceil(len(batch) / limit)
        found = sum(batch)
        if found:  # each slow node confirmed with a second known-good partner
            rounds, runs, waves = rounds + 1, runs + found, waves + math.ceil(found / limit)
        good += len(batch) - found
    return Cost(rounds, runs, waves)
