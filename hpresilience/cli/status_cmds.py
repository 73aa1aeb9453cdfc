"""`hpresilience status` and `history`: what the controller is doing, for operators.

Both read the controller's journal (workflows, the circuit breaker) and never
change it; `status` adds what Slurm says about each node, through the gateway."""
from __future__ import annotations

import collections
import datetime as dt
import json
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import click

from ..config import ConfigError
from ..controller.config import DEFAULT_CONFIG_PATH, ControllerConfig
from ..controller.journal import Breaker, Event, Journal, Workflow
from ..slurm import CommandRunner, Node, ScontrolBackend, SlurmError, SlurmGateway
from ..slurm.models import NODE_CATEGORIES

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# --------------------------------------------------------------- formatting
def human_duration(seconds: Optional[float]) -> str:
    """A duration as an operator reads it.

    >>> [human_duration(s) for s in (None, 7, 192, 7500, 183600)]
    ['-', '7s', '3m12s', '2h05m', '2d03h']
    """
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def local_time(epoch: Optional[float]) -> str:
    return dt.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch is not None else "-"


def iso(epoch: Optional[float]) -> Optional[str]:
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds") if epoch is not None else None


def _times(name: str, epoch: Optional[float]) -> Dict[str, Any]:
    """`name` as epoch seconds and as ISO text, for JSON."""
    return {name: epoch, f"{name}_iso": iso(epoch)}


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns; the last one (free text) is not padded."""
    rows = [list(headers)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers) - 1)]
    return "\n".join(" ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows)


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _fail(message: str) -> None:
    click.echo(f"hpresilience: {message}", err=True)
    sys.exit(2)


class Since(click.ParamType):
    """An ISO time (local unless it names a zone) or a duration back from now: 30m, 2h, 1d."""
    name = "TIME"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        relative = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
        if relative:
            return time.time() - float(relative.group(1)) * UNITS[relative.group(2)]
        try:
            return dt.datetime.fromisoformat(text).timestamp()
        except ValueError:
            self.fail(f"{value!r} is neither an ISO time (2026-11-22T10:00) nor a duration (30m, 2h, 1d)",
                      param, ctx)


# ------------------------------------------------------------------ sources
def load_config(path: Optional[Path]) -> ControllerConfig:
    """An explicit --config must exist; the default file is used only if it does."""
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    try:
        return ControllerConfig.load(path)
    except ConfigError as e:
        _fail(f"bad configuration: {e}")


def make_gateway(config: ControllerConfig) -> SlurmGateway:
    """The gateway `status` reads nodes through (tests replace this). Two quick
    attempts: an operator waiting at a prompt wants the error, not 30 s of retries."""
    timeout = config.controller.slurm_timeout_seconds
    return SlurmGateway(ScontrolBackend(CommandRunner(timeout=timeout, attempts=2, max_delay=timeout)))


def open_journal(config: ControllerConfig) -> Optional[Journal]:
    """The controller's journal, or None when no controller has run (never created here)."""
    path = config.journal_path
    if not path.exists():
        return None
    try:
        return Journal(path)
    except (sqlite3.Error, OSError) as e:
        _fail(f"cannot read the controller journal {path}: {e}")


def no_journal_note(config: ControllerConfig) -> str:
    return f"no controller journal at {config.journal_path}: no controller has run with this configuration"


config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
    help=f"Controller configuration (TOML); it names the journal. Default: {DEFAULT_CONFIG_PATH} if it exists.")


# ------------------------------------------------------------------- status
def status_rows(nodes: List[Node], active: List[Workflow], now: float, show_all: bool,
                deepchecks: Optional[Dict[str, Event]] = None) -> List[Dict[str, Any]]:
    """A row per node out of service or with a workflow (every node with show_all), in Slurm's
    order, then workflows on nodes Slurm no longer knows. Each row carries the node's last
    deep-check result (issue 10)."""
    by_node = {w.node: w for w in active}
    checks = deepchecks or {}
    rows = []
    for node in nodes:
        wf = by_node.pop(node.name, None)
        if show_all or wf is not None or not node.available:
            rows.append(_row(node.name, node.state_text, node.reason, wf, now, checks.get(node.name)))
    rows += [_row(name, None, None, wf, now, checks.get(name)) for name, wf in by_node.items()]
    return rows


def _row(name: str, state: Optional[str], reason: Optional[str], wf: Optional[Workflow], now: float,
         deepcheck: Optional[Event] = None) -> Dict[str, Any]:
    return {"node": name, "state": state, "reason": reason,
            "workflow_id": wf.id if wf else None, "step": wf.step if wf else None,
            "action": wf.action if wf else None, **_times("step_since", wf.updated_at if wf else None),
            "step_seconds": now - wf.updated_at if wf else None,
            "deepcheck": {**deepcheck.detail, **_times("at", deepcheck.at)} if deepcheck else None}


def deepcheck_text(record: Optional[Dict[str, Any]], now: float) -> str:
    """A node's last deep check, short: "pass full 2h05m ago" / "fail quick 3m12s ago: dcgm"."""
    if not record:
        return "-"
    return gate_verdict(record, f" {human_duration(now - record['at'])} ago")


def gate_verdict(record: Dict[str, Any], when: str = "") -> str:
    failed = [f.split(":", 1)[0] for f in record.get("failed") or ()]
    return f"{record.get('status')} {record.get('level')}{when}" + (f": {','.join(failed)}" if failed else "")


def summary(nodes: List[Node], active: List[Workflow], journal: Optional[Path]) -> Dict[str, Any]:
    counts = collections.Counter(n.category for n in nodes)
    return {"total": len(nodes), **{c: counts[c] for c in NODE_CATEGORIES},
            "workflows": dict(collections.Counter(w.step for w in active)),
            "journal": str(journal) if journal else None}


def breaker_dict(breaker: Optional[Breaker]) -> Dict[str, Any]:
    if breaker is None:
        return {"tripped": None, "detail": "", "reset_by": "", **_times("tripped_at", None), **_times("reset_at", None)}
    return {"tripped": breaker.tripped, "detail": breaker.detail, "reset_by": breaker.reset_by,
            **_times("tripped_at", breaker.tripped_at), **_times("reset_at", breaker.reset_at)}


def summary_text(s: Dict[str, Any]) -> str:
    line = (f"{s['total']} nodes: {s['idle']} idle, {s['allocated']} allocated, {s['mixed']} mixed; "
            f"{s['drained']} drained, {s['failed']} failed, {s['down']} down")
    if s["other"]:
        line += f", {s['other']} other out of service"
    steps = ", ".join(f"{n} {step}" for step, n in sorted(s["workflows"].items()))
    return line + f". Workflows: {sum(s['workflows'].values())} active" + (f" ({steps})" if steps else "")


def breaker_text(breaker: Breaker, now: float) -> str:
    if breaker.tripped:
        ago = human_duration(now - breaker.tripped_at) if breaker.tripped_at is not None else "?"
        return (f"PAUSED: circuit breaker tripped {local_time(breaker.tripped_at)} ({ago} ago): {breaker.detail}"
                f" — run `hpresilience controller resume`")
    reset = f" (last reset {local_time(breaker.reset_at)} by {breaker.reset_by})" if breaker.reset_at else ""
    return f"Circuit breaker: not tripped{reset}"


@click.command()
@config_option
@click.option("--all", "show_all", is_flag=True,
              help="List every node, not only those out of service or in a workflow.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"nodes": [...], "summary": {...}, "breaker": {...}}.')
def status(config_path: Optional[Path], show_all: bool, as_json: bool) -> None:
    """Nodes out of service or in a remediation workflow, a cluster summary, and the circuit breaker."""
    config = load_config(config_path)
    try:
        nodes = make_gateway(config).nodes()
    except SlurmError as e:
        _fail(f"cannot read nodes from Slurm: {one_line(e)}")
    journal = open_journal(config)
    try:
        active = journal.active() if journal else []
        breaker = journal.breaker() if journal else None
        deepchecks = journal.last_events("deepcheck") if journal else {}
    finally:
        if journal:
            journal.close()
    now = time.time()
    rows = status_rows(nodes, active, now, show_all, deepchecks)
    counts = summary(nodes, active, config.journal_path if journal else None)
    if as_json:
        click.echo(json.dumps({"nodes": rows, "summary": counts, "breaker": breaker_dict(breaker)}, indent=2))
        return
    if journal is None:
        click.echo(no_journal_note(config), err=True)
    if rows:
        click.echo(table(["NODE", "STATE", "STEP", "ACTION", "SINCE", "DEEPCHECK", "REASON"],
                         [[r["node"], r["state"] or "(not in Slurm)", r["step"] or "-", r["action"] or "-",
                           human_duration(r["step_seconds"]), deepcheck_text(r["deepcheck"], now), r["reason"] or ""]
                          for r in rows]))
    else:
        click.echo("Every node is in service and no workflow is active.")
    click.echo(summary_text(counts))
    click.echo(breaker_text(breaker, now) if breaker else "Circuit breaker: unknown (no journal)")


# ------------------------------------------------------------------ history
def workflow_dict(wf: Workflow, events: List[Any]) -> Dict[str, Any]:
    return {"id": wf.id, "node": wf.node, "action": wf.action, "status": wf.status, "step": wf.step,
            "reason": wf.reason, **_times("detected_at", wf.detected_at), **_times("created_at", wf.created_at),
            **_times("updated_at", wf.updated_at), **_times("finished_at", wf.finished_at),
            "time_to_service_seconds": wf.time_to_service, "data": wf.data,
            "events": [{**_times("at", e.at), "kind": e.kind, "detail": e.detail} for e in events]}


@click.command()
@config_option
@click.option("--node", help="Only this node's workflows.")
@click.option("--since", type=Since(), help="Only workflows started since then: an ISO time (2026-11-22T10:00) "
                                            "or a duration back from now (30m, 2h, 1d).")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of workflows, each with its events.")
def history(config_path: Optional[Path], node: Optional[str], since: Optional[float], as_json: bool) -> None:
    """Remediation workflows from the controller's journal, newest last."""
    config = load_config(config_path)
    journal = open_journal(config)
    if journal is None:
        click.echo(no_journal_note(config), err=True)
        if as_json:
            click.echo("[]")
        return
    try:
        workflows = journal.history(node=node, since=since)
        # One query for all their events (a workflow's events come after it starts); events
        # has no index on workflow_id, so a query per workflow would scan the table each time.
        events: Dict[int, List[Any]] = collections.defaultdict(list)
        if as_json and workflows:
            for event in journal.events(node=node, since=min(w.created_at for w in workflows)):
                events[event.workflow_id].append(event)
    finally:
        journal.close()
    if as_json:
        click.echo(json.dumps([workflow_dict(w, events[w.id]) for w in workflows], indent=2))
        return
    if not workflows:
        click.echo("No workflows" + (" for that node" if node else "") + (" in that time" if since else "") + ".")
        return
    click.echo(table(["ID", "NODE", "ACTION", "STATUS", "STEP", "DETECTED", "FINISHED", "TO_SERVICE", "DEEPCHECK",
                      "REASON"],
                     [[str(w.id), w.node, w.action, w.status, w.step, local_time(w.detected_at),
                       local_time(w.finished_at), human_duration(w.time_to_service), _gate_text(w.data), w.reason]
                      for w in workflows]))


def _gate_text(data: Dict[str, Any]) -> str:
    """The workflow's deep-check gate, short: "pass quick", "fail full: dcgm", "off", "-"."""
    record = data.get("deepcheck")
    return gate_verdict(record) if isinstance(record, dict) else str(record or "-")
