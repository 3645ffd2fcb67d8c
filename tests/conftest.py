"""Fixtures shared by several test files, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_runtime_knobs import build_committed


@pytest.fixture(scope="session")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's dvc.yaml, params.yaml and code in a git+DVC repo with every stage
    committed (test_runtime_knobs, test_dvc_native). A test may change it only for its own
    duration and must leave `dvc status` clean."""
    return build_committed(tmp_path_factory)
