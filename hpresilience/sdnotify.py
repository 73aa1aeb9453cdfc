"""systemd notifications (READY, STATUS, WATCHDOG, STOPPING) for Type=notify units.

The protocol is one datagram to $NOTIFY_SOCKET; the python-systemd bindings
need libsystemd headers to build, which compute nodes often lack, so this is
the protocol itself. Without $NOTIFY_SOCKET (not under systemd) it does nothing."""
from __future__ import annotations

import os
import socket
from typing import Optional


class Notifier:
    def __init__(self, address: Optional[str] = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                sock.sendto(message, self.address)
        except OSError:
            pass  # systemd gone or socket full: never let notification break the daemon

    def ready(self, status: str) -> None:
        self.notify(ready="1", status=status)

    def watchdog(self) -> None:
        self.notify(watchdog="1")

    def status(self, text: str) -> None:
        self.notify(status=text)

    def stopping(self) -> None:
        self.notify(stopping="1")

    @staticmethod
    def watchdog_interval() -> Optional[float]:
        """Half of systemd's WatchdogSec, in seconds, or None when no watchdog is set."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None
