"""Fixtures shared by the unit tests that load the fake NVML library; the Hypothesis profile."""
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from tests.fake_nvml import FakeGpuState, build_fake_nvml

# CI (.ci/run) runs a fixed set of examples, so a red run is reproducible and a new example
# cannot fail a landing at random; a developer's run explores new ones each time.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: the fake NVML library cannot be built")
    return build_fake_nvml(tmp_path_factory.getbasetemp() / "fake_nvml")


@pytest.fixture
def state(tmp_path: Path) -> FakeGpuState:
    return FakeGpuState(tmp_path / "node.state")
