"""`hpresilience agent`: the node agent's main loop.

Two threads: the main thread follows the kernel log (every poll_interval, for
sub-second detection) and applies decisions; a monitor thread runs the NVML
and system checks every check_interval. A monitor that hangs or fails costs a
MonitorError and a metric, never the loop: the main thread keeps reading logs
and pinging systemd's watchdog.
"""
from __future__ import annotations

import dataclasses
import queue
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import structlog
from prometheus_client import start_http_server

from ..config import ConfigError
from ..finding import Finding, NodeAction
from ..sdnotify import Notifier
from ..slurm import CommandRunner, ScontrolBackend, SlurmError, SlurmGateway
from .actuator import Actuator, Outcome
from .config import AgentConfig
from .control import DRILL_MONITOR, ControlError, ControlServer, Injection, drill_finding
from .kernel_rules import RulesError, RuleSet, load_rules
from .logsource import LogSource, open_source
from .metrics import AgentMetrics, Loop
from .monitor import Monitor, MonitorError
from .monitors.nvml import NvmlErrorKind, NvmlMonitor, gpu_for_pci_bus_id, ignore_error
from .monitors.system import SystemMonitor
from .node import STAMP_SLACK_SECONDS, boot_time, node_name
from .policy import Policy

log = structlog.get_logger(__name__)

# A deferred decision (slurmctld unreachable) is retried with this backoff; one
# attempt per call, so the main loop (and the watchdog ping) never waits on
# Slurm for longer than one scontrol timeout.
RETRY_BACKOFF = (2.0, 4.0, 8.0, 16.0, 30.0, 60.0)
SCONTROL_TIMEOUT = 15.0  # below the unit's WatchdogSec=30
# While someone else's reason or a reboot is on the node, look again this often:
# once the admin returns the node, a fault seen meanwhile is acted on.
WAITING_RECHECK_SECONDS = 10.0
# A fault reported but not applied because its cluster-wide budget was spent is looked
# at again after this (and a random half of it more).
BUDGET_RECHECK_SECONDS = 600.0


def agent_gateway() -> SlurmGateway:
    return SlurmGateway(ScontrolBackend(CommandRunner(timeout=SCONTROL_TIMEOUT, attempts=1)))


def build_monitors(config: AgentConfig, on_nvml_error: Callable[[NvmlErrorKind], None] = ignore_error
                   ) -> List[Monitor]:
    monitors: List[Monitor] = []
    if config.nvml.enabled:
        monitors.append(NvmlMonitor(config.nvml, on_error=on_nvml_error))
    if config.system.enabled:
        monitors.append(SystemMonitor(config.system))
    return monitors


def run_monitor(monitor: Monitor, metrics: AgentMetrics) -> Optional[List[Finding]]:
    """One timed pass of one monitor; None when the monitor could not look."""
    started = time.monotonic()
    try:
        findings = monitor.check()
    except MonitorError as e:
        metrics.check_errors.labels(monitor.name).inc()
        metrics.check_healthy.labels(monitor.name).set(-1)
        log.warning("agent.check_failed", check=monitor.name, error=str(e))
        return None
    finally:
        metrics.check_duration.labels(monitor.name).observe(time.monotonic() - started)
    unhealthy = any(f.action is not NodeAction.NONE for f in findings)
    metrics.check_healthy.labels(monitor.name).set(0 if unhealthy else 1)
    return findings


class Agent:
    def __init__(self, config: AgentConfig, config_path: Optional[Path] = None,
                 gateway: Optional[SlurmGateway] = None, notifier: Optional[Notifier] = None):
        self.config_path = config_path
        self.gateway = gateway or agent_gateway()
        self.notifier = notifier or Notifier()
        self.metrics = AgentMetrics()
        self.boot_time = boot_time()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._lock = threading.Lock()
        self._state_findings: Dict[str, List[Finding]] = {}
        self._monitor_thread: Optional[threading.Thread] = None
        self._monitor_stop = threading.Event()
        self._settled: Optional[tuple] = None   # (decision signature, monotonic time it may be looked at again)
        self._retry_at = 0.0
        self._failures = 0
        # Drill findings from the control socket's thread, taken by the main loop (issue 13).
        self._injected: queue.SimpleQueue = queue.SimpleQueue()
        self._control: Optional[ControlServer] = None
        self._configure(config)

    # -------------------------------------------------------------- set-up
    def _configure(self, config: AgentConfig) -> None:
        """Build everything a configuration implies; raises before changing anything."""
        rules: RuleSet = load_rules(Path(config.kernel_log.rules_file) if config.kernel_log.rules_file else None)
        state_dir = Path(config.agent.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        sources = [open_source(spec, state_dir) for spec in config.kernel_log.sources]
        self.config = config
        self.rules = rules
        self.sources: List[LogSource] = sources
        self.node_name = node_name(config.agent.node_name)
        self.policy = Policy(config.policy, state_dir)
        self.policy.drop_events_before(self.boot_time)
        self.actuator = Actuator(self.gateway, self.node_name, dry_run=config.agent.dry_run,
                                 shared_cause=config.policy.shared_cause)
        self.monitors = build_monitors(self._with_expected_gpus(config), self.metrics.nvml_error)
        self.metrics.watch([m.name for m in self.monitors], [s.name for s in sources])

    def _with_expected_gpus(self, config: AgentConfig) -> AgentConfig:
        """Without nvml.expected_gpus, expect the physical GPUs Slurm's Gres says the node has: a GPU missing
        at boot, or lost before an agent restart, is then still a finding (the count seen
        since start would silently become the new normal)."""
        if config.nvml.expected_gpus is not None or not config.nvml.enabled:
            return config
        try:
            node = self.gateway.node(self.node_name)
        except SlurmError as e:
            log.warning("agent.expected_gpus_unknown", node=self.node_name, error=str(e))
            return config
        gpus = node.gpu_count
        if gpus is None:
            # No gpu GRES, or MIG instances, which are not GPUs (issue 9, defect 6): the monitor
            # expects the most GPUs it has seen; only nvml.expected_gpus catches one missing from the start.
            log.info("agent.expected_gpus_unknown", node=self.node_name, gres=",".join(node.gres),
                     hint="no physical GPU count in Slurm's Gres; set nvml.expected_gpus")
            return config
        log.info("agent.expected_gpus_from_slurm", node=self.node_name, gpus=gpus)
        return dataclasses.replace(config, nvml=dataclasses.replace(config.nvml, expected_gpus=gpus))

    def _start_monitor_thread(self) -> None:
        self._monitor_stop = threading.Event()
        thread = threading.Thread(target=self._monitor_loop, args=(self.monitors, self._monitor_stop),
                                  name="monitors", daemon=True)
        thread.start()
        self._monitor_thread = thread

    def _stop_monitor_thread(self) -> None:
        self._monitor_stop.set()
        if self._monitor_thread:
            # A monitor stuck in a hung driver call is a daemon thread: do not wait on it forever.
            self._monitor_thread.join(timeout=5)
        for monitor in self.monitors:
            monitor.close()

    # ---------------------------------------------------------------- loops
    def _monitor_loop(self, monitors: List[Monitor], stop: threading.Event) -> None:
        while not stop.is_set():
            self.check_once(monitors, stop)
            stop.wait(self.config.agent.check_interval_seconds)

    def check_once(self, monitors: List[Monitor], stop: threading.Event) -> None:
        """One pass of the check loop: every monitor once."""
        for monitor in monitors:
            if stop.is_set():
                return  # reloaded meanwhile: do not write findings for the old configuration
            try:
                findings = run_monitor(monitor, self.metrics)
            except Exception:
                self.metrics.loop_errors.inc()
                log.exception("agent.monitor_error", check=monitor.name)
                continue
            if findings is None:
                continue  # keep the last known state: "the checker failed" is not "healthy"
            self._record(findings, monitor.name)
            with self._lock:
                if not stop.is_set():
                    self._state_findings[monitor.name] = findings
        # A monitor that failed still finished its pass; only one that never returns stops this clock (issue 12).
        self.metrics.passed(Loop.CHECKS)

    def _record(self, findings: List[Finding], source: str) -> None:
        for finding in findings:
            if finding.monitor != DRILL_MONITOR:
                # A drill's fault is not the fleet's: faults-by-code dashboards and alerts must not
                # count it (issue 13 review); the agent's log and the node's reason still show it.
                self.metrics.findings.labels(finding.code, finding.action.value).inc()
            if self.policy.should_log(finding.key):
                log.info("agent.finding", node=self.node_name, source=source, **finding.to_dict())

    def gpu_for_pci(self, pci: str) -> Optional[str]:
        """The NVML index of the GPU at the PCI id in an XID line, from the last NVML
        snapshot, so kernel-log and NVML findings name a GPU the same way."""
        nvml = next((m for m in self.monitors if isinstance(m, NvmlMonitor)), None)
        snapshot = nvml.last_snapshot if nvml else None
        found = gpu_for_pci_bus_id(snapshot, pci) if snapshot else None
        return str(found[0]) if found else None

    def before_boot(self, finding: Finding) -> bool:
        """A line stamped before this boot is history (a restart can re-read the last second
        of a file, and /var/log/messages outlives reboots): that boot dealt with it."""
        return finding.observed_at < self.boot_time - STAMP_SLACK_SECONDS

    def read_kernel_log(self) -> None:
        budget = self.config.kernel_log.max_bytes_per_poll
        for source in self.sources:
            # Measured before the read, when the backlog is largest: after it, the gauge
            # would only ever show how little was left (it under-reported 5x in a flood).
            self.metrics.log_lag.labels(source.name).set(source.lag_bytes())
            errors = source.errors
            lines = source.read(budget)
            self.metrics.log_errors.labels(source.name).inc(source.errors - errors)
            self.metrics.log_lines.labels(source.name).inc(len(lines))
            # line.kernel_line: the message with the kernel's own stamp (issue 9, defect 10), None
            # for a line the kernel did not write or a file line without a date (defect 9).
            found = [f for f in (self.rules.classify(line.kernel_line, self.gpu_for_pci) for line in lines
                                 if line.kernel_line is not None)
                     if f is not None and not self.before_boot(f)]
            if found:
                self._add_events(found, source.name)

    def _add_events(self, found: List[Finding], source: str) -> None:
        counted = self.policy.add_events(found)
        self._record(counted, source)
        if self._failures == 0 and any(f.action is not NodeAction.NONE for f in counted):
            self._retry_at = 0.0  # a fresh fault is worth a look at Slurm now
            self._settled = None

    # ------------------------------------------------------- drills (issue 13)
    def start_control(self) -> None:
        """Serve the control socket, if configured; one that cannot be served is logged and the
        agent runs without it: detection matters more than drills. Read at start only."""
        path = self.config.agent.control_socket
        if not path:
            return
        try:
            self._control = ControlServer(Path(path), self.inject)
        except ControlError as e:
            log.error("agent.control_unavailable", error=str(e))
            return
        self._control.start()
        log.info("agent.control_listening", path=path)

    def stop_control(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None

    def inject(self, injection: Injection) -> Finding:
        """A drill's fault (on the control socket's thread): made by the current rules, then queued for
        the main loop, which takes it exactly as a kernel-log finding. RequestError for a code the
        rules give no action."""
        finding = drill_finding(self.rules, injection)
        self._injected.put(finding)
        log.info("agent.drill_injected", node=self.node_name, drill=injection.drill, code=finding.code,
                 entity=finding.entity, action=finding.action.value)
        return finding

    def take_injected(self) -> None:
        found: List[Finding] = []
        while True:
            try:
                found.append(self._injected.get_nowait())
            except queue.Empty:
                break
        if found:
            self._add_events(found, DRILL_MONITOR)

    def decide_and_act(self) -> Optional[Outcome]:
        with self._lock:
            state = [f for findings in self._state_findings.values() for f in findings]
        decision = self.policy.decide(state)
        self.metrics.pending_events.set(len(self.policy.pending_events))
        if decision is None:
            self._settled = None
            return None
        now = time.monotonic()
        signature = (decision.action, frozenset(f.key for f in decision.findings))
        if now < self._retry_at:
            return None
        if self._settled and self._settled[0] == signature and now < self._settled[1]:
            # Settled already: a persisting fault must not cost slurmctld an RPC per poll.
            return None
        outcome = self.actuator.apply(decision)
        self.metrics.actions.labels(decision.action.value, outcome.value).inc()
        if outcome.settled:
            self._failures = 0
            hold = self.config.agent.reverify_seconds
            if outcome is Outcome.BUDGET_SPENT:
                # Counting the partition's faults reads every node: in an outside event that hits
                # thousands of nodes, each agent looks again only this rarely, spread out.
                hold = max(hold, BUDGET_RECHECK_SECONDS * random.uniform(1.0, 1.5))
            self._settled = (signature, now + hold)
            self.policy.resolved(decision)
        elif outcome.waiting:
            self._failures = 0
            self._retry_at = now + WAITING_RECHECK_SECONDS
        else:  # deferred or failed: Slurm did not take it; keep the events and back off
            self._retry_at = now + RETRY_BACKOFF[min(self._failures, len(RETRY_BACKOFF) - 1)]
            self._failures += 1
        if outcome is not Outcome.APPLIED and self.policy.should_log(f"{outcome.value}:{decision.findings[0].key}"):
            log.info("agent.action", outcome=outcome.value, node=self.node_name, action=decision.action.value,
                     detail=decision.detail)
        return outcome

    def poll_once(self) -> Optional[Outcome]:
        """One pass of the main loop: read the kernel log and take injected drill faults, then decide and act."""
        self.read_kernel_log()
        self.take_injected()
        outcome = self.decide_and_act()
        # Only a pass that got here counts: one that raises every time is as stuck as a hung one (issue 12).
        self.metrics.passed(Loop.KERNEL_LOG)
        return outcome

    def reload(self) -> bool:
        """Re-read the config file; keep running on the old one if it is bad."""
        try:
            config = AgentConfig.load(self.config_path)
            load_rules(Path(config.kernel_log.rules_file) if config.kernel_log.rules_file else None)
        except (ConfigError, RulesError) as e:
            log.error("agent.reload_failed", error=str(e), config=str(self.config_path))
            return False
        self._stop_monitor_thread()
        with self._lock:
            self._state_findings.clear()  # a monitor switched off must not keep driving decisions
        for source in self.sources:
            source.close()  # before reopening: a source's close() saves its cursor
        old = self.config
        try:
            self._configure(config)
        except Exception as e:  # anything: the agent must come out of a reload running
            log.error("agent.reload_failed", error=str(e), config=str(self.config_path))
            self._configure(old)
            self._start_monitor_thread()
            return False
        self._start_monitor_thread()
        log.info("agent.reloaded", config=str(self.config_path))
        return True

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        if self.config.agent.metrics_port:
            try:
                start_http_server(self.config.agent.metrics_port, self.config.agent.metrics_address,
                                  registry=self.metrics.registry)
            except OSError as e:  # port taken: detection matters more than metrics
                log.error("agent.metrics_unavailable", port=self.config.agent.metrics_port, error=str(e))
        self._start_monitor_thread()
        self.start_control()
        self.notifier.ready(f"watching {self.node_name}: {', '.join(s.name for s in self.sources)}")
        log.info("agent.started", node=self.node_name, sources=[s.name for s in self.sources],
                 monitors=[m.name for m in self.monitors], dry_run=self.config.agent.dry_run)
        last_status = last_ping = 0.0
        ping_every = min(1.0, Notifier.watchdog_interval() or 1.0)
        try:
            while not self._stop.is_set():
                try:
                    self.poll_once()
                except Exception:
                    # A bug or an unexpected error in one pass must not take detection down
                    # with it; systemd's watchdog covers a loop that stops turning.
                    self.metrics.loop_errors.inc()
                    log.exception("agent.loop_error")
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                now = time.monotonic()
                if now - last_ping >= ping_every:
                    last_ping = now
                    self.notifier.watchdog()
                if now - last_status >= 5:
                    last_status = now
                    self.notifier.status(self._status_text())
                self._stop.wait(self.config.kernel_log.poll_interval_seconds)
        finally:
            self.notifier.stopping()
            self.stop_control()
            self._stop_monitor_thread()
            for source in self.sources:
                source.close()
            log.info("agent.stopped", node=self.node_name)
        return 0

    def _status_text(self) -> str:
        with self._lock:
            faults = sorted({f.code for fs in self._state_findings.values() for f in fs
                             if f.action is not NodeAction.NONE})
        pending = len(self.policy.pending_events)
        return f"{self.node_name}: {'faults ' + ','.join(faults) if faults else 'healthy'}, {pending} pending events"
