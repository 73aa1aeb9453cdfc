import socket

from hpresilience.sdnotify import Notifier


def test_sends_datagrams(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        n = Notifier(path)
        n.ready("up")
        n.watchdog()
        assert server.recv(100) == b"READY=1\nSTATUS=up"
        assert server.recv(100) == b"WATCHDOG=1"


def test_abstract_socket_address():
    assert Notifier("@hpr-test").address == "\0hpr-test"


def test_without_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")  # no error


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier.watchdog_interval() is None
