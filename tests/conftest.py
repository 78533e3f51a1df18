"""Shared test setup: every test gets a private tuning cache and forgets in-memory decisions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from grouped_ops import dispatch

# Keep the default run well inside the CI budget on 2 cores; `--hypothesis-profile=thorough` digs deeper.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("default")

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path / "cache"))
    # The shipped tables match this project's own machines (CI too): tests must tune, not read them.
    (tmp_path / "no-shipped-tables").mkdir()
    monkeypatch.setenv("GROUPED_OPS_SHIPPED_DIR", str(tmp_path / "no-shipped-tables"))
    for var in ("GROUPED_OPS_AUTOTUNE", "GROUPED_OPS_IMPL", "GROUPED_OPS_BUCKETS", "GROUPED_OPS_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    # Small tuning budget: tests check behaviour, not speed.
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", "0.02")
    dispatch.clear_memory()
    yield
    dispatch.clear_memory()


@pytest.fixture
def shipped_tables(tmp_path):
    """The empty folder GROUPED_OPS_SHIPPED_DIR points at: a test puts reference tables here."""
    return tmp_path / "no-shipped-tables"


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
