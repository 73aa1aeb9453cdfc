"""Fixtures for every test."""
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_defaults():
    """A test that runs the CLI leaves structlog configured at the CLI's level (warning): a later test
    capturing info events would see none. Each test starts from structlog's defaults (found when the
    suite first ran on two workers, issue 13: the order of files changed)."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module", autouse=True)
def _module_lock(request) -> Iterator[None]:
    """Under ./scripts/test's two pytest-xdist workers: every module holds a shared lock while it runs,
    one marked `alone` an exclusive one, so nothing else runs beside a timing-sensitive module (issue 13:
    the all-reduce check read a healthy pair slow while the other worker's cluster ran). A worker holds
    one module's lock at a time, so the two cannot deadlock."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:   # one process: nothing runs beside anything
        yield
        return
    fd = os.open(Path(tempfile.gettempdir()) / f"hpresilience-tests-{run}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if request.node.get_closest_marker("alone") else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)   # releases the lock
