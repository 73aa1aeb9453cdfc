"""`hpresilience controller`: the remediation daemon next to slurmctld.

One loop: hold the leader lock (or stay a passive standby), run a reconcile
pass every poll interval, ping systemd's watchdog. Long steps (provider calls,
the verification job) run on worker threads, so a pass stays short and a hung
provider or srun costs its own timeout, never the loop.
"""
from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import structlog
from prometheus_client import start_http_server

from ..config import ConfigError
from ..sdnotify import Notifier
from ..slurm import CommandRunner, ScontrolBackend, SlurmError, SlurmGateway
from .autoresume_events import AutoResumeEvents
from .config import ControllerConfig
from .journal import Journal, JournalError
from .leader import LeaderLock
from .metrics import ControllerMetrics
from .providers import make_provider
from .reconcile import PassReport, Reconciler

log = structlog.get_logger(__name__)

# On SIGTERM, running steps get this long to finish before the process exits;
# a step cut short is recognised from the journal on the next start.
STOP_GRACE_SECONDS = 10.0


def controller_gateway(config: ControllerConfig) -> SlurmGateway:
    # One attempt per call: a pass that cannot reach slurmctld is simply retried
    # on the next interval, and the loop keeps pinging the watchdog meanwhile.
    return SlurmGateway(ScontrolBackend(CommandRunner(timeout=config.controller.slurm_timeout_seconds, attempts=1)))


class Controller:
    def __init__(self, config: ControllerConfig, config_path: Optional[Path] = None,
                 notifier: Optional[Notifier] = None, overrides: Optional[Callable[[ControllerConfig], None]] = None):
        # `overrides` re-applies command-line options (--dry-run, --mode) to every
        # configuration loaded, so a reload never turns a dry run into a live one.
        self.overrides = overrides or (lambda c: None)
        self.overrides(config)
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.metrics = ControllerMetrics()
        self.gateway = controller_gateway(config)
        self.journal = Journal(config.journal_path)
        self.lock = LeaderLock(config.lock_path)
        self.reconciler = Reconciler(config, self.gateway, self.journal, make_provider(config.provider, self.gateway),
                                     metrics=self.metrics, heartbeat=self.notifier.watchdog)
        self.autoresume_events = self._autoresume_events(config)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last: Optional[PassReport] = None

    def _autoresume_events(self, config: ControllerConfig) -> Optional[AutoResumeEvents]:
        directory = config.controller.autoresume_state_dir
        return AutoResumeEvents(Path(directory), self.metrics) if directory else None

    def stop(self) -> None:
        self._stop.set()

    def reload(self) -> bool:
        """SIGHUP: mode, limits, breaker, timeouts and provider from the file;
        a bad file keeps the running configuration."""
        try:
            config = ControllerConfig.load(self.config_path)
            self.overrides(config)
        except ConfigError as e:
            log.error("controller.reload_failed", error=str(e), detail="keeping the running configuration")
            return False
        if config.controller.state_dir != self.config.controller.state_dir:
            log.error("controller.reload_failed", error="state_dir cannot change without a restart")
            return False
        if config.controller.autoresume_state_dir != self.config.controller.autoresume_state_dir:
            if self.autoresume_events is not None:
                self.autoresume_events.stop.set()
            self.autoresume_events = self._autoresume_events(config)
            if self.autoresume_events is not None:
                self.autoresume_events.run_in_background(lambda: self.lock.held)
        self.config = config
        self.gateway = controller_gateway(config)
        self.reconciler.reconfigure(config, self.gateway, make_provider(config.provider, self.gateway))
        log.info("controller.reloaded", mode=config.controller.mode, dry_run=config.controller.dry_run)
        return True

    def tick(self) -> None:
        """One turn of the loop: leadership, then a pass if we lead."""
        if not self.lock.held:
            if not self.lock.try_acquire():
                self.metrics.leader.set(0)
                return
            log.info("controller.leader", lock=str(self.config.lock_path))
            if self.autoresume_events is not None:
                self.autoresume_events.start_counting()
        self.metrics.leader.set(1)
        started = time.monotonic()
        try:
            report = self.reconciler.run_pass()
        except SlurmError as e:
            self.metrics.pass_errors.labels("slurm").inc()
            log.warning("controller.pass_failed", error=str(e), detail="retrying next interval")
            return
        except (sqlite3.Error, JournalError) as e:
            # A locked or damaged journal: act on nothing we cannot record.
            self.metrics.pass_errors.labels("journal").inc()
            log.error("controller.journal_error", error=f"{type(e).__name__}: {e}", path=str(self.config.journal_path))
            return
        self.metrics.pass_seconds.observe(time.monotonic() - started)
        # The positive sign a test (or an admin at debug level) waits for before it concludes
        # that nothing happened (issue 9, defect 15).
        log.debug("controller.pass", nodes=report.nodes, flagged=report.flagged, active=report.active,
                  paused=report.paused, seconds=round(report.seconds, 3))
        self.metrics.breaker.set(1 if report.paused else 0)
        self.metrics.last_pass.set(time.time())
        self._last = report

    def status_text(self) -> str:
        if not self.lock.held:
            return f"standby: another controller holds {self.config.lock_path} ({self.lock.holder()})"
        r = self._last
        if r is None:
            return "active: first pass pending"
        paused = "PAUSED by circuit breaker (hpresilience controller resume); " if r.paused else ""
        return f"active{'' if self.reconciler.automatic else ' (recommend only)'}: {paused}{r.nodes} nodes, " \
               f"{r.active} workflows, pass {r.seconds * 1000:.0f} ms"

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        section = self.config.controller
        if section.metrics_port:
            try:
                start_http_server(section.metrics_port, section.metrics_address, registry=self.metrics.registry)
            except OSError as e:
                log.error("controller.metrics_unavailable", port=section.metrics_port, error=str(e))
        if self.autoresume_events is not None:
            # Its own thread: a hung shared file system must never hold up a pass (issue 12 review).
            self.autoresume_events.run_in_background(lambda: self.lock.held)
        self.notifier.ready("starting")
        log.info("controller.started", mode=section.mode, dry_run=section.dry_run, provider=self.config.provider.type,
                 journal=str(self.config.journal_path))
        was_leader = None
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                try:
                    self.tick()
                except Exception:
                    self.metrics.pass_errors.labels("bug").inc()
                    log.exception("controller.loop_error")
                if was_leader is not self.lock.held and not self.lock.held:
                    log.warning("controller.standby", holder=self.lock.holder(),
                                detail="another controller is active; staying passive")
                was_leader = self.lock.held
                self.notifier.watchdog()
                self.notifier.status(self.status_text())
                self._stop.wait(self.config.controller.poll_interval_seconds)
        finally:
            self.notifier.stopping()
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        if self.autoresume_events is not None:
            self.autoresume_events.stop.set()
        self.reconciler.executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for node, future in list(self.reconciler.inflight.items()):
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # still running or failed: the journal has what the next start needs
                log.warning("controller.step_cut_short", node=node)
        self.lock.release()
        log.info("controller.stopped")
