"""`hpresilience agent`, `check` and `classify`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Tuple

import click

from ..config import ConfigError
from ..log import configure

DEFAULT_CONFIG = Path("/etc/hpresilience/agent.toml")


def _config_path(path: Optional[Path]) -> Optional[Path]:
    """An explicit --config must exist; the default file is optional."""
    if path is not None:
        return path
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def _load(path: Optional[Path]):
    from ..agent.config import AgentConfig
    try:
        return AgentConfig.load(_config_path(path))
    except ConfigError as e:
        click.echo(f"hpresilience: bad configuration: {e}", err=True)
        sys.exit(2)


config_option = click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                             help=f"Agent configuration (TOML). Default: {DEFAULT_CONFIG} if it exists.")


@click.group(invoke_without_command=True)
@config_option
@click.pass_context
def agent(ctx: click.Context, config_path: Optional[Path]) -> None:
    """Run the node agent (a systemd Type=notify service on every compute node).

    Without a subcommand, runs the daemon."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    from ..agent.daemon import Agent
    from ..agent.kernel_rules import RulesError
    from ..agent.logsource import LogSourceError
    config = _load(config_path)
    configure(level=config.agent.log_level, json=True)
    try:
        daemon = Agent(config, _config_path(config_path))
    except (RulesError, LogSourceError, ValueError, OSError) as e:
        click.echo(f"hpresilience agent: cannot start: {e}", err=True)
        sys.exit(2)
    sys.exit(daemon.run())


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding.")
@click.option("--apply", "apply", is_flag=True,
              help="Also take this node out of service for what was found, as the agent would "
                   "(for Slurm's HealthCheckProgram, which itself only logs a failure).")
def check(config_path: Optional[Path], as_json: bool, apply: bool) -> None:
    """One pass of every passive check; exit 0 if healthy, 1 with findings printed.

    Finishes in seconds; a check that could not look (exit 2) is kept apart
    from an unhealthy node (exit 1)."""
    from ..agent.oneshot import apply_result, run_check
    config = _load(config_path)
    try:
        result = run_check(config)
        if apply:
            outcome = apply_result(config, result)
            if outcome is not None:
                click.echo(f"action: {outcome.value}", err=True)
    except Exception as e:  # the checker failing is exit 2, never 1 ("unhealthy")
        click.echo(f"check failed: {type(e).__name__}: {e}", err=True)
        sys.exit(2)
    for finding in result.findings:
        if as_json:
            click.echo(json.dumps(finding.to_dict()))
        else:
            where = f" [{finding.entity}]" if finding.entity else ""
            click.echo(f"{finding.action.value.upper():8} {finding.code}{where}: {finding.message}")
    for error in result.errors:
        click.echo(f"check failed: {error}", err=True)
    if result.actionable:
        sys.exit(1)
    if result.errors:
        sys.exit(2)
    if not as_json:
        click.echo("healthy")


@click.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--rules", "rules_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Admin rules file merged over the shipped rules, as the agent would.")
@click.option("--all", "show_all", is_flag=True, help="Also print lines no rule matched (action none, rule null).")
@config_option
def classify(files: Tuple[Path, ...], rules_file: Optional[Path], show_all: bool, config_path: Optional[Path]) -> None:
    """Would these kernel-log lines drain a node, and why?

    Reads FILES (default: standard input) in syslog, dmesg, journal or
    /dev/kmsg form and prints one JSON object per line that matches a rule.
    `threshold` says when one line alone is not enough (e.g. 3 hung tasks in 15 min)."""
    from ..agent.kernel_rules import RulesError, load_rules
    thresholds = _load(config_path).policy.thresholds
    try:
        rules = load_rules(rules_file)
    except RulesError as e:
        click.echo(f"hpresilience: {e}", err=True)
        sys.exit(2)
    streams = [(str(p), open(p, "rb")) for p in files] if files else [("-", sys.stdin.buffer)]
    for name, stream in streams:
        with stream:
            for line_no, raw in enumerate(stream, start=1):
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                finding = rules.classify(text)
                if finding is None and not show_all:
                    continue
                record = {"file": name, "line_no": line_no}
                if finding is None:
                    record.update(action="none", rule=None, message=None, code=None, line=text[:500])
                else:
                    threshold = thresholds.get(finding.code)
                    record.update(action=finding.action.value, rule=finding.rule, message=finding.message,
                                  code=finding.code, component=finding.component, entity=finding.entity,
                                  slurm_state=finding.slurm_state,
                                  threshold={"count": threshold.count, "window_seconds": threshold.window_seconds}
                                  if threshold and threshold.count > 1 else None)
                click.echo(json.dumps(record))


@agent.command()
@click.argument("code")
@click.option("--drill", "drill_id", required=True,
              help="The drill's id ([A-Za-z0-9._-], 1-40): it marks the reason and the logs.")
@click.option("--entity", help='The device, e.g. "GPU 0" (default: the whole node).')
@click.option("--socket", "socket_path", type=click.Path(path_type=Path, dir_okay=False),
              help="The agent's control socket. Default: [agent] control_socket of the agent's configuration.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the agent.")
@click.pass_obj
def inject(config_path: Optional[Path], code: str, drill_id: str, entity: Optional[str],
           socket_path: Optional[Path], timeout: float) -> None:
    """Inject fault CODE (e.g. XID_74) into this node's agent as a drill (root only, issue 13).

    The agent acts on it as on the same fault in its kernel log, with the drill's id in the Slurm
    reason. Prints the agent's finding as JSON; exit 1 when the agent refuses, 2 when it cannot be reached."""
    from ..agent.control import RequestError, request
    if socket_path is None:
        configured = _load(config_path).agent.control_socket
        if not configured:
            click.echo("hpresilience agent inject: the agent's control socket is off ([agent] control_socket = \"\")",
                       err=True)
            sys.exit(2)
        socket_path = Path(configured)
    payload = {"inject": code, "drill": drill_id, **({"entity": entity} if entity is not None else {})}
    try:
        reply = request(socket_path, payload, timeout)
    except (OSError, RequestError) as e:
        click.echo(f"hpresilience agent inject: cannot reach the agent at {socket_path}: {_unreachable(e)}", err=True)
        sys.exit(2)
    if not reply["ok"]:
        click.echo(f"hpresilience agent inject: the agent refused: {reply.get('error')}", err=True)
        sys.exit(1)
    click.echo(json.dumps(reply.get("finding")))


def _unreachable(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such socket (is the agent running, with [agent] control_socket set?)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (a stale socket: the agent is not running)"
    if isinstance(error, PermissionError):
        return "permission denied (only root may inject)"
    return str(error) or type(error).__name__
