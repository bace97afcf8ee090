"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_root() -> Path:
    """Where the real data lives: ``$CXRSERVE_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CXRSERVE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; skips the test when it is absent (a user's fresh machine)."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root
