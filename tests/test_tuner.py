"""The tuning protocol and its harness, each rule checked with a fake timer: deterministic, no GPU,
no real clock. The statistic, the cuts, the time budget, close-call confirmation rounds, second
opinions and their vote, failures (OOM, wrong numbers or gradients) and the memory budget.

A fake timer is ``timer(name, fn, number) -> seconds per call``; installing one with
``dispatch.use_timer`` makes the tuner believe whatever the test says about each implementation.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    FakeTimer,
    disk_entries,
    gl_args,
    gl_request,
    lookup_source,
    replace_impl,
    wc_args,
)

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.ops import SPECS
from grouped_ops.recording import prewarm_signatures
from grouped_ops.signature import Signature
from grouped_ops.tuning import store
from grouped_ops.tuning import tuner as tuner_module
from grouped_ops.tuning.tuner import tune

GL = SPECS["grouped_linear"]
REPO = Path(__file__).resolve().parents[1]


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
    # the tuning's private operands, reference and result: 3.1 KiB; bmm's call 2 KiB more; masked_dense's
    # block-diagonal weight (n*n*out*in*4 bytes = 4 KiB) and the zeros it is built from, 5 KiB more
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "6000")
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
        # the leader's time quoted is the one its row of the table shows
        assert d.timings["bmm"] == pytest.approx(2e-3)
        assert d.skipped["masked_dense"] == "predicted ~0.032s a call (16x the arithmetic of bmm, 2 ms a call): it cannot win"


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


# ---- the documentation's examples --------------------------------------------------------------------

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


# ---- close calls: paired confirmation rounds ---------------------------------------------------------

def test_a_close_call_gets_paired_confirmation_samples():
    # einsum looks 10% behind in the rounds but is 3% faster in the paired confirmation samples
    def einsum_time(count: int) -> float:
        return 1.1e-3 if count <= 25 else 0.97e-3
    timer = FakeTimer({"bmm": 1e-3, "einsum": einsum_time}, default=1e-2)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    # ~1 ms samples (one call each): rounds until einsum's 0.97 ms samples cover CONFIRM_MIN_S (a 3%
    # gap is no clear loser: bmm is not let go)
    rounds = math.ceil(tuner_module.CONFIRM_MIN_S / 0.97e-3)
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
    # all three confirmed; once the paired samples show bmm and einsum surely over TIE_MAX slower
    # (20% and 25%, no spread), they are let go and the call is decided
    assert timer.calls["bmm"] == timer.calls["einsum"] == timer.calls["grouped_mm"] == 25 + tuner_module.CONFIRM_MIN_ROUNDS
    assert d.impl == "grouped_mm"
    assert d.timings["bmm"] / d.timings["grouped_mm"] == pytest.approx(1 / 0.8)


def test_a_clear_loser_is_let_go_while_the_close_call_goes_on():
    # einsum is 3% faster than bmm with +-20% noise (unresolved for long), grouped_mm 30% slower
    # than both: after CONFIRM_MIN_ROUNDS rounds only einsum and bmm are timed on
    timer = FakeTimer({"bmm": 1e-3, "einsum": lambda count: 0.97e-3 * (1 + 0.2 * ((count % 5) - 2) / 2),
                       "grouped_mm": lambda count: 1.12e-3 if count <= 25 else 1.3e-3}, default=1e-1)
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert timer.calls["grouped_mm"] == 25 + tuner_module.CONFIRM_MIN_ROUNDS < timer.calls["einsum"]
    assert d.impl == "einsum", d.table()
    assert d.timings["grouped_mm"] > 1.25e-3


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
