"""The simpler protocol (grouped_ops/tuning/simple.py): minimum of samples, fixed tie band, pooled passes."""

from __future__ import annotations

import pytest
from helpers import FakeTimer, gl_args, gl_request

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.recording import prewarm_signatures
from grouped_ops.tuning import simple
from grouped_ops.tuning.tuner import TuneResult


@pytest.fixture(autouse=True)
def simple_protocol(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNER", "simple")


def test_the_fastest_sample_decides_not_the_median():
    # bmm: slowed 3x in most samples (a busy neighbour), 1.0e-5 when undisturbed; einsum a steady 1.2e-5
    def bmm_time(count: int) -> float:
        return 1e-5 if count % 4 == 0 else 3e-5

    with dispatch.use_timer(FakeTimer({"bmm": bmm_time, "einsum": 1.2e-5}, default=1e-3)):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm" and d.timings["bmm"] == pytest.approx(1e-5)


@pytest.mark.parametrize(("faster_by", "winner"), [(0.01, "bmm"), (0.019, "bmm"), (0.03, "einsum"), (0.2, "einsum")])
def test_a_fixed_tie_band_goes_to_the_registry_order(faster_by, winner):
    times = {"bmm": 1e-5, "einsum": 1e-5 * (1 - faster_by)}
    with dispatch.use_timer(FakeTimer(times, default=1e-3)):
        assert grouped_ops.prewarm("grouped_linear", *gl_args()).impl == winner


def test_a_clear_loser_is_cut_after_three_samples(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_BUDGET_S", "30")  # only the cuts, not the clock, stop timing
    timer = FakeTimer({"bmm": 1e-5, "einsum": 1.2e-5, "grouped_mm": 4e-5, "loop": 1e-3, "masked_dense": 1e-4})
    with dispatch.use_timer(timer):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.impl == "bmm" and timer.calls["bmm"] == timer.calls["einsum"] == 25
    assert timer.calls["loop"] == timer.calls["grouped_mm"] == 3  # cut once three samples agree
    assert set(d.timings) == set(grouped_ops.implementations("grouped_linear"))  # their timings stand


def test_pooling_takes_each_candidates_fastest_time_over_the_tunings():
    first = TuneResult({"bmm": 1.0e-5, "einsum": 0.9e-5}, {}, "einsum")  # einsum's pick, in a spell on bmm
    second = TuneResult({"bmm": 0.8e-5, "einsum": 0.95e-5}, {}, "bmm")
    winner, timings = simple.pool(["bmm", "einsum"], [first, second])
    assert winner == "bmm" and timings == {"bmm": 0.8e-5, "einsum": 0.9e-5}


def test_prewarm_pools_a_close_call_with_one_more_pass(tunings):
    first, later = {"bmm": 1.0e-4, "einsum": 0.95e-4}, {"bmm": 0.9e-4, "einsum": 1.1e-4}
    with dispatch.use_timer(tunings.timer([first, later])):
        (d,) = prewarm_signatures([gl_request()])
    assert len(tunings.only) == 2 and d.opinions == ("einsum", "bmm")  # one pooled pass, no third
    assert d.impl == "bmm" and d.timings["bmm"] == pytest.approx(0.9e-4)
