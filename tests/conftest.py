"""Fixtures for every test."""
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
