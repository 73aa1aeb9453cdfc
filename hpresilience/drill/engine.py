"""The drill's engine: for each scenario, a canary `srun --auto-resume` job on the drill's nodes,
one fault, and what followed, timed from the fault (issue 13):

    fault_injected -> node_flagged -> step_stopped -> training_resumed -> node_in_service

read from where each fact shows: Slurm (the node's reason and state, the job's state), the
auto-resume runner's events file, and the canary's own `step=N ... t=T` lines. Then checks: the
canary finished with the right final step, no more steps redone than since the last checkpoint,
the node back in service; and, over the whole drill, no reason we did not write touched and no
node left out of service without a reason.

The engine never changes a node itself: faults arrive the way real ones do (the agent's drill
injection, a power loss, a daemon restart), and the product repairs them. Site commands come
from DrillConfig.commands; the clock is time.time (the canary's lines carry wall time too).
"""
from __future__ import annotations

import json
import math
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import structlog

from ..controller.config import expand_argv
from ..slurm import Node, SlurmError, SlurmGateway
from ..slurm.hostlist import fold
from ..slurm.reason import AUTO_RESUME_MARK, ReasonOwner
from .config import DrillConfig
from .result import DrillResult

log = structlog.get_logger(__name__)

STEP_LINE = re.compile(r"^step=(\d+) host=(\S+) attempt=(\S+) t=([0-9.]+)$")
POLL_SECONDS = 0.25
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


class DrillError(Exception):
    """The drill cannot run (too few nodes, a node not idle, a command that failed)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    fault: str                      # inject | power_off | restart_slurmctld | controller_sigkill
    code: Optional[str] = None      # the finding injected (inject, controller_sigkill)
    all_nodes: bool = False         # the canary takes every drill node: no spare capacity
    node_fault: bool = True         # a node goes out of service and must come back


# Rules as data, keyed by name (docs/drill.md explains each).
SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    Scenario("xid74_replace", "XID 74 (NVLink error) → Action: Replace", "inject", code="XID_74"),
    Scenario("xid73_reboot", "XID 73 → Action: Reboot", "inject", code="XID_73"),
    Scenario("power_loss", "Node power loss → power cycle", "power_off"),
    Scenario("slurmctld_restart", "slurmctld restarted mid-job", "restart_slurmctld", node_fault=False),
    Scenario("controller_sigkill", "Controller SIGKILLed mid-workflow", "controller_sigkill", code="XID_74"),
    Scenario("no_spare_capacity", "No spare capacity: the job waits for the repair", "inject", code="XID_73",
             all_nodes=True),
)}


@dataclass
class Timeline:
    """Named facts of one scenario: the first time each was seen (None: not seen)."""
    at: Dict[str, Optional[float]] = field(default_factory=dict)

    def seen(self, name: str, when: Optional[float] = None) -> None:
        if self.at.get(name) is None:
            self.at[name] = time.time() if when is None else when

    def since(self, name: str, origin: str = "fault_injected") -> Optional[float]:
        a, b = self.at.get(name), self.at.get(origin)
        return None if a is None or b is None else round(a - b, 3)


@dataclass
class Canary:
    job_id: int
    out: Path
    result: Path
    events: Path
    final_state: Optional[str] = None     # once ended: Slurm purges the job record later
    own: bool = True                      # our canary (step lines, result.json), not the admin's script

    def started(self, steps: int) -> bool:
        """Far enough in to be disturbed: our canary checkpointed twice; the admin's job is running
        under the runner (its `attempt_started`)."""
        if self.own:
            return any(step >= steps for step, _, _ in self.steps())
        return self.runner_started()

    def runner_started(self) -> bool:
        """The auto-resume runner started an attempt of the step (its `attempt_started` event)."""
        return any(e.get("event") == "attempt_started" for e in self.runner_events())

    def steps(self) -> List[Tuple[int, str, float]]:
        """(step, attempt, wall time) of each line the canary printed."""
        try:
            text = self.out.read_text(errors="replace")
        except FileNotFoundError:
            return []
        found = (STEP_LINE.match(line.strip()) for line in text.splitlines())
        return [(int(m[1]), m[3], float(m[4])) for m in found if m]

    def runner_events(self) -> List[dict]:
        try:
            lines = self.events.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def final(self) -> Optional[dict]:
        try:
            return json.loads(self.result.read_text())
        except (FileNotFoundError, ValueError):
            return None


class Drill:
    def __init__(self, gateway: SlurmGateway, config: DrillConfig, nodes: Sequence[str], work_dir: Path,
                 drill_id: Optional[str] = None, clock: Callable[[], float] = time.time):
        self.gateway = gateway
        self.config = config
        self.nodes = list(nodes)
        self.work = work_dir
        self.clock = clock
        self.id = drill_id or time.strftime("d-%Y%m%d-%H%M%S")
        if len(self.nodes) < 4:
            # A 2-node step (lockstep means something, and its victim is not the batch host), a spare
            # in the job to resume on, and a node outside it (issue 13 review: 3 could not work).
            raise DrillError(f"a drill needs 4 or more nodes (a 2-node step, a spare in the job and one "
                             f"outside it), got {fold(self.nodes)}")

    # ------------------------------------------------------------------ the drill
    def run(self, names: Sequence[str]) -> DrillResult:
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            raise DrillError(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
        self._require_idle()
        before = self._foreign_reasons()
        started = self.clock()
        results = []
        self.finals: List[Optional[int]] = []
        self.last_job: Optional[int] = None
        settled = True
        for name in names:
            if not settled:   # the last repair never ended: a scenario now would measure the wrong thing
                results.append(self._not_run(SCENARIOS[name], "not run: the drill nodes were not all back "
                                                              "in service after the previous scenario"))
                continue
            log.info("drill.scenario", drill=self.id, scenario=name)
            results.append(self._scenario(SCENARIOS[name]))
            try:
                self._settle()
            except (DrillError, SlurmError) as e:
                # Recorded, never raised: the report matters most when something did not come back
                # (issue 13 review).
                settled = False
                results[-1]["passed"] = False
                results[-1]["checks"].append(_check("the drill nodes came back into service", False, str(e)))
        invariants = self._invariants(before)
        c = self.config.canary
        wrong = [f for f in self.finals if f != c.steps]
        return DrillResult.from_dict({
            "drill": self.id, "started_at": started, "finished_at": self.clock(),
            "cluster": f"{fold(self.nodes)} ({len(self.nodes)} nodes)",
            # One canary per scenario, all the same command: the drill's canary ended right only if each did.
            "canary": {"job_id": self.last_job, "nodes": fold(self.nodes),
                       "command": f"srun --auto-resume=1 python -m hpresilience.drill.canary --steps {c.steps} "
                                  f"--step-seconds {c.step_seconds} --every {c.checkpoint_every} --lockstep",
                       "final_step_expected": c.steps, "final_step_seen": wrong[0] if wrong else c.steps},
            "scenarios": results, "invariants": invariants})

    def _require_idle(self) -> None:
        busy = [n.name for n in self.gateway.nodes(fold(self.nodes)) if not (self._in_service(n) and n.state == "IDLE")]
        if busy:
            raise DrillError(f"drill nodes must be idle and in service first: {fold(busy)} are not")

    def _foreign_reasons(self) -> Dict[str, Tuple[Optional[str], Optional[str], Optional[str]]]:
        """Every node's reason that is someone else's (an admin's, NHC's), with its writer and time.
        Slurm's own ("Not responding", "Kill task failed") come and go by themselves on a busy
        cluster: not ours to keep, and not counted (issue 13 review)."""
        return {n.name: (n.reason, n.reason_user, str(n.reason_time)) for n in self.gateway.nodes()
                if n.reason_owner is ReasonOwner.FOREIGN}

    def _settle(self) -> None:
        """Between scenarios: every drill node back in service (the product's work, not ours)."""
        self._wait(lambda: all(self._in_service(n) for n in self.gateway.nodes(fold(self.nodes))),
                   self.config.scenario_timeout_seconds, "every drill node back in service")

    # --------------------------------------------------------------- one scenario
    def _scenario(self, s: Scenario) -> dict:
        t = Timeline()
        checks: List[dict] = []
        notes = ""
        canary: Optional[Canary] = None
        victim: Optional[str] = None
        # Unique, even for a drill id used before: submit_batch finds a canary by it (issue 14 review).
        name = f"hpr-drill-{self.id}-{s.name}-{secrets.token_hex(3)}"
        submitted = False
        try:
            missing = self._missing_command(s)
            if missing:
                return self._not_run(s, f"not configured: [commands] {missing} is empty")
            submitted = True
            canary = self._submit(s, name)
            victim = self._start_and_pick_victim(canary, s)
            attempt_before = self._attempt_now(canary)
            t.seen("fault_injected")
            self._fault(s, victim, t, canary, checks)
            self._observe(s, victim, canary, t, attempt_before)
        except (DrillError, SlurmError, subprocess.SubprocessError, OSError, ValueError) as e:
            notes = f"{type(e).__name__}: {e}"
            log.error("drill.scenario_failed", drill=self.id, scenario=s.name, error=notes)
        finally:
            # Whatever ended the scenario (a failure, Ctrl-C): no canary left holding the nodes.
            if canary is not None and self._job_state(canary) not in ENDED:
                self._cancel(canary)
            elif canary is None and submitted:
                self._cancel_named(name)   # an sbatch that failed may have submitted it all the same
        return self._result(s, victim, canary, t, checks, notes)

    def _missing_command(self, s: Scenario) -> Optional[str]:
        needed = {"inject": ["inject"], "power_off": ["power_off"], "restart_slurmctld": ["restart_slurmctld"],
                  "controller_sigkill": ["inject", "kill_controller"]}[s.fault]
        return next((n for n in needed if not getattr(self.config.commands, n)), None)

    def _not_run(self, s: Scenario, why: str) -> dict:
        self.finals.append(None)
        return {"name": s.name, "title": s.title, "node": None, "passed": False, "events": [], "times": {},
                "checks": [{"name": "scenario ran", "passed": False, "detail": why}], "notes": why}

    def _submit(self, s: Scenario, name: str) -> Canary:
        c = self.config.canary
        work = self.work / s.name
        work.mkdir(parents=True, exist_ok=True)
        job_nodes = self.nodes if s.all_nodes else self.nodes[:-1]
        step_nodes = len(job_nodes) if s.all_nodes else len(job_nodes) - 1   # a spare in the job: resume in place
        if any(work.iterdir()):
            # An earlier drill's output (appended canary.out, old checkpoints) would be read as this one's.
            raise DrillError(f"{work} is not empty: give the drill a fresh --out")
        if c.sbatch:
            script = Path(c.sbatch)   # the admin's own job: it runs its training with srun --auto-resume
        else:
            script = work / "canary.sbatch"
            script.write_text(
                "#!/bin/bash\n"
                f"# hpresilience drill {self.id}, scenario {s.name}: the canary (issue 13)\n"
                f"srun --auto-resume=1 -N {step_nodes} --ntasks-per-node=1 {c.python} -m hpresilience.drill.canary "
                f"--steps {c.steps} --step-seconds {c.step_seconds} --every {c.checkpoint_every} --lockstep "
                f"--ckpt-dir {work / 'ckpt'} --result {work / 'result.json'}\n")
        out = work / "canary.out"
        # The mark slurm_plugins/job_submit.lua gives every auto-resume job, given here for sites without
        # the plugin: the controller then expedites a requeue Slurm makes itself (a dead node's job), as
        # it would for the site's own training jobs.
        argv = [*self._placement(s), f"-N{len(job_nodes)}",
                "--exclusive", "--requeue", "--open-mode=append", f"--output={out}", f"--chdir={work}",
                f"--comment={AUTO_RESUME_MARK}",
                f"--export=ALL,HPR_STATE_DIR={work / 'state'},HPR_DRILL={self.id}"]
        argv += [f"--partition={c.partition}"] if c.partition else []
        job_id = self.gateway.submit_batch([*argv, str(script)], name=name)
        return Canary(job_id, out, work / "result.json", work / "state" / f"auto-resume-{job_id}.events.jsonl",
                      own=not c.sbatch)

    def _placement(self, s: Scenario) -> List[str]:
        """No spare capacity: exactly the drill's nodes, so the requeued job must wait for the repair.
        Otherwise any of them (every other node excluded): a job Slurm requeues itself (a dead node)
        starts again on the spare at once, as it would on a site with spare capacity."""
        if s.all_nodes:
            return [f"--nodelist={fold(self.nodes)}"]
        others = [n.name for n in self.gateway.nodes() if n.name not in self.nodes]
        return [f"--exclude={fold(others)}"] if others else []

    def _start_and_pick_victim(self, canary: Canary, s: Scenario) -> str:
        """Once the canary has checkpointed twice: a node of its step that is not the batch host (the
        batch script lives on), for slurmctld's restart any node."""
        every = self.config.canary.checkpoint_every

        def started() -> bool:
            if canary.started(2 * every):
                return True
            state = self.gateway.job(canary.job_id).state
            if state in ENDED:   # it will never checkpoint: say why now, not at the timeout
                said = canary.out.read_text(errors="replace")[-500:] if canary.out.exists() else ""
                raise DrillError(f"canary job {canary.job_id} ended ({state}) before it checkpointed: {said}")
            return False
        self._wait(started, self.config.scenario_timeout_seconds, f"canary job {canary.job_id} to checkpoint")
        job = self.gateway.job(canary.job_id)
        steps = [st for st in self.gateway.steps(canary.job_id) if st.step_id.split(".")[-1].isdigit()]
        step_nodes = list(steps[-1].nodes) if steps else list(job.nodes)
        others = [n for n in step_nodes if n != job.batch_host]
        if not others:
            raise DrillError(f"canary job {canary.job_id}: no step node other than its batch host {job.batch_host}")
        return others[-1]

    def _attempt_now(self, canary: Canary) -> str:
        steps = canary.steps()
        return steps[-1][1] if steps else ""

    def _fault(self, s: Scenario, victim: str, t: Timeline, canary: Canary, checks: List[dict]) -> None:
        cmds = self.config.commands
        if s.fault in ("inject", "controller_sigkill"):
            self._command(cmds.inject, node=victim, code=s.code or "")
        elif s.fault == "power_off":
            self._command(cmds.power_off, node=victim)
        elif s.fault == "restart_slurmctld":
            self._command(cmds.restart_slurmctld)
            self._wait(self._slurmctld_answers, self.config.scenario_timeout_seconds, "slurmctld to answer again")
            t.seen("slurmctld_back")
        if s.fault == "controller_sigkill":
            # Mid-workflow: once the canary let go of the node, the controller is past waiting for jobs.
            def flagged_and_released() -> bool:
                if self._flagged(victim, s):
                    t.seen("node_flagged")
                return t.at.get("node_flagged") is not None and victim not in self.gateway.job(canary.job_id).nodes
            self._wait(flagged_and_released, self.config.scenario_timeout_seconds,
                       f"{victim} flagged and released by the canary")
            # Mid-workflow for real: the node still carries its fault when the controller dies (a fast
            # provider could have repaired it already, issue 13 review).
            still = self.gateway.node(victim)
            checks.append(_check("the controller was killed mid-workflow", bool(still.reason),
                                 f"{victim} at the kill: {still.reason or 'already back in service'}"))
            self._command(cmds.kill_controller)
            t.seen("controller_killed")
            if cmds.start_controller:
                self._command(cmds.start_controller)

    def _observe(self, s: Scenario, victim: str, canary: Canary, t: Timeline, attempt_before: str) -> None:
        deadline = self.clock() + self.config.scenario_timeout_seconds
        fault_at = t.at["fault_injected"] or 0.0
        while self.clock() < deadline:
            node = self.gateway.node(victim)
            if s.node_fault and self._flagged(victim, s, node):
                t.seen("node_flagged")
            for e in canary.runner_events():
                if e.get("at", 0) >= fault_at and e.get("event") in ("step_stopping", "node_failure", "requeue"):
                    t.seen("step_stopped", e["at"])
                    break
            if canary.final_state is None:
                # Read until it ends, then kept: Slurm forgets an ended job after MinJobAge (issue 13 review).
                state = self.gateway.job(canary.job_id).state
                canary.final_state = state if state in ENDED else None
                if s.all_nodes and state == "PENDING" and t.at.get("step_stopped"):
                    t.seen("job_waiting")
            for _step, attempt, when in canary.steps():
                if when > fault_at and attempt != attempt_before:
                    t.seen("training_resumed", when)
                    break
            if not canary.own:
                # The admin's script prints no step lines: its next attempt's start (the runner's
                # `resumed` event, issue 12) stands for the first training step.
                for e in canary.runner_events():
                    if e.get("event") == "resumed" and e.get("at", 0) >= fault_at:
                        t.seen("training_resumed", e["at"])
                        break
            if s.node_fault and t.at.get("node_flagged") and self._in_service(node):
                t.seen("node_in_service")
            if canary.final_state is not None and (not s.node_fault or t.at.get("node_in_service")):
                t.seen("canary_finished")
                return
            time.sleep(POLL_SECONDS)
        raise DrillError(f"scenario {s.name} did not end within {self.config.scenario_timeout_seconds:g}s")

    # ------------------------------------------------------------------ results
    def _result(self, s: Scenario, victim: Optional[str], canary: Optional[Canary], t: Timeline,
                checks: List[dict], notes: str) -> dict:
        c = self.config.canary
        job = self._job_state(canary)
        self.last_job = canary.job_id if canary else self.last_job
        if canary is not None and not canary.own:
            # The admin's script: its final step is not known to us; its job's completion is.
            self.finals.append(c.steps if job == "COMPLETED" else None)
            checks.append(_check("the job completed", job == "COMPLETED", f"job {canary.job_id} {job}"))
        else:
            final = canary.final() if canary else None
            seen = final.get("final_step") if final and job == "COMPLETED" else None
            self.finals.append(seen)
            checks.append(_check("the canary finished with the right final step", seen == c.steps,
                                 f"job {canary.job_id if canary else '-'} {job}, final step {seen} of {c.steps}"))
        redone = self._steps_redone(canary, t) if canary is None or canary.own else None
        if s.node_fault:
            checks.append(_check("the faulty node was flagged", t.at.get("node_flagged") is not None,
                                 f"{victim}: {'seen' if t.at.get('node_flagged') else 'never seen'}"))
            checks.append(_check("training resumed after the fault", t.at.get("training_resumed") is not None,
                                 f"resumed {t.since('training_resumed')} s after the fault"))
            checks.append(_check("the node came back into service", t.at.get("node_in_service") is not None,
                                 f"{victim} back {t.since('node_in_service')} s after the fault"))
            # Rank 0 checkpoints until the step is stopped (a dead peer blocks the lockstep canary at
            # once), so a resume from the newest checkpoint redoes fewer than checkpoint_every steps; more
            # is a lost checkpoint (issue 13 review: a stop-time allowance let a resume from step 0 pass).
            if canary is None or canary.own:
                checks.append(_check("no more steps redone than since the last checkpoint",
                                     redone is not None and redone < c.checkpoint_every,
                                     f"{redone} redone (fewer than {c.checkpoint_every})"))
        else:
            # A "nothing happened" needs a sign the runner was watching (issue 13 review).
            watched = canary is not None and canary.runner_started()
            checks.append(_check("the step was never stopped", watched and t.at.get("step_stopped") is None,
                                 "the runner ran the step; no stop, no node failure, no requeue" if watched
                                 else "no sign the auto-resume runner ran the step"))
            flagged = sorted(n.name for n in self.gateway.nodes(fold(self.nodes)) if n.reason)
            checks.append(_check("no drill node flagged", not flagged,
                                 f"with a reason: {fold(flagged)}" if flagged else "none"))
            checks.append(_check("no step redone", redone in (None, 0), f"{redone or 0} redone"))
        if s.all_nodes:
            checks.append(_check("the job waited for capacity, then resumed",
                                 t.at.get("job_waiting") is not None and t.at.get("training_resumed") is not None,
                                 f"waiting seen: {t.at.get('job_waiting') is not None}"))
        events = [{"name": name, "at": at} for name, at in sorted(t.at.items(), key=lambda kv: kv[1] or math.inf)]
        times = {"detect_seconds": t.since("node_flagged"), "stop_seconds": t.since("step_stopped"),
                 "resume_seconds": t.since("training_resumed"), "repair_seconds": t.since("node_in_service")}
        return {"name": s.name, "title": s.title, "node": victim,
                "passed": not notes and all(ch["passed"] for ch in checks), "events": events, "times": times,
                "steps_redone": redone, "checks": checks, "notes": notes}

    def _steps_redone(self, canary: Optional[Canary], t: Timeline) -> Optional[int]:
        """Steps the canary ran twice: the last one printed before the resume, less the step it
        resumed from (0 when it never resumed)."""
        if canary is None:
            return None
        resumed = t.at.get("training_resumed")
        lines = canary.steps()
        if resumed is None:
            return 0 if lines else None
        before = [step for step, _, when in lines if when < resumed]
        after = [step for step, _, when in lines if when >= resumed]
        if not before or not after:
            return None
        return max(0, max(before) - (after[0] - 1))

    def _invariants(self, before: Dict[str, Tuple[Optional[str], Optional[str], Optional[str]]]) -> List[dict]:
        nodes = self.gateway.nodes()
        after = {n.name: (n.reason, n.reason_user, str(n.reason_time)) for n in nodes}
        touched = sorted(name for name, was in before.items() if after.get(name) != was)
        ours = {n.name: n for n in nodes if n.name in self.nodes}
        unexplained = sorted(n.name for n in ours.values() if not self._in_service(n) and not n.reason)
        out_of_service = sorted(n.name for n in ours.values() if not self._in_service(n))
        return [
            _check("no reason we did not write was changed", not touched,
                   f"changed: {fold(touched)}" if touched else f"{len(before)} such reasons, all as they were"),
            _check("no node left out of service without a reason", not unexplained,
                   f"without a reason: {fold(unexplained)}" if unexplained else "none"),
            _check("every drill node back in service", not out_of_service,
                   f"still out: {fold(out_of_service)}" if out_of_service else fold(self.nodes)),
        ]

    # ------------------------------------------------------------------ helpers
    def _flagged(self, victim: str, s: Scenario, node: Optional[Node] = None) -> bool:
        node = node or self.gateway.node(victim)
        if s.fault == "power_off":
            return not node.is_responding or node.is_down
        return self.id in (node.reason or "") or node.action_reason is not None

    @staticmethod
    def _in_service(node: Node) -> bool:
        return node.available and node.is_responding and not node.reason

    def _slurmctld_answers(self) -> bool:
        try:
            self.gateway.node(self.nodes[0])
            return True
        except SlurmError:
            return False

    def _job_state(self, canary: Optional[Canary]) -> str:
        if canary is None:
            return "not submitted"
        if canary.final_state is not None:
            return canary.final_state
        try:
            return self.gateway.job(canary.job_id).state
        except SlurmError as e:
            return f"unknown ({e})"

    def _cancel(self, canary: Canary) -> None:
        try:
            self.gateway.cancel_job(canary.job_id)
        except SlurmError as e:
            log.warning("drill.cancel_failed", job=canary.job_id, error=str(e))

    def _cancel_named(self, name: str) -> None:
        try:
            for job_id in self.gateway.job_ids_named(name):
                self.gateway.cancel_job(job_id)
        except SlurmError as e:
            log.warning("drill.cancel_failed", name=name, error=str(e),
                        hint=f"a canary may be left: scancel --name={name}")

    def _command(self, template: List[str], **values: str) -> None:
        argv = expand_argv(template, drill=self.id, **values)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self.config.commands.timeout_seconds)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()[-300:]
            raise DrillError(f"{' '.join(argv)} exited {done.returncode}: {said}")

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = self.clock() + timeout
        while not condition():
            if self.clock() >= deadline:
                raise DrillError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(POLL_SECONDS)


def _check(name: str, passed: bool, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail}

