"""At most one active controller: an exclusive lock on a file in state_dir.

A second instance on the same host (started by mistake, or a standby) stays
passive: it keeps trying the lock and takes over within one poll interval
when the active one exits or dies (the kernel drops a dead process's lock).
The journal is SQLite in WAL mode, which needs a local filesystem: a standby
on another host needs the state directory moved over (or replicated), not a
network mount shared live.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


class LeaderLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        # Who holds it, for an admin looking at the file.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
