"""The agent's control socket (issue 13): a drill's fault injected by root goes the kernel-log finding's way
to an `Action:` reason carrying the drill's id; every bad request gets an error reply and the socket keeps
serving. A real Agent over the in-memory Slurm model (tests/slurm_model.py) with its real socket.

The socket lives in a short directory under /tmp, not in tmp_path: a Unix socket's path is limited to
107 bytes, which pytest's tmp_path for a long test name exceeds."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from hpresilience.action import NodeAction
from hpresilience.agent.config import AgentConfig
from hpresilience.agent.control import REQUEST_MAX_BYTES, ControlServer, refusal, request
from hpresilience.agent.daemon import Agent
from hpresilience.agent.kernel_rules import load_rules
from hpresilience.cli import main
from hpresilience.config import ConfigError
from hpresilience.sdnotify import Notifier
from hpresilience.slurm import SlurmGateway
from tests.slurm_model import SlurmModel

NOBODY = 65534
XID_LINE = "Nov 22 11:20:21 n1 kernel: NVRM: Xid (PCI:0000:b9:00): {xid}, pid=1234, name=python, drill"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hpr-ctl-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def make_agent(tmp_path: Path, control_socket: Path) -> Agent:
    config = AgentConfig()
    config.agent.node_name = "n1"
    config.agent.state_dir = str(tmp_path / "state")
    config.agent.control_socket = str(control_socket)
    config.kernel_log.sources = [str(tmp_path / "kern.log")]
    config.nvml.enabled = False
    config.system.enabled = False
    return Agent(config, gateway=SlurmGateway(SlurmModel("n[1-2]")), notifier=Notifier(""))


@pytest.fixture
def agent(tmp_path: Path, sock_dir: Path) -> Iterator[Agent]:
    agent = make_agent(tmp_path, sock_dir / "run" / "agent.sock")
    agent.start_control()
    yield agent
    agent.stop_control()


@pytest.fixture
def server(agent: Agent, sock_dir: Path) -> Iterator[ControlServer]:
    """The agent's own injection behind a second socket with a short request timeout, so a silent
    client costs the test a fraction of a second instead of the 5 s the agent gives one."""
    server = ControlServer(sock_dir / "short.sock", agent.inject, timeout=0.3)
    server.start()
    yield server
    server.close()


def socket_path(agent: Agent) -> Path:
    return Path(agent.config.agent.control_socket)


def exchange(path: Path, raw: bytes) -> Dict:
    """Send raw bytes as a client would, return the agent's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(path))
        client.sendall(raw)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


def exchange_as(uid: int, path: Path, raw: bytes) -> Dict:
    """`exchange` from a child process running as `uid` (the tests run as root here)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the reply, or the error that kept it from one
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = json.dumps(exchange(path, raw))
            except OSError as e:
                out = json.dumps({"client_error": type(e).__name__})
            os.write(write_end, out.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def inject(path: Path, code: str = "XID_74", drill: str = "t1", entity: Optional[str] = None) -> Dict:
    return request(path, {"inject": code, "drill": drill, **({"entity": entity} if entity else {})}, timeout=30)


# ------------------------------------------------------------------ the path


def test_an_injected_xid_74_fails_the_node_with_a_replace_reason_naming_the_drill(agent: Agent) -> None:
    with capture_logs() as logs:
        reply = inject(socket_path(agent), entity="GPU 0")
    assert reply["ok"], reply
    assert reply["finding"]["code"] == "XID_74" and reply["finding"]["action"] == "replace"
    assert reply["finding"]["monitor"] == "drill"
    assert reply["finding"]["message"] == "DRILL t1: XID 74 NVLINK_ERROR on GPU 0"
    assert any(e["event"] == "agent.drill_injected" and e["drill"] == "t1" for e in logs)
    assert agent.gateway.node("n1").reason is None  # taken by the main loop, not by the socket's thread

    agent.poll_once()

    node = agent.gateway.node("n1")
    assert "FAIL" in node.flags
    assert node.action_reason.action is NodeAction.REPLACE
    assert node.reason.startswith("Action: Replace; [XID_74@GPU 0] DRILL t1: ")
    # Acted on (the node is FAIL above, and the decision counted), never counted as the fleet's fault.
    assert agent.metrics.registry.get_sample_value(
        "hpr_agent_actions_total", {"action": "replace", "outcome": "applied"}) == 1
    assert agent.metrics.registry.get_sample_value(
        "hpr_agent_findings_total", {"code": "XID_74", "action": "replace"}) is None


@pytest.mark.parametrize("code,action", [("XID_79", NodeAction.REBOOT), ("XID_48", NodeAction.REBOOT),
                                         ("XID_73", NodeAction.REBOOT)])
def test_a_reboot_class_xid_gives_a_reboot_reason(agent: Agent, code: str, action: NodeAction) -> None:
    assert inject(socket_path(agent), code=code, drill="d-2.x")["ok"]
    agent.poll_once()
    node = agent.gateway.node("n1")
    assert node.action_reason.action is action
    assert f"[{code}] DRILL d-2.x: XID " in node.reason


def test_the_socket_is_0600_in_a_0700_directory_the_agent_made(agent: Agent) -> None:
    path = socket_path(agent)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_stopping_removes_the_socket(agent: Agent) -> None:
    path = socket_path(agent)
    assert path.exists()
    agent.stop_control()
    assert not path.exists()


# --------------------------------------------------- the same table as the rules


def test_each_catalog_xid_is_injectable_exactly_when_its_kernel_line_asks_for_an_action() -> None:
    rules = load_rules()
    for xid in sorted(rules.xid_catalog):
        from_line = rules.classify(XID_LINE.format(xid=xid))
        injected = rules.finding_for(f"XID_{xid}")
        assert injected is not None and from_line is not None
        assert injected.action is from_line.action, xid


def test_a_rule_with_a_fixed_code_is_found_and_an_entity_must_fit_its_template() -> None:
    rules = load_rules()
    fell_off = rules.finding_for("GPU_FELL_OFF_BUS", "GPU 0")
    assert (fell_off.action, fell_off.message, fell_off.entity) == (NodeAction.REBOOT, "GPU 0 has fallen off the bus",
                                                                    "GPU 0")
    assert rules.finding_for("GPU_FELL_OFF_BUS", "mlx5_0 port 1") is None
    assert rules.finding_for("NO_SUCH_CODE") is None


# ------------------------------------------------------------ bad requests


def test_refused_requests_get_an_error_and_the_socket_keeps_serving(agent: Agent) -> None:
    path = socket_path(agent)
    cases = {
        b'{"inject": "XID_45", "drill": "t1"}\n': "XID_45 asks for no action",
        b'{"inject": "XID_99999", "drill": "t1"}\n': "XID_99999 asks for no action",
        b'{"inject": "NO_SUCH_CODE", "drill": "t1"}\n': "no enabled rule gives NO_SUCH_CODE",
        b'{"inject": "xid_74", "drill": "t1"}\n': "inject: expected a finding code",
        b'{"inject": "XID_74", "drill": "a b"}\n': "drill: expected a drill id",
        b'{"inject": "XID_74", "drill": "' + b"x" * 41 + b'"}\n': "drill: expected a drill id",
        b'{"inject": "XID_74"}\n': "drill: expected a drill id",
        b'{"inject": "XID_74", "drill": "t1", "entity": "GPU [0]"}\n': "entity: expected a device name",
        b'{"inject": "XID_74", "drill": "t1", "entity": "mlx5_0"}\n': "no enabled rule gives XID_74 on 'mlx5_0'",
        b'{"inject": "XID_74", "drill": "t1", "user": "x"}\n': "unknown key 'user'",
        b'["XID_74"]\n': "expected one JSON object",
        b"not json\n": "not JSON",
        b"[" * 3000 + b"\n": "not JSON",
        b"\xff\xfe\n": "not JSON",
        b"\n": "expected one JSON object",
        b"x" * (REQUEST_MAX_BYTES + 500): f"request over {REQUEST_MAX_BYTES} bytes",
    }
    for raw, error in cases.items():
        reply = exchange(path, raw)
        assert reply["ok"] is False and error in reply["error"], (raw[:60], reply)
    assert agent._injected.empty()
    assert inject(path)["ok"]  # still serving


def test_a_client_that_says_nothing_times_out_and_the_next_is_served(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(30)
        silent.connect(str(server.path))
        reply = json.loads(silent.recv(65536))
    assert reply == {"ok": False, "error": "no complete request within 0.3 s"}
    assert inject(server.path)["ok"]


def test_a_request_without_a_newline_counts_when_the_client_ends_its_side(server: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(30)
        client.connect(str(server.path))
        client.sendall(b'{"inject": "XID_74", "drill": "t1"}')
        client.shutdown(socket.SHUT_WR)
        reply = json.loads(client.recv(65536))
    assert reply["ok"], reply


# ------------------------------------------------------------------- root only


def test_only_uid_0_passes_the_peer_check() -> None:
    assert refusal(0) is None
    assert refusal(1000) == "only root may inject faults (this request came from uid 1000)"


def test_a_non_root_client_is_refused_even_when_the_socket_mode_lets_it_connect(tmp_path: Path,
                                                                                 sock_dir: Path) -> None:
    """The peer check end to end: the socket made world-writable by mistake, a client of another uid
    connects and is refused by SO_PEERCRED. Here the tests run as root, so the client is a child
    process that dropped to nobody; as another user, the test process itself is that client."""
    sock_dir.chmod(0o755)
    agent = make_agent(tmp_path, sock_dir / "agent.sock")
    agent.start_control()
    try:
        socket_path(agent).chmod(0o666)
        raw = b'{"inject": "XID_74", "drill": "t1"}\n'
        with capture_logs() as logs:
            reply = exchange_as(NOBODY, socket_path(agent), raw) if os.geteuid() == 0 else exchange(
                socket_path(agent), raw)
        assert reply.get("ok") is False and reply["error"].startswith("only root may inject faults"), reply
        assert any(e["event"] == "agent.control_refused" for e in logs)
        agent.poll_once()
        assert agent.gateway.node("n1").reason is None
        assert agent._injected.empty()
    finally:
        agent.stop_control()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_the_socket_mode_keeps_other_users_from_connecting(tmp_path: Path, sock_dir: Path) -> None:
    sock_dir.chmod(0o755)  # only the socket's own mode stands in the way
    agent = make_agent(tmp_path, sock_dir / "agent.sock")
    agent.start_control()
    try:
        assert exchange_as(NOBODY, socket_path(agent), b"{}\n") == {"client_error": "PermissionError"}
    finally:
        agent.stop_control()


# ---------------------------------------------------------- the socket's file


def test_a_stale_socket_is_replaced(tmp_path: Path, sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # an earlier run's socket, nobody listening
    agent = make_agent(tmp_path, path)
    agent.start_control()
    try:
        assert inject(path)["ok"]
    finally:
        agent.stop_control()


def test_a_file_at_the_socket_path_is_left_alone_and_the_agent_runs_without_the_socket(tmp_path: Path,
                                                                                        sock_dir: Path) -> None:
    path = sock_dir / "agent.sock"
    path.write_text("an admin's file\n")
    agent = make_agent(tmp_path, path)
    with capture_logs() as logs:
        agent.start_control()
    assert [e["error"] for e in logs if e["event"] == "agent.control_unavailable"] == [
        f"{path} exists and is not a socket: not replaced (remove it, or set another [agent] control_socket)"]
    assert path.read_text() == "an admin's file\n"
    now = time.strftime("%b %d %H:%M:%S")  # a line of this boot: older ones are history
    (tmp_path / "kern.log").write_text(XID_LINE.replace("Nov 22 11:20:21", now).format(xid=79) + "\n")
    agent.poll_once()  # detection goes on
    assert agent.gateway.node("n1").action_reason.action is NodeAction.REBOOT


def test_a_directory_others_can_write_is_refused(tmp_path: Path, sock_dir: Path) -> None:
    """Issue 13 review: there others could plant a socket that answers (ours then off) or one for the
    stale check to remove."""
    sock_dir.chmod(0o777)
    path = sock_dir / "agent.sock"
    agent = make_agent(tmp_path, path)
    with capture_logs() as logs:
        agent.start_control()
    [error] = [e["error"] for e in logs if e["event"] == "agent.control_unavailable"]
    assert "writable by it alone" in error and not path.exists()


def test_a_socket_another_agent_serves_is_not_taken(agent: Agent, tmp_path: Path) -> None:
    second = make_agent(tmp_path / "second", socket_path(agent))
    with capture_logs() as logs:
        second.start_control()
    assert any(e["event"] == "agent.control_unavailable" and "another process serves" in e["error"] for e in logs)
    assert inject(socket_path(agent))["ok"]  # the first one still has it


def test_an_empty_setting_turns_the_socket_off(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, Path("/unused"))
    agent.config.agent.control_socket = ""
    with capture_logs() as logs:
        agent.start_control()
    assert agent._control is None and not logs


# --------------------------------------------------------------- the client


def test_the_inject_command_prints_the_finding(agent: Agent) -> None:
    result = CliRunner().invoke(main, ["agent", "inject", "XID_74", "--drill", "cli1", "--entity", "GPU 3",
                                       "--socket", str(socket_path(agent))])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["message"] == "DRILL cli1: XID 74 NVLINK_ERROR on GPU 3"


def test_the_inject_command_exits_1_with_the_agents_error(agent: Agent) -> None:
    result = CliRunner().invoke(main, ["agent", "inject", "XID_45", "--drill", "cli1",
                                       "--socket", str(socket_path(agent))])
    assert result.exit_code == 1
    assert "the agent refused: XID_45 asks for no action" in result.output


def test_the_inject_command_says_when_no_agent_listens(sock_dir: Path) -> None:
    missing = CliRunner().invoke(main, ["agent", "inject", "XID_74", "--drill", "t1",
                                        "--socket", str(sock_dir / "none.sock")])
    assert missing.exit_code == 2 and "no such socket" in missing.output
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(sock_dir / "stale.sock"))
    refused = CliRunner().invoke(main, ["agent", "inject", "XID_74", "--drill", "t1",
                                        "--socket", str(sock_dir / "stale.sock")])
    assert refused.exit_code == 2 and "connection refused" in refused.output



@pytest.mark.parametrize("value,error", [("agent.sock", "expected an absolute path"),
                                         ("/run/" + "x" * 110, "longer than a Unix socket's 107 bytes")])
def test_a_bad_control_socket_setting_is_a_config_error(tmp_path: Path, value: str, error: str) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[agent]\ncontrol_socket = "{value}"\n')
    with pytest.raises(ConfigError, match=error):
        AgentConfig.load(conf)


@pytest.mark.parametrize("code", ["XID_074", "XID_7_4", "XID_+74", "XID_ 74"])
def test_only_a_code_a_kernel_line_could_give_is_injectable(code: str) -> None:
    """Issue 13 review: these read as XID 74 through the template, with a key no real fault has."""
    rules = load_rules()
    assert rules.finding_for("XID_74", "GPU 0") is not None   # the real one is
    assert rules.finding_for(code, "GPU 0") is None
