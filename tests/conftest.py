"""Shared test setup: every test gets a private tuning cache and forgets in-memory decisions."""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile

import pytest
import torch
from helpers import FakeTimer, replace_impl
from hypothesis import settings

from grouped_ops import dispatch
from grouped_ops.ops import SPECS
from grouped_ops.tuning import harness

# Keep the default run well inside the CI budget on 2 cores; `--hypothesis-profile=thorough` digs deeper.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile("default")

# A private inductor cache for the run: its FX-graph cache key does not cover a custom op's fake
# strides, so graphs compiled by an older version of the library (the contiguous result) would be
# loaded from a shared /tmp/torchinductor_<user> and fail their stride asserts (docs/adoption.md).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="grouped_ops-inductor-"))

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


SUITE_BUDGET_S = "0.02"  # the tuning budget of every test that does not set its own


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path / "cache"))
    # The shipped tables match this project's own machines (CI too): tests must tune, not read them.
    (tmp_path / "no-shipped-tables").mkdir()
    monkeypatch.setenv("GROUPED_OPS_SHIPPED_DIR", str(tmp_path / "no-shipped-tables"))
    # Private tuning locks too: another job on this host (another checkout's tests) must not make
    # a test wait, nor a test's kill -9 touch anyone else's lock.
    monkeypatch.setenv("GROUPED_OPS_LOCK_DIR", str(tmp_path / "locks"))
    for var in ("GROUPED_OPS_AUTOTUNE", "GROUPED_OPS_IMPL", "GROUPED_OPS_BUCKETS", "GROUPED_OPS_VERBOSE"):
        monkeypatch.delenv(var, raising=False)
    # Small tuning budget: tests check behaviour, not speed.
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", SUITE_BUDGET_S)
    # ... but the tuner's budget is on the real clock: a fake timer's rounds then end wherever a
    # busy machine happens to be (a fresh clone's run once cut a confirmation after 3 rounds and
    # flipped a test's outcome). Under a fake timer that does not sleep, the rounds end by count.
    real_use_timer = dispatch.use_timer

    @contextlib.contextmanager
    def use_timer(timer):
        lift = os.environ.get("GROUPED_OPS_TUNE_BUDGET_S") == SUITE_BUDGET_S and not getattr(timer, "sleep", 0)
        if lift:
            os.environ["GROUPED_OPS_TUNE_BUDGET_S"] = "30"
        try:
            with real_use_timer(timer):
                yield
        finally:  # real timings after the block keep the suite's budget
            if lift:
                os.environ["GROUPED_OPS_TUNE_BUDGET_S"] = SUITE_BUDGET_S
    monkeypatch.setattr(dispatch, "use_timer", use_timer)
    dispatch.clear_memory()
    yield
    dispatch.clear_memory()


@pytest.fixture
def shipped_tables(tmp_path):
    """The empty folder GROUPED_OPS_SHIPPED_DIR points at: a test puts reference tables here."""
    return tmp_path / "no-shipped-tables"


@pytest.fixture
def count_tunings(monkeypatch):
    """How many times the dispatcher really tuned (timed candidates for) a signature."""
    counter = collections.Counter()
    real = harness.measure

    def counting(spec, sig, s, at=None, only=None, **kwargs):
        if only is None:  # a first tuning, not batch prewarm's second opinion
            counter[sig.key()] += 1
        return real(spec, sig, s, at, only, **kwargs)

    monkeypatch.setattr(harness, "measure", counting)
    return counter


@pytest.fixture
def ran(monkeypatch):
    """Names of the implementations that ran, in order (every one of both ops wrapped)."""
    log: list[str] = []
    for op in SPECS:
        for name, implementation in list(SPECS[op].registry.items()):
            def spy(*args, _fn=implementation.fn, _name=f"{op}.{name}"):
                log.append(_name)
                return _fn(*args)
            replace_impl(monkeypatch, op, name, spy)
    return log


@pytest.fixture
def tunings(monkeypatch):
    """Counts the tunings (timings of candidates for a signature) and which candidates each timed;
    ``tunings.timer(tables)`` is a fake timer whose times come from ``tables[i]`` during tuning i."""

    class Tunings:
        def __init__(self) -> None:
            self.only: list[frozenset[str] | None] = []  # what each tuning timed: None for every candidate
            self.batches: list[int] = []  # the batch size each tuning timed at

        def timer(self, tables: list[dict[str, float]], default: float = 1e-3) -> FakeTimer:
            return FakeTimer({name: (lambda count, name=name: tables[min(len(self.only), len(tables)) - 1]
                                     .get(name, default))
                              for name in {n for t in tables for n in t}}, default=default)

    seen = Tunings()
    real = harness.measure

    def measuring(spec, sig, s, at=None, only=None, **kwargs):
        seen.only.append(None if only is None else frozenset(only))
        seen.batches.append((at or sig).dim("batch"))
        return real(spec, sig, s, at, only, **kwargs)

    monkeypatch.setattr(harness, "measure", measuring)
    return seen


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
