"""The autotuner's rules, each checked with a fake timer: deterministic, no GPU, no real clock.

A fake timer is ``timer(name, fn, number) -> seconds per call``; installing one with
``dispatch.use_timer`` makes the tuner believe whatever the test says about each implementation.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch, use_impl
from grouped_ops.dispatch import resolve
from grouped_ops.ops import SPECS
from grouped_ops.recording import prewarm_signatures
from grouped_ops.signature import Signature
from grouped_ops.tuning import harness, store
from grouped_ops.tuning import tuner as tuner_module
from grouped_ops.tuning.settings import settings
from grouped_ops.tuning.tuner import tune

GL, WC = SPECS["grouped_linear"], SPECS["weighted_combine"]
REPO = Path(__file__).resolve().parents[1]


class FakeTimer:
    """Says each implementation takes ``times[name]`` seconds (a number, or a function of how many
    times that name has been timed), optionally raising, sleeping or really running ``fn``."""

    def __init__(self, times: dict[str, Any] | None = None, *, default: float = 1e-4, run: bool = False,
                 sleep: float = 0.0, fail: dict[str, Callable[[int], BaseException | None]] | None = None):
        self.times, self.default, self.run, self.sleep = dict(times or {}), default, run, sleep
        self.fail = dict(fail or {})
        self.calls: collections.Counter[str] = collections.Counter()
        self.results: dict[str, Any] = {}
        self.compiling: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
        with self._lock:
            self.calls[name] += 1
            count = self.calls[name]
        self.compiling.append(torch.compiler.is_compiling())
        if self.run:
            self.results[name] = fn()
        if self.sleep:
            time.sleep(self.sleep)
        if name in self.fail and (exc := self.fail[name](count)) is not None:
            raise exc
        t = self.times.get(name, self.default)
        return t(count) if callable(t) else t


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


def gl_args(batch: int = 8, n: int = 4, inn: int = 8, out: int = 8, *, grad: bool = False,
            bias: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)  # never the global RNG: some tests watch it
    x = torch.randn(batch, n, inn, generator=g)
    w = torch.randn(n, out, inn, generator=g).requires_grad_(grad)
    b = torch.randn(n, out, generator=g).requires_grad_(grad) if bias else None
    return x, w, b


def wc_args(batch: int = 8, k: int = 4, f: int = 16, *, as_list: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if as_list:
        inputs: Any = [torch.randn(batch, f, generator=g) for _ in range(k)]
    else:
        inputs = torch.randn(batch, k, f, generator=g)
    return inputs, torch.softmax(torch.randn(batch, k, generator=g), -1)


def replace_impl(monkeypatch, op: str, name: str, fn: Callable[..., Any]) -> None:
    """Swap one implementation's function for the rest of the test (Implementation is frozen)."""
    registry = SPECS[op].registry
    monkeypatch.setitem(registry._impls, name, dataclasses.replace(registry._impls[name], fn=fn))


def disk_entries() -> list[dict[str, Any]]:
    return list(store.DiskStore().entries())


# ---- picking ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
@pytest.mark.parametrize("fastest", ["einsum", "loop", "masked_dense"])
def test_picks_the_fastest_by_median_and_keeps_every_timing(op, fastest):
    times = {name: 1e-4 for name in SPECS[op].registry}
    times[fastest] = 5e-5
    args = gl_args() if op == "grouped_linear" else wc_args()
    with dispatch.use_timer(FakeTimer(times)):
        d = grouped_ops.prewarm(op, *args)
    assert (d.impl, d.source) == (fastest, "tuned")
    assert d.timings == times  # every candidate timed, each at its (fake) median
    (entry,) = disk_entries()
    assert entry["impl"] == fastest and entry["timings"] == d.timings  # every candidate's timing, on disk


def test_median_not_mean_decides():
    # bmm: mostly 10us with two 10ms hiccups (mean ~0.8ms); einsum: a steady 15us
    def bmm_time(count: int) -> float:
        return 1e-2 if count in (3, 7) else 1e-5

    with dispatch.use_timer(FakeTimer({"bmm": bmm_time, "einsum": 1.5e-5}, default=1e-3)):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm"
    assert d.timings["bmm"] == pytest.approx(1e-5)


@pytest.mark.parametrize("faster_by", [0.001, 0.004, 0.009])
def test_near_ties_go_to_the_registry_preference_order(faster_by):
    # einsum is "faster" by less than the noise band (>= 1%): bmm, earlier in the registry, wins
    times = {"bmm": 1e-5, "einsum": 1e-5 * (1 - faster_by)}
    with dispatch.use_timer(FakeTimer(times, default=1e-3)):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm"
    assert d.timings["einsum"] < d.timings["bmm"]


def test_near_ties_agree_across_repeated_runs():
    # jitter flips which of the two looks faster from run to run; the choice must not flip
    winners = set()
    for run, sign in enumerate([1, -1, 1, -1]):
        dispatch.clear_memory()
        store.DiskStore().clear()
        times = {"bmm": 1e-5 * (1 + sign * 0.004), "einsum": 1e-5 * (1 - sign * 0.004)}
        with dispatch.use_timer(FakeTimer(times, default=1e-3)):
            winners.add(grouped_ops.prewarm("grouped_linear", *gl_args(seed=run)).impl)
    assert winners == {"bmm"}


def test_a_clear_winner_beats_the_preference_order():
    with dispatch.use_timer(FakeTimer({"bmm": 1e-5, "einsum": 0.9e-5}, default=1e-3)):
        assert grouped_ops.prewarm("grouped_linear", *gl_args()).impl == "einsum"


# ---- failures, numerics, memory --------------------------------------------------------------------

def test_a_candidate_the_timer_sees_raise_is_skipped_and_recorded(caplog):
    timer = FakeTimer({"einsum": 1e-6}, fail={"einsum": lambda n: RuntimeError("boom\nsecond line")})
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl != "einsum" and "einsum" not in d.timings
    assert d.skipped["einsum"] == "raised RuntimeError: boom"
    assert any("excluded einsum" in r.getMessage() for r in caplog.records)
    assert disk_entries()[0]["skipped"]["einsum"] == "raised RuntimeError: boom"


def test_a_candidate_that_raises_later_cannot_win():
    # fastest on its first sample, then fails (an intermittent OOM, say): it must not be chosen
    timer = FakeTimer({"loop": 1e-7}, fail={"loop": lambda n: RuntimeError("later") if n == 3 else None})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl != "loop" and "loop" not in d.timings
    assert d.skipped["loop"].startswith("raised RuntimeError")


def test_an_implementation_raising_oom_is_skipped(monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    replace_impl(monkeypatch, "grouped_linear", "einsum", oom)
    with dispatch.use_timer(FakeTimer({"einsum": 1e-7})):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm" and d.source == "tuned"
    assert d.skipped["einsum"].startswith("raised OutOfMemoryError: CUDA out of memory")
    x, w, b = gl_args()
    torch.testing.assert_close(grouped_ops.grouped_linear(x, w, b), grouped_ops.grouped_linear(x, w, b, impl="loop"))


def test_every_candidate_failing_falls_back_to_the_default_and_is_not_persisted():
    fail = {name: (lambda n: RuntimeError("no")) for name in GL.registry}
    with dispatch.use_timer(FakeTimer(fail=fail)):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert (d.impl, d.source) == ("bmm", "default")
    assert disk_entries() == []


def test_a_numerically_wrong_candidate_is_excluded_and_logged(monkeypatch, caplog):
    def wrong(x, w, b):
        return SPECS["grouped_linear"].registry["bmm"].fn(x, w, b) * 1.01

    replace_impl(monkeypatch, "grouped_linear", "einsum", wrong)
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), \
            dispatch.use_timer(FakeTimer({"einsum": 1e-7})):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl != "einsum" and "einsum" not in d.timings
    assert d.skipped["einsum"].startswith("disagrees with bmm: relative error")
    assert any("excluded einsum" in r.getMessage() and "disagrees" in r.getMessage() for r in caplog.records)


def test_a_candidate_with_a_wrong_gradient_is_excluded_in_training(monkeypatch):
    bmm = GL.registry["bmm"].fn

    def wrong_grad(x, w, b):  # right forward, doubled weight gradient
        return bmm(x, w.detach() + 2 * (w - w.detach()), b)

    replace_impl(monkeypatch, "grouped_linear", "einsum", wrong_grad)
    with dispatch.use_timer(FakeTimer({"einsum": 1e-7})):
        inference = grouped_ops.prewarm("grouped_linear", *gl_args())
        training = grouped_ops.prewarm("grouped_linear", *gl_args(grad=True))
    assert inference.impl == "einsum"  # its forward is right
    assert training.impl != "einsum"
    assert training.skipped["einsum"].startswith("disagrees with bmm")


def test_masked_dense_is_not_tried_over_the_memory_budget(monkeypatch):
    # block-diagonal weight: n*n*out*in*4 bytes = 4*4*8*8*4 = 4 KiB; allow 1 KiB
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "1024")
    timer = FakeTimer({"masked_dense": 1e-9})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert "masked_dense" not in timer.calls and "masked_dense" not in d.timings
    assert "over the tuning memory budget" in d.skipped["masked_dense"]
    assert d.impl == "bmm"


def test_the_default_memory_budget_is_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_FRACTION", "1e-15")  # a few bytes of this machine's RAM
    timer = FakeTimer({"masked_dense": 1e-9})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("weighted_combine", *wc_args())
    assert "masked_dense" not in timer.calls
    assert "GROUPED_OPS_TUNE_MEMORY_FRACTION" in d.skipped["masked_dense"]


def test_unsupported_candidates_are_not_timed_and_say_why():
    x, w, b = gl_args(inn=6, out=6)  # grouped_mm needs 16-byte aligned rows: 6 floats are 24 bytes
    x, w, b = x.double(), w.double(), b.double()  # ... and does not take float64
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert "grouped_mm" not in timer.calls
    assert d.skipped["grouped_mm"].startswith("unsupported: dtype float64")


def test_clear_losers_are_cut_early(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", "30")  # only the cuts, not the clock, stop timing
    monkeypatch.setenv("GROUPED_OPS_TUNE_REPS", "25")
    # einsum 20% behind bmm: outside the close-call band, so no confirmation samples are added
    timer = FakeTimer({"bmm": 1e-5, "einsum": 1.2e-5, "grouped_mm": 4e-5, "loop": 1e-3, "masked_dense": 1e-4})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm"
    assert timer.calls["bmm"] == timer.calls["einsum"] == 25
    assert timer.calls["loop"] == 2  # 100x slower: cut once two samples agree
    assert timer.calls["grouped_mm"] == 3  # 4x slower: cut once three samples agree
    assert set(d.timings) == set(GL.registry)  # a cut candidate's timing still stands


def test_an_expensive_candidate_predicted_over_budget_is_never_run(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", "0.05")
    ran = []
    replace_impl(monkeypatch, "grouped_linear", "masked_dense",
                 lambda *a: ran.append(1) or GL.registry["bmm"].fn(*a))
    # masked_dense does n=64 times the arithmetic: 64 x 1 ms leader > 50 ms budget
    timer = FakeTimer({"bmm": 1e-3}, default=2e-3)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args(batch=2, n=64, inn=4, out=4))
    assert ran == [] and "masked_dense" not in timer.calls
    assert d.skipped["masked_dense"].startswith("predicted ~0.064s a call")


@pytest.mark.parametrize("leader_s, runs", [(2e-3, False), (2e-4, True)])
def test_on_cpu_a_candidate_doing_10x_a_slow_leaders_arithmetic_is_not_run(monkeypatch, leader_s, runs):
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", "30")  # far from the absolute cap
    # masked_dense does n=16 times the arithmetic. A 2 ms leader is bound by arithmetic: masked_dense
    # cannot win, so it is not run. Next to a 0.2 ms leader, overheads may dominate: it is tried.
    timer = FakeTimer({"bmm": leader_s}, default=2 * leader_s)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args(batch=2, n=16, inn=4, out=4))
    assert ("masked_dense" in timer.calls) == runs
    if not runs:
        assert d.skipped["masked_dense"] == ("predicted ~0.032s a call (16x the arithmetic of bmm, whose first call "
                                             "took 2 ms): it cannot win")


def test_tune_alone_needs_no_op():
    result = tune(["a", "b"], make_run=lambda name: lambda: (torch.ones(1),), timer=FakeTimer({"b": 1e-5}),
                  check=lambda ref, got: None)
    assert result.winner == "b"
    assert result.timings == {"a": 1e-4, "b": 1e-5}
    assert result.skipped == {}


def test_one_slow_sample_does_not_cut_a_candidate():
    # einsum's first sample caught a stall (a preempted thread): 50x the leader. It must be timed
    # again, and win on its real speed.
    timer = FakeTimer({"bmm": 1e-5, "einsum": lambda n: 5e-4 if n == 1 else 0.9e-5}, default=1e-3)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "einsum" and d.timings["einsum"] == pytest.approx(0.9e-5)
    assert timer.calls["einsum"] > 2


def test_the_time_budget_stops_the_timing_rounds_by_the_clock():
    clock = iter(range(1000))  # every look at the clock: one second later
    timer = FakeTimer({"a": 1e-4, "b": 2e-4})  # b 2x behind: no close-call confirmation
    tune(["a", "b"], make_run=lambda name: lambda: (torch.ones(1),), timer=timer,
         check=lambda ref, got: None, budget_s=1.5, max_reps=25, clock=lambda: float(next(clock)))
    # the first sample each, one round within the budget, then the next look at the clock ends it
    assert timer.calls == {"a": 2, "b": 2}


def test_the_time_budget_stops_a_close_calls_confirmation_after_a_few_rounds():
    clock = iter(range(1000))  # every look at the clock: one second later
    timer = FakeTimer({"a": 1e-4, "b": 1.02e-4})  # close: confirmed
    tune(["a", "b"], make_run=lambda name: lambda: (torch.ones(1),), timer=timer,
         check=lambda ref, got: None, budget_s=1.5, max_reps=25, clock=lambda: float(next(clock)))
    # 2 samples each in the rounds (as above); confirmation: CONFIRM_BUDGET_ROUNDS rounds without
    # looking at the clock, one more while within the budget, then the clock ends it
    assert timer.calls == {"a": 2 + tuner_module.CONFIRM_BUDGET_ROUNDS + 1, "b": 2 + tuner_module.CONFIRM_BUDGET_ROUNDS + 1}


# ---- private inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_tuning_never_touches_the_callers_tensors_or_rng(monkeypatch, grad):
    x, w, b = gl_args(grad=grad)
    x.requires_grad_(grad)
    before = [t.detach().clone() for t in (x, w, b)]
    versions = [t._version for t in (x, w, b)]
    seen = set()
    for name, implementation in list(GL.registry.items()):
        def spy(*args, _fn=implementation.fn):
            seen.update(t.data_ptr() for t in args if isinstance(t, torch.Tensor))
            return _fn(*args)
        replace_impl(monkeypatch, "grouped_linear", name, spy)

    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    with dispatch.use_timer(FakeTimer(run=True)):
        y = grouped_ops.grouped_linear(x, w, b)  # first auto call: tunes, then runs on the caller's tensors
    assert torch.equal(torch.get_rng_state(), rng), "tuning consumed the global RNG"
    assert lookup_source(x, w, b) == "cache"
    for t, old, version in zip((x, w, b), before, versions, strict=True):
        assert torch.equal(t, old) and t._version == version and t.grad is None
    assert y.requires_grad == grad
    # the tuner saw only its own tensors (the real call above is the one use of the caller's)
    dispatch.clear_memory()
    store.DiskStore().clear()
    seen.clear()
    with dispatch.use_timer(FakeTimer(run=True)):
        grouped_ops.prewarm("grouped_linear", x, w, b)
    assert seen and not seen & {x.data_ptr(), w.data_ptr(), b.data_ptr()}


def lookup_source(*args: Any) -> str | None:
    d = grouped_ops.lookup("grouped_linear", *args)
    return None if d is None else d.source


# ---- the key -----------------------------------------------------------------------------------------

def test_grad_mode_is_part_of_the_key_and_training_is_timed_forward_and_backward():
    # The fake timer runs each candidate: a training run returns (output, *gradients).
    def timer(name, fn, number):
        result = fn()
        training = len(result) > 1
        seen.append((name, training, [tuple(t.shape) for t in result]))
        # in inference loop is fastest, in training einsum
        return {"loop": 1e-6 if not training else 1e-3, "einsum": 1e-6 if training else 1e-3}.get(name, 1e-4)

    seen: list[Any] = []
    x, w, b = gl_args(grad=True)
    with dispatch.use_timer(timer):
        with torch.no_grad():
            grouped_ops.grouped_linear(x, w, b)
        y = grouped_ops.grouped_linear(x, w, b)
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    with torch.no_grad():
        inference = grouped_ops.lookup("grouped_linear", x, w, b)
    training = grouped_ops.lookup("grouped_linear", x, w, b)
    assert inference.impl == "loop" and training.impl == "einsum"
    assert inference.signature.grad == () and training.signature.grad == ("weight", "bias")
    assert inference.signature.key() != training.signature.key()
    # the training decision timed forward + backward: output plus gradients of weight and bias
    assert any(t and shapes == [(8, 4, 8), (4, 8, 8), (4, 8)] for _, t, shapes in seen)
    assert {e["key"].rsplit(" grad=", 1)[1] for e in disk_entries()} == {"- batch=8", "weight,bias batch=8"}


def test_requires_grad_under_no_grad_is_inference():
    with dispatch.use_timer(FakeTimer()), torch.no_grad():
        d = grouped_ops.prewarm("grouped_linear", *gl_args(grad=True))
    assert d.signature.grad == ()


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_batch_sizes_1_to_512_tune_about_ten_times(op, count_tunings):
    with dispatch.use_timer(FakeTimer()):
        for batch in range(1, 513):
            if op == "grouped_linear":
                x = torch.randn(batch, 2, 4)
                grouped_ops.grouped_linear(x, torch.randn(2, 4, 4))
            else:
                grouped_ops.weighted_combine(torch.randn(batch, 2, 4), torch.randn(batch, 2))
    assert sum(count_tunings.values()) == 10  # 1, 2, 4, ..., 512
    assert len(disk_entries()) == 10


def test_exact_bucketing_mode(monkeypatch, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_BUCKETS", "exact")
    w = torch.randn(2, 4, 4)
    with dispatch.use_timer(FakeTimer()):
        for batch in range(1, 41):
            grouped_ops.grouped_linear(torch.randn(batch, 2, 4), w)
    assert sum(count_tunings.values()) == 40
    assert sorted(e["signature"]["dims"]["batch"] for e in disk_entries()) == list(range(1, 41))


def test_leading_dims_fold_into_one_batch(count_tunings):
    w = torch.randn(2, 4, 4)
    with dispatch.use_timer(FakeTimer()):
        grouped_ops.grouped_linear(torch.randn(4, 8, 2, 4), w)  # 32 rows
        grouped_ops.grouped_linear(torch.randn(32, 2, 4), w)
        grouped_ops.grouped_linear(torch.randn(2, 4), w)  # unbatched: 1 row
    assert sorted(e["signature"]["dims"]["batch"] for e in disk_entries()) == [1, 32]
    assert sum(count_tunings.values()) == 2


def test_weight_layout_is_part_of_the_key():
    x, w, b = gl_args()
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # the same values stored [n, in, out]
    with dispatch.use_timer(FakeTimer()):
        a = grouped_ops.prewarm("grouped_linear", x, w, b)
        t = grouped_ops.prewarm("grouped_linear", x, w_t, b)
    assert a.signature.layout_of("weight") == "contiguous"
    assert t.signature.layout_of("weight") == "transposed"
    assert a.signature.key() != t.signature.key()


# ---- when tuning is not allowed ----------------------------------------------------------------------

def test_autotune_off_tunes_nothing_and_writes_nothing(monkeypatch, tmp_path, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    timer = FakeTimer()
    x, w, b = gl_args()
    with dispatch.use_timer(timer):
        y = grouped_ops.grouped_linear(x, w, b)
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
        wc = grouped_ops.prewarm("weighted_combine", *wc_args(as_list=True))
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop"))
    assert (d.impl, d.source) == ("bmm", "default")  # remembered from the call above, still a guess
    assert (wc.impl, wc.source) == ("loop", "default")  # the documented rule for lists
    assert not timer.calls and not count_tunings
    assert not (tmp_path / "cache").exists()
    dispatch.clear_memory()
    assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "default"


def test_autotune_off_uses_the_disk_cache_and_stale_entries(monkeypatch):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "einsum"
    x2, w2, b2 = gl_args(n=2)
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        assert grouped_ops.prewarm("grouped_linear", x2, w2, b2).impl == "loop"
    _make_stale(grouped_ops.lookup("grouped_linear", x2, w2, b2).signature.key())
    dispatch.clear_memory()
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        fresh = grouped_ops.prewarm("grouped_linear", x, w, b)
        stale = grouped_ops.prewarm("grouped_linear", x2, w2, b2)
    assert (fresh.impl, fresh.source) == ("einsum", "cache")
    assert (stale.impl, stale.source) == ("loop", "stale")  # better than a guess when we may not tune
    assert not timer.calls


def test_autotune_off_answers_a_new_batch_size_from_the_nearest_tuned_one(monkeypatch):
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.prewarm("grouped_linear", *gl_args(batch=64))
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    d = grouped_ops.prewarm("grouped_linear", *gl_args(batch=100))
    assert (d.impl, d.source) == ("einsum", "nearest")
    other = grouped_ops.prewarm("grouped_linear", *gl_args(batch=100, n=3))  # another family
    assert other.source == "default"


def test_never_tunes_while_compiling(monkeypatch, count_tunings):
    x, w, b = gl_args()
    timer = FakeTimer()
    with monkeypatch.context() as m, dispatch.use_timer(timer):
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        y = dispatch.call(GL, (x, w, b), "auto")
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop"))
    assert not timer.calls and not count_tunings
    assert grouped_ops.lookup("grouped_linear", x, w, b) is None  # a tracing-time answer is not kept
    assert disk_entries() == []


def test_torch_compile_does_not_tune_while_tracing():
    x, w, b = gl_args()
    timer = FakeTimer()

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, w, b):
        return grouped_ops.grouped_linear(x, w, b) * 2

    with dispatch.use_timer(timer):
        y = f(x, w, b)
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop") * 2)
    assert not any(timer.compiling), "timed a candidate while dynamo was tracing"
    # cold: the compiled code's custom op decided when it really ran
    assert grouped_ops.lookup("grouped_linear", x, w, b) is not None


def test_never_tunes_on_meta_or_fake_tensors(count_tunings):
    from torch._subclasses.fake_tensor import FakeTensorMode

    timer = FakeTimer()
    with dispatch.use_timer(timer):
        x, w, b = (t.to("meta") for t in gl_args())
        # the dispatcher itself: the public functions trip over autocast on meta (see below)
        assert dispatch.call(GL, (x, w, b), "auto").shape == (8, 4, 8)
        assert dispatch.call(WC, tuple(t.to("meta") for t in wc_args()), "auto").shape == (8, 16)
        with FakeTensorMode():
            x, w, b = torch.empty(8, 4, 8), torch.empty(4, 8, 8), torch.empty(4, 8)
            assert grouped_ops.grouped_linear(x, w, b).shape == (8, 4, 8)
    assert not timer.calls and not count_tunings
    assert disk_entries() == []


def test_never_tunes_while_capturing_a_cuda_graph(monkeypatch):
    # No GPU needed: a CUDA signature is only a description; ask the rule itself.
    sig = dataclasses.replace(grouped_ops.prewarm("grouped_linear", *gl_args()).signature,
                              device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert resolve._tuning_blocker(sig, None, settings(), True) == ("capturing a CUDA graph", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert resolve._tuning_blocker(sig, None, settings(), True) == (None, False)


def test_public_ops_run_on_meta_tensors():
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        x, w, b = (t.to("meta") for t in gl_args())
        assert grouped_ops.grouped_linear(x, w, b).shape == (8, 4, 8)
        assert grouped_ops.weighted_combine(*(t.to("meta") for t in wc_args())).shape == (8, 16)
    assert not timer.calls


# ---- forcing -----------------------------------------------------------------------------------------

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


def test_use_impl_forces_in_scope_and_restores_on_exit(ran):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.grouped_linear(x, w, b)  # tunes: einsum
    ran.clear()
    grouped_ops.grouped_linear(x, w, b)
    with use_impl(grouped_linear="loop"):
        grouped_ops.grouped_linear(x, w, b)
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "forced"
        with use_impl("masked_dense"):  # nested: innermost wins, both ops
            grouped_ops.grouped_linear(x, w, b)
            grouped_ops.weighted_combine(*wc_args())
        grouped_ops.grouped_linear(x, w, b)
    grouped_ops.grouped_linear(x, w, b)
    assert ran == ["grouped_linear.einsum", "grouped_linear.loop", "grouped_linear.masked_dense",
                   "weighted_combine.masked_dense", "grouped_linear.loop", "grouped_linear.einsum"]


def test_use_impl_restores_on_exception(ran):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.grouped_linear(x, w, b)
    with pytest.raises(KeyError), use_impl(grouped_linear="loop"):
        grouped_ops.grouped_linear(x, w, b)
        raise KeyError("inside")
    ran.clear()
    grouped_ops.grouped_linear(x, w, b)
    assert ran == ["grouped_linear.einsum"]


def test_use_impl_checks_names_and_support():
    with pytest.raises(GroupedOpsError, match="use_impl: unknown impl 'bmmm'; valid options are"), use_impl("bmmm"):
        pass
    with pytest.raises(GroupedOpsError, match="unknown op"), use_impl(grouped_linearr="bmm"):
        pass
    x, w, b = gl_args(inn=6, out=6)
    with use_impl(grouped_linear="grouped_mm"), pytest.raises(GroupedOpsError, match="not a multiple"):
        grouped_ops.grouped_linear(x, w, b)


def test_grouped_ops_impl_env_forces_globally(monkeypatch, ran):
    monkeypatch.setenv("GROUPED_OPS_IMPL", "loop")
    timer = FakeTimer({"einsum": 1e-6})
    x, w, b = gl_args()
    with dispatch.use_timer(timer):
        grouped_ops.grouped_linear(x, w, b)
        grouped_ops.weighted_combine(*wc_args())
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert ran == ["grouped_linear.loop", "weighted_combine.loop"]
    assert (d.impl, d.source) == ("loop", "env")
    assert grouped_ops.lookup("grouped_linear", x, w, b).source == "env"
    assert not timer.calls and disk_entries() == []


def test_grouped_ops_impl_env_per_op_and_typos(monkeypatch, ran):
    monkeypatch.setenv("GROUPED_OPS_IMPL", "grouped_linear=einsum,weighted_combine=broadcast")
    grouped_ops.grouped_linear(*gl_args())
    grouped_ops.weighted_combine(*wc_args())
    assert ran == ["grouped_linear.einsum", "weighted_combine.broadcast"]
    dispatch.clear_memory()
    monkeypatch.setenv("GROUPED_OPS_IMPL", "bmmm")
    with pytest.raises(GroupedOpsError, match="GROUPED_OPS_IMPL"):
        grouped_ops.grouped_linear(*gl_args())


def test_the_env_wins_over_a_remembered_decision(monkeypatch):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "einsum"
    monkeypatch.setenv("GROUPED_OPS_IMPL", "loop")
    assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "loop"


# ---- threads -----------------------------------------------------------------------------------------

def test_threads_first_calling_one_signature_tune_it_once(monkeypatch, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_TUNE_REPS", "1")
    # sleep: widen the window in which a second tuning could start; bmm far ahead: no confirmation
    timer = FakeTimer({"bmm": 1e-6}, default=1e-3, sleep=0.005)
    barrier = threading.Barrier(8)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    x, w, b = gl_args()

    def first_call() -> None:
        try:
            barrier.wait()
            results.append(grouped_ops.grouped_linear(x, w, b))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with dispatch.use_timer(timer):
        threads = [threading.Thread(target=first_call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert len(results) == 8 and all(torch.equal(r, results[0]) for r in results)
    assert list(count_tunings.values()) == [1]
    assert sum(timer.calls.values()) == len(GL.registry)  # each candidate timed once, by one thread


# ---- persistence across processes --------------------------------------------------------------------

def test_record_then_prewarm_in_another_process_then_lookup(tmp_path, monkeypatch):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = grouped_ops.GroupedLinear(4, 8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.heads(x)  # [b, 4, 8]
            return grouped_ops.weighted_combine(list(h.unbind(1)), torch.softmax(h.mean(-1), -1))

    model = Model()
    x = torch.randn(24, 4, 8)
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")  # recording needs no tuning
    with grouped_ops.record() as rec:
        with torch.no_grad():
            model(x)
        model(x).sum().backward()  # training: other signatures
    assert len(rec.signatures) == 4
    path = tmp_path / "signatures.jsonl"
    rec.save(path)
    assert [Signature.from_spec(json.loads(line)) for line in path.read_text().splitlines()] == rec.signatures

    env = {**os.environ, "GROUPED_OPS_AUTOTUNE": "1", "GROUPED_OPS_TUNE_BUDGET_S": "0.01",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "grouped_ops", "prewarm", "--from", str(path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prewarmed 4 signature(s): 4 tuned" in proc.stdout

    dispatch.clear_memory()
    chosen = {}
    for line in proc.stdout.splitlines():
        if line.strip().startswith("-> "):
            chosen.setdefault(len(chosen), line.split()[1])
    with torch.no_grad():
        d = grouped_ops.lookup("grouped_linear", x, model.heads.weight, model.heads.bias)
    assert d is not None and d.source == "cache" and d.impl == chosen[0]
    assert d.timings  # every candidate's timing came along
    trained = grouped_ops.lookup("grouped_linear", x, model.heads.weight, model.heads.bias)
    assert trained is not None and trained.source == "cache" and trained.signature.grad == ("weight", "bias")


def _make_stale(key: str) -> None:
    path = store.DiskStore().path_for(key)
    entry = json.loads(path.read_text())
    entry["fingerprint"]["torch"] = "0.0.1"
    path.write_text(json.dumps(entry))


def test_an_entry_naming_an_implementation_that_no_longer_exists_is_retuned(count_tunings):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer()):
        key = grouped_ops.prewarm("grouped_linear", x, w, b).signature.key()
    path = store.DiskStore().path_for(key)
    path.write_text(path.read_text().replace('"impl": "bmm"', '"impl": "renamed_away"'))
    dispatch.clear_memory()
    with dispatch.use_timer(FakeTimer()):
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert (d.impl, d.source) == ("bmm", "tuned")
    assert sum(count_tunings.values()) == 2


def test_a_stale_entry_alone_is_retuned(count_tunings):
    a, b = gl_args(n=2), gl_args(n=3)
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        key_a = grouped_ops.prewarm("grouped_linear", *a).signature.key()
        key_b = grouped_ops.prewarm("grouped_linear", *b).signature.key()
    _make_stale(key_a)
    b_file = store.DiskStore().path_for(key_b)
    b_before = b_file.read_text()
    dispatch.clear_memory()
    count_tunings.clear()
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        da = grouped_ops.prewarm("grouped_linear", *a)
        db = grouped_ops.prewarm("grouped_linear", *b)
    assert (da.impl, da.source) == ("loop", "tuned")
    assert (db.impl, db.source) == ("einsum", "cache")
    assert dict(count_tunings) == {key_a: 1}
    assert b_file.read_text() == b_before
    entry = store.DiskStore().get(key_a)
    assert entry["impl"] == "loop" and entry["fingerprint"] == store.fingerprint(dispatch.impl_set_version(GL))


def test_decision_sources():
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer()):
        assert grouped_ops.lookup("grouped_linear", x, w, b) is None
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "tuned"
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "cache"  # memory
        dispatch.clear_memory()
        assert grouped_ops.lookup("grouped_linear", x, w, b).source == "cache"  # disk
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "cache"
    d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert str(d).startswith("bmm (cache) for grouped_linear(batch=8")
    assert "bmm" in d.table() and "*" in d.table()


def test_autotuner_doc_runs(tmp_path, monkeypatch):
    """Every ```python block of docs/autotuner.md, top to bottom, in one namespace."""
    text = (REPO / "docs" / "autotuner.md").read_text()
    blocks = [part.split("```", 1)[0] for part in text.split("```python\n")[1:]]
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # the examples write signatures.jsonl
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "docs/autotuner.md", "exec"), namespace)
    assert (tmp_path / "signatures.jsonl").exists()


def test_decisions_are_logged_and_printed_on_request(monkeypatch, capsys, caplog):
    monkeypatch.setenv("GROUPED_OPS_VERBOSE", "1")
    with caplog.at_level(logging.INFO, logger="grouped_ops"), dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.grouped_linear(*gl_args())
    line = "-> einsum (tuned)"
    assert line in capsys.readouterr().err
    assert any(line in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_a_close_call_gets_paired_confirmation_samples():
    # einsum looks 10% behind in the rounds but is faster in the paired confirmation samples
    def einsum_time(count: int) -> float:
        return 1.1e-3 if count <= 25 else 0.9e-3
    timer = FakeTimer({"bmm": 1e-3, "einsum": einsum_time}, default=1e-2)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    # ~1 ms samples (one call each): rounds until einsum's 0.9 ms samples cover CONFIRM_MIN_S
    rounds = math.ceil(tuner_module.CONFIRM_MIN_S / 0.9e-3)
    assert tuner_module.CONFIRM_MIN_ROUNDS < rounds < tuner_module.CONFIRM_MAX_ROUNDS
    assert timer.calls["bmm"] == timer.calls["einsum"] == 25 + rounds
    assert d.impl == "einsum"


def test_a_fast_close_call_is_confirmed_for_at_most_the_round_cap():
    timer = FakeTimer({"bmm": 1e-6, "einsum": 1.05e-6}, default=1e-3)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert timer.calls["bmm"] == timer.calls["einsum"] == 25 + tuner_module.CONFIRM_MAX_ROUNDS
    assert d.impl == "bmm"


def test_every_candidate_in_the_close_call_band_is_confirmed():
    # grouped_mm is third in the rounds (12% behind) but the fastest in the paired samples
    def grouped_mm_time(count: int) -> float:
        return 1.12e-3 if count <= 25 else 0.8e-3
    timer = FakeTimer({"bmm": 1e-3, "einsum": 1.05e-3, "grouped_mm": grouped_mm_time}, default=1e-2)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert timer.calls["bmm"] == timer.calls["einsum"] == timer.calls["grouped_mm"] > 25
    assert d.impl == "grouped_mm"


def test_a_close_call_is_decided_by_paired_ratios_not_by_raw_medians():
    # Confirmation rounds of three kinds: einsum 10% and 7% faster than bmm in the same round, and
    # once 45% slower (a stall hit it). Raw medians say bmm (2.0 vs 2.8 ms); back to back, einsum
    # wins two rounds of three, and its median ratio is 0.93.
    kinds = [(1.0e-3, 0.9e-3), (3.0e-3, 2.8e-3), (2.0e-3, 2.9e-3)]

    def timing(which: int) -> Callable[[int], float]:
        return lambda count: (1e-3, 1.05e-3)[which] if count <= 25 else kinds[(count - 26) % 3][which]

    timer = FakeTimer({"bmm": timing(0), "einsum": timing(1)}, default=1e-1)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "einsum"
    assert d.timings["einsum"] / d.timings["bmm"] == pytest.approx(2.8 / 3.0)


def test_the_near_tie_band_is_the_uncertainty_of_the_median_not_the_spread_of_samples():
    # einsum is 3% faster with +-10% noise per sample. Its samples spread ~10%, but the median of
    # ~30 of them is known to ~2%: a real difference, not a tie for the preference order.
    timer = FakeTimer({"bmm": 1e-3, "einsum": lambda count: 0.97e-3 * (1 + 0.1 * ((count % 5) - 2) / 2)},
                      default=1e-1)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "einsum", d.table()


def test_an_unresolved_close_call_is_timed_until_its_gap_exceeds_its_noise():
    # einsum is 3% faster with +-20% noise per sample: after 30 ms of samples the gap is still within
    # the uncertainty (~3.3%), so confirmation goes on until it is not, and einsum wins
    timer = FakeTimer({"bmm": 1e-3, "einsum": lambda count: 0.97e-3 * (1 + 0.2 * ((count % 5) - 2) / 2)},
                      default=1e-1)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    covered = math.ceil(tuner_module.CONFIRM_MIN_S / 0.97e-3)
    assert 25 + covered < timer.calls["einsum"] < 25 + tuner_module.CONFIRM_MAX_ROUNDS
    assert d.impl == "einsum", d.table()


def test_a_candidate_slowed_in_most_rounds_but_fast_in_some_is_confirmed_and_can_win():
    # A busy spell: loop's round samples are mostly 7.5x slow (median 0.6 ms, 2x einsum's), but its
    # best sample shows it can be faster. It is confirmed with einsum, and wins on paired samples.
    timer = FakeTimer({"loop": lambda count: 0.8e-4 if count > 25 or count % 4 == 0 else 6e-4, "einsum": 3e-4},
                      default=1e-2)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("weighted_combine", *wc_args())
    assert timer.calls["loop"] > 25 and timer.calls["einsum"] > 25
    assert d.impl == "loop", d.table()


def test_the_garbage_collector_is_paused_while_timing_and_restored_after():
    states: list[bool] = []

    class Watching(FakeTimer):
        def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
            states.append(gc.isenabled())
            return super().__call__(name, fn, number)

    assert gc.isenabled()
    result = tune(["a", "b"], make_run=lambda name: lambda: (torch.ones(1),), timer=Watching({"b": 1e-5}),
                  check=lambda ref, got: None)
    assert result.winner == "b"
    assert states[2:] and not any(states[2:])  # the rounds (after each candidate's first sample)
    assert gc.isenabled()


def test_rounds_change_order_so_one_candidates_after_effects_do_not_always_hit_the_same_next():
    # bmm is 10% faster than einsum, but whatever runs right after loop is 50% slow. In a fixed
    # order bmm would always follow loop and lose to einsum.
    previous: list[str] = [""]

    class AfterEffects(FakeTimer):
        def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
            t = super().__call__(name, fn, number) * (1.5 if previous[0] == "loop" else 1.0)
            previous[0] = name
            return t

    timer = AfterEffects({"bmm": 1.0e-4, "einsum": 1.1e-4, "grouped_mm": 1e-3, "loop": 1.2e-4,
                          "masked_dense": 1e-2})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm", d.table()


# ---- batch prewarm: a second opinion on close calls ----------------------------------------------------

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


def gl_request(batch: int = 8, **kwargs: Any) -> tuple[Signature, Signature]:
    with grouped_ops.record() as rec, use_impl("loop"):
        grouped_ops.grouped_linear(*gl_args(batch, **kwargs))
    return rec.requests()[0]


def test_a_close_call_is_tuned_again_and_the_majority_kept(tunings):
    # The first tuning (a busy spell) sees einsum 5% ahead; the next two see bmm 10% ahead.
    first, later = {"bmm": 1.0e-4, "einsum": 0.95e-4}, {"bmm": 1.0e-4, "einsum": 1.1e-4}
    with dispatch.use_timer(tunings.timer([first, later, later])):
        (d,) = prewarm_signatures([gl_request()])
    assert (d.impl, d.source, d.opinions) == ("bmm", "tuned", ("einsum", "bmm", "bmm"))
    # the later tunings time only the close contenders; the vote's times are medians over tunings
    assert tunings.only == [None, {"bmm", "einsum"}, {"bmm", "einsum"}]
    assert d.timings["einsum"] == pytest.approx(1.1e-4) and d.timings["loop"] == pytest.approx(1e-3)
    # remembered and persisted as the vote, with every tuning's pick
    sig = d.signature
    assert dispatch.known_decision(GL, sig).impl == "bmm"
    (entry,) = disk_entries()
    assert (entry["impl"], entry["opinions"]) == ("bmm", ["einsum", "bmm", "bmm"])
    dispatch.clear_memory()
    assert dispatch.known_decision(GL, sig).opinions == ("einsum", "bmm", "bmm")
    assert "picks of 3 tunings: einsum, bmm, bmm" in dispatch.known_decision(GL, sig).table()


def test_two_tunings_that_agree_need_no_third(tunings):
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        (d,) = prewarm_signatures([gl_request()])
    assert (d.impl, d.opinions, len(tunings.only)) == ("bmm", ("bmm", "bmm"), 2)


def test_a_clear_winner_is_tuned_once(tunings):
    band = 1 + tuner_module.SECOND_OPINION_BAND
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.0e-4 * band * 1.01}])):
        (d,) = prewarm_signatures([gl_request()])
    assert (d.impl, d.opinions, len(tunings.only)) == ("bmm", (), 1)


def test_second_opinions_can_be_switched_off(tunings):
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 0.95e-4}, {"bmm": 1.0e-4}])):
        (d,) = prewarm_signatures([gl_request()], second_opinion=False)
    assert (d.impl, d.opinions, len(tunings.only)) == ("einsum", (), 1)


def test_second_opinions_come_after_every_first_tuning(tunings):
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        prewarm_signatures([gl_request(8), gl_request(64), gl_request(512)])
    assert tunings.batches == [8, 64, 512, 8, 64, 512]  # a whole pass apart, not back to back


def test_a_signature_already_known_is_not_tuned_again(tunings):
    request = gl_request()
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        prewarm_signatures([request])
        assert len(tunings.only) == 2
        (d,) = prewarm_signatures([request])
    assert (d.source, d.opinions, len(tunings.only)) == ("cache", ("bmm", "bmm"), 2)


def test_without_a_majority_the_best_median_relative_time_wins():
    a = tuner_module.TuneResult({"x": 1.00, "y": 1.02, "z": 1.20}, {}, "x")
    b = tuner_module.TuneResult({"x": 1.30, "y": 1.00, "z": 1.10}, {}, "y")
    c = tuner_module.TuneResult({"x": 1.10, "y": 1.05, "z": 1.00}, {}, "z")
    # relative to each tuning's fastest: x 1.00/1.30/1.10, y 1.02/1.00/1.05, z 1.20/1.10/1.00
    assert tuner_module.vote(["x", "y", "z"], [a, b, c])[0] == "y"
    assert tuner_module.vote(["x", "y", "z"], [a, b, dataclasses.replace(c, winner="y")])[0] == "y"
    assert tuner_module.vote(["x", "y", "z"], [a, a, c])[0] == "x"
    # exact ties in relative time go to the preference order
    d = tuner_module.TuneResult({"x": 1.0, "y": 1.0}, {}, "y")
    assert tuner_module.vote(["x", "y"], [dataclasses.replace(d, winner="x"), d])[0] == "x"
    assert tuner_module.vote(["y", "x"], [dataclasses.replace(d, winner="x"), d])[0] == "y"


def test_a_candidate_that_fails_in_a_later_tuning_cannot_win(tunings):
    # einsum wins two tunings of three, but raises in the second
    table = {"bmm": 1.0e-4, "einsum": 0.95e-4}
    timer = tunings.timer([table])
    timer.fail["einsum"] = lambda count: RuntimeError("boom") if len(tunings.only) == 2 else None
    with dispatch.use_timer(timer):
        (d,) = prewarm_signatures([gl_request()])
    assert d.opinions == ("einsum", "bmm", "einsum")
    assert d.impl == "bmm" and "raised RuntimeError: boom" in d.skipped["einsum"]
    assert dispatch.known_decision(GL, d.signature).impl == "bmm"


def test_a_call_between_the_first_tuning_and_the_vote_does_not_keep_the_first_pick(tunings, ran):
    first, later = {"bmm": 1.0e-4, "einsum": 0.95e-4}, {"bmm": 1.0e-4, "einsum": 1.1e-4}
    x, w, b = gl_args()

    called: list[str] = []

    def call_the_op(done: int, total: int, sig: Signature, what: str) -> None:
        if what == "decided":
            grouped_ops.grouped_linear(x, w, b)  # the hot path now holds the first pick
            called.append(ran[-1])

    with dispatch.use_timer(tunings.timer([first, later, later])):
        (d,) = prewarm_signatures([gl_request()], progress=call_the_op)
    assert called == ["grouped_linear.einsum"] and d.impl == "bmm"
    ran.clear()
    grouped_ops.grouped_linear(x, w, b)
    assert ran == ["grouped_linear.bmm"]


def test_a_recording_tunes_each_bucket_at_its_first_calls_batch(tunings, tmp_path):
    with grouped_ops.record() as rec, use_impl("loop"):
        for batch in (300, 400, 8):  # 300 and 400 share the bucket 512
            grouped_ops.grouped_linear(*gl_args(batch))
    assert [(s.dim("batch"), at.dim("batch")) for s, at in rec.requests()] == [(512, 300), (8, 8)]
    path = tmp_path / "signatures.jsonl"
    rec.save(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["dims"]["batch"], line["tune_at_batch"]) for line in lines] == [(512, 300), (8, 8)]
    from grouped_ops.cli import signatures_from_file
    assert signatures_from_file(path) == rec.requests()

    with dispatch.use_timer(tunings.timer([{"bmm": 1e-4}])):
        decisions = rec.prewarm()
    assert tunings.batches == [300, 8]  # not 512, the bucket's edge
    assert [d.signature.dim("batch") for d in decisions] == [512, 8]


@pytest.mark.parametrize("bad", [0, 200, 513, "300", True])
def test_a_recorded_file_with_a_batch_outside_its_bucket_is_refused(tmp_path, bad):
    from grouped_ops.cli import signatures_from_file
    sig, _ = gl_request(300)
    path = tmp_path / "signatures.jsonl"
    path.write_text("# a comment\n" + json.dumps({**sig.to_spec(), "tune_at_batch": bad}) + "\n")
    with pytest.raises(GroupedOpsError, match=r"signatures.jsonl:2: tune_at_batch=.* batch=512"):
        signatures_from_file(path)
    path.write_text(json.dumps(sig.to_spec()) + "\n")  # files saved before tune_at_batch: the bucket's size
    assert signatures_from_file(path) == [(sig, None)]


def test_cli_prewarm_tunes_at_the_given_batch_and_tunes_close_calls_again(tunings, capsys):
    from grouped_ops.cli import main
    argv = ["prewarm", "grouped_linear", "--batch", "300", "8", "--groups", "4", "--in", "8", "--out", "8",
            "--no-progress"]
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        assert main(argv) == 0
    assert tunings.batches == [300, 8, 300, 8]
    out = capsys.readouterr().out
    assert "(picks of 2 tunings: bmm, bmm)" in out
    assert "prewarmed 2 signature(s): 2 tuned (2 close call(s) tuned again)" in out
    dispatch.clear_memory()
    store.DiskStore().clear()
    tunings.batches.clear()
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        assert main([*argv, "--single-opinion"]) == 0
    assert tunings.batches == [300, 8]
