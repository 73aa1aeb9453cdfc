"""Providers: how a node is replaced or power-cycled, selected by [provider] type.

A provider call blocks (minutes for a cloud instance or a BMC) and runs on a
controller worker thread. Every call is bounded by timeout_seconds per attempt
and `attempts` in all; a failure is a ProviderError naming what went wrong, and
the workflow keeps the node out of service.
"""
from __future__ import annotations

import os
import pwd
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol

import structlog
import tenacity

from ..slurm import SlurmGateway
from ..slurm.gateway import NodeState
from .config import ProviderConfig, expand_argv

log = structlog.get_logger(__name__)

OUTPUT_LIMIT = 4096  # what we keep of a provider's output for the journal and logs


class ProviderError(Exception):
    pass


class ProviderInterrupted(ProviderError):
    """A previous run of this call was cut short (the controller died during it).
    It may have done its work, so it is not run again: the workflow waits for the
    node to show up instead, and gives up at the register timeout."""


# Journals a provider's facts before it acts, so a call made again after a crash
# can recognise what it already did (see Provider.replace).
Note = Callable[[Dict[str, object]], None]


@dataclass(frozen=True)
class ProviderResult:
    detail: str = ""
    spare: Optional[str] = None   # spare-pool: the node now serving in place of the broken one


class Provider(Protocol):
    name: str
    can_replace: bool
    can_power_cycle: bool
    replaces_in_place: bool   # the same node name comes back as new hardware (else a spare takes over)

    def replace(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        """Replace `node`. `facts` are what earlier calls for this workflow noted:
        a provider called again after a crash must use them not to act twice."""
    def power_cycle(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult: ...


class NoProvider:
    """Replace needs a human: the node stays out with a reason saying so."""
    name = "none"
    can_replace = False
    can_power_cycle = False
    replaces_in_place = True

    def replace(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        raise ProviderError("no provider configured ([provider] type = \"none\")")

    power_cycle = replace


def _printable(text: str) -> str:
    """A provider may print anything (binary garbage included); keep a readable tail."""
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)
    return text[-OUTPUT_LIMIT:].strip()


class CommandProvider:
    """Runs an admin's argv (never a shell): `{node}`, `{reason}`, `{action}` are
    filled in, and HPR_NODE / HPR_REASON / HPR_ACTION are set in its environment.
    Exit 0 means done; anything else (or the timeout) is a failed attempt."""
    name = "command"
    replaces_in_place = True

    def __init__(self, config: ProviderConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.sleep = sleep
        self.can_replace = bool(config.replace)
        self.can_power_cycle = bool(config.power_cycle)

    def replace(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        return self._run("replace", self.config.replace, node, reason, facts, note)

    def power_cycle(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        return self._run("power_cycle", self.config.power_cycle, node, reason, facts, note)

    def _run(self, action: str, template: List[str], node: str, reason: str, facts: Dict[str, object],
             note: Note) -> ProviderResult:
        if not template:
            raise ProviderError(f"provider.{action} is not configured")
        if facts.get("command_started"):
            raise ProviderInterrupted(f"provider.{action} was started at {facts['command_started']} and may have "
                                      "finished; not running it twice")
        note({"command_started": time.time()})
        argv = expand_argv(template, node=node, reason=reason, action=action)
        env = dict(os.environ, HPR_NODE=node, HPR_REASON=reason, HPR_ACTION=action)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.config.attempts),
            wait=tenacity.wait_fixed(self.config.retry_delay_seconds),
            retry=tenacity.retry_if_exception_type(ProviderError), sleep=self.sleep, reraise=True,
            before_sleep=lambda rs: log.warning("provider.retry", node=node, action=action,
                                                attempt=rs.attempt_number, error=str(rs.outcome.exception())))
        return retrying(self._once, argv, env)

    def _once(self, argv: List[str], env: Dict[str, str]) -> ProviderResult:
        started = time.monotonic()
        try:
            # Own session: on a timeout the whole tree the command started is killed.
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        except OSError as e:
            raise ProviderError(f"cannot run {argv[0]}: {e.strerror or e}") from None
        try:
            out, _ = proc.communicate(timeout=self.config.timeout_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise ProviderError(f"{argv[0]} timed out after {self.config.timeout_seconds:g}s: "
                                f"{_printable(out.decode('utf-8', 'replace'))[-200:]}") from None
        text = _printable(out.decode("utf-8", "replace"))
        log.info("provider.command", argv=argv, returncode=proc.returncode,
                 seconds=round(time.monotonic() - started, 2), output=text[-500:])
        if proc.returncode != 0:
            raise ProviderError(f"{argv[0]} exited {proc.returncode}: {text[-200:] or '(no output)'}")
        return ProviderResult(detail=text[-500:])


class PowerSaveProvider:
    """Slurm's power saving (cloud): POWER_DOWN_FORCE, wait for POWERED_DOWN, then
    POWER_UP; Slurm's ResumeProgram starts a fresh instance under the same name."""
    name = "power-save"
    can_replace = True
    can_power_cycle = True
    replaces_in_place = True

    def __init__(self, config: ProviderConfig, gateway: SlurmGateway, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.gateway = gateway
        self.sleep = sleep
        self.clock = clock

    def replace(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        # Powering down again after a crash is harmless: the node is not back yet.
        if not facts.get("powered_up"):
            self._power_down(node, reason)
        note({"powered_up": time.time()})
        self.gateway.set_state(node, NodeState.POWER_UP)
        return ProviderResult(detail="powered down and up through Slurm")

    power_cycle = replace

    def _power_down(self, node: str, reason: str) -> None:
        self.gateway.set_state(node, NodeState.POWER_DOWN_FORCE, reason)
        deadline = self.clock() + self.config.power_down_timeout_seconds
        while "POWERED_DOWN" not in self.gateway.node(node).flags:
            if self.clock() > deadline:
                raise ProviderError(f"{node} not powered down after {self.config.power_down_timeout_seconds:g}s")
            self.sleep(1.0)


class SparePoolProvider:
    """On-prem hot spares held out of scheduling in a Slurm reservation
    (reservations survive `scontrol reconfigure`). Replace takes an idle, healthy
    spare out of the reservation, into service; the broken node stays out until
    repaired (`hpresilience controller repaired NODE` returns it to the pool)."""
    name = "spare-pool"
    can_replace = True
    can_power_cycle = False
    replaces_in_place = False

    def __init__(self, config: ProviderConfig, gateway: SlurmGateway, user: Optional[str] = None):
        self.reservation = config.spare_reservation
        self.gateway = gateway
        self.user = user or pwd.getpwuid(os.geteuid()).pw_name
        self.lock = threading.Lock()  # two replacements at once never pick the same spare

    def pool(self) -> List[str]:
        found = self.gateway.reservation(self.reservation)
        if found is None:
            raise ProviderError(f"spare reservation {self.reservation!r} does not exist")
        return list(found.nodes)

    def pick(self, exclude: str) -> str:
        """An idle, healthy spare; ProviderError when the pool has none."""
        pool = [n for n in self.pool() if n != exclude]
        # Spares sit in a MAINT reservation, so "available" (which excludes MAINT) does not apply.
        healthy = [n for n in (self.gateway.nodes(pool) if pool else [])
                   if n.state == "IDLE" and n.is_responding and not n.is_drained and not n.reboot_pending
                   and not n.reason]
        if not healthy:
            raise ProviderError(f"no idle healthy spare in reservation {self.reservation!r} (pool: {pool or 'empty'})")
        return sorted(n.name for n in healthy)[0]

    def release(self, spare: str) -> None:
        """Take `spare` out of the pool (idempotent)."""
        pool = self.pool()
        if spare not in pool:
            return
        rest = [n for n in pool if n != spare]
        if rest:
            self.gateway.set_reservation_nodes(self.reservation, rest)
        else:  # Slurm refuses a reservation with no nodes
            self.gateway.delete_reservation(self.reservation)

    def add(self, node: str) -> None:
        found = self.gateway.reservation(self.reservation)
        if found is None:
            self.gateway.create_reservation(self.reservation, node, users=[self.user], minutes=None,
                                            flags=("MAINT", "IGNORE_JOBS"))
        elif node not in found.nodes:
            self.gateway.set_reservation_nodes(self.reservation, [*found.nodes, node])

    def replace(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        with self.lock:
            spare = facts.get("spare")
            if not isinstance(spare, str):
                spare = self.pick(exclude=node)
                note({"spare": spare})
            self.release(spare)
        return ProviderResult(detail=f"spare {spare} released into service", spare=spare)

    def power_cycle(self, node: str, reason: str, facts: Dict[str, object], note: Note) -> ProviderResult:
        raise ProviderError("the spare-pool provider cannot power-cycle nodes")


def make_provider(config: ProviderConfig, gateway: SlurmGateway) -> Provider:
    if config.type == "command":
        return CommandProvider(config)
    if config.type == "power-save":
        return PowerSaveProvider(config, gateway)
    if config.type == "spare-pool":
        return SparePoolProvider(config, gateway)
    return NoProvider()
