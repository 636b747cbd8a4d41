"""Shared fixtures: a per-session image cache and the optional real data folder."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run in two pytest-xdist workers on two cores: one thread each (and in the processes they
# start), since two OpenMP threads per process on a busy core are many times slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches under pytest's temporary folder, never the user's home."""
    root = os.environ.get("READINGRACE_TEST_CACHE")
    cache = Path(root) if root else tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("READINGRACE_CACHE", str(cache))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
