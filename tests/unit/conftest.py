"""Fixtures shared by the unit tests that load the fake NVML library."""
import shutil
from pathlib import Path

import pytest

from tests.fake_nvml import FakeGpuState, build_fake_nvml


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: the fake NVML library cannot be built")
    return build_fake_nvml(tmp_path_factory.getbasetemp() / "fake_nvml")


@pytest.fixture
def state(tmp_path: Path) -> FakeGpuState:
    return FakeGpuState(tmp_path / "node.state")
