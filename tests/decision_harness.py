"""One controller and its agents over the in-memory Slurm model (tests/slurm_model.py), for the decision
tests of issue 9 (tests/unit/test_controller_steps.py, test_agent_actuator.py, test_properties.py).

Everything here is real code (Reconciler, Steps, Journal, Actuator, providers, SlurmGateway); only Slurm is
the model. Steps run synchronously (SyncExecutor) so a pass is deterministic, and every time the code under
test reads comes from the model's clock.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from hpresilience.action import NodeAction
from hpresilience.agent.actuator import Actuator, Outcome
from hpresilience.agent.config import SharedCauseConfig
from hpresilience.agent.policy import Decision
from hpresilience.controller.config import ControllerConfig, ProviderConfig
from hpresilience.controller.journal import Journal, Workflow
from hpresilience.controller.providers import PowerSaveProvider, Provider
from hpresilience.controller.reconcile import PassReport, Reconciler
from hpresilience.finding import Finding
from hpresilience.slurm import NodeState, SlurmGateway
from hpresilience.slurm.models import StepResult
from tests.slurm_model import SlurmModel, Write

ADMIN = "alice"   # a human admin; our agent and controller write as the model's default user, root
OURS = "root"


class SyncExecutor:
    """Runs a submitted step at once in the caller's thread: a pass is one deterministic sequence."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # the Reconciler's reaper logs what a worker raised
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def finding(code: str, action: NodeAction, entity: Optional[str] = None, message: str = "",
            at: float = 0.0) -> Finding:
    return Finding(monitor="kernel_log", code=code, action=action, message=message or f"{code} seen",
                   entity=entity, observed_at=at)


def decision(code: str, action: NodeAction, entity: Optional[str] = None, message: str = "") -> Decision:
    return Decision(action, [finding(code, action, entity, message)], "fail")


def check_result(*lines: str) -> StepResult:
    """What `hpresilience check` returns: exit 1 with one line per finding, else exit 0."""
    return StepResult(1, "".join(f"{line}\n" for line in lines)) if lines else StepResult(0, "healthy\n")


def controller_config(state_dir: Path) -> ControllerConfig:
    config = ControllerConfig()
    config.controller.state_dir = str(state_dir)
    config.provider = ProviderConfig(type="power-save")
    return config


@dataclass
class Cluster:
    """A model cluster, its controller (journal in `state_dir`) and one actuator per node."""
    model: SlurmModel
    state_dir: Path
    config: ControllerConfig
    shared_cause: SharedCauseConfig = field(default_factory=SharedCauseConfig)
    gateway: SlurmGateway = field(init=False)
    provider: Provider = field(init=False)
    journal: Journal = field(init=False)
    reconciler: Reconciler = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = SlurmGateway(self.model)
        self.provider = PowerSaveProvider(self.config.provider, self.gateway, sleep=self.model.sleep,
                                          clock=self.model.clock)
        self.restart_controller()

    @classmethod
    def build(cls, state_dir: Path, nodes: str = "n[1-4]", config: Optional[ControllerConfig] = None,
              **model_args) -> Cluster:
        return cls(SlurmModel(nodes, **model_args), state_dir, config or controller_config(state_dir))

    def restart_controller(self) -> None:
        """A controller crash: the Reconciler (its in-memory state) is gone; the journal file stays."""
        if getattr(self, "journal", None) is not None:
            self.journal.close()
        self.journal = Journal(self.config.journal_path, clock=self.model.clock)
        self.reconciler = Reconciler(self.config, self.gateway, self.journal, self.provider,
                                     executor=SyncExecutor(), clock=self.model.clock)

    # ------------------------------------------------------------ actors
    def run_pass(self) -> PassReport:
        return self.reconciler.run_pass()

    def flag(self, node: str, action: NodeAction, code: str, entity: Optional[str] = None,
             message: str = "") -> Outcome:
        """The node's agent applies a decision for one finding."""
        return self.actuator(node).apply(decision(code, action, entity, message))

    def actuator(self, node: str) -> Actuator:
        return Actuator(self.gateway, node, shared_cause=self.shared_cause)

    def admin_sets(self, node: str, reason: str, state: NodeState = NodeState.DRAIN) -> None:
        with self.model.as_user(ADMIN):
            self.gateway.set_state(node, state, reason)

    def settle(self, passes: int = 30, seconds: float = 5.0) -> None:
        """Passes with time between them until no workflow is active (or `passes` ran)."""
        for _ in range(passes):
            self.run_pass()
            if not self.journal.active():
                return
            self.model.advance(seconds)

    # ------------------------------------------------------------ what happened
    def workflows(self, node: Optional[str] = None) -> List[Workflow]:
        return self.journal.history(node=node)

    def writes_by(self, user: str, node: str, since: int = 0) -> List[Write]:
        """Node writes (update_node, reboot) `user` made on `node`, from index `since` of model.writes."""
        return [w for w in self.model.writes[since:]
                if w.user == user and w.target == node and w.op in ("update_node", "reboot")]

    def power_downs(self, node: str) -> int:
        return sum(1 for w in self.writes_by(OURS, node) if w.fields.get("state") == "POWER_DOWN_FORCE")

    def reboots(self, node: str) -> int:
        return sum(1 for w in self.writes_by(OURS, node) if w.op == "reboot")
