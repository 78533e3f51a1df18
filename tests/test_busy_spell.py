"""A busy spell (every call ~55x slow for a moment: another process, a preempted OpenMP thread)
must not be stored as a decision: a fresh-cache tuning leaves on disk the true best or nothing, and
a decision that is not stored is tuned again at most once, on a later call."""

from __future__ import annotations

import pytest
import torch

import grouped_ops
from grouped_ops import dispatch, grouped_linear
from grouped_ops.tuning import store

BASE = {"bmm": 1.0e-5, "einsum": 1.3e-5, "grouped_mm": 1.2e-5, "loop": 2.0e-5, "masked_dense": 1.6e-5}
SPELL, LENGTH = 55.0, 6  # six consecutive samples, each 55x slow


class SpellTimer:
    """A fake timer: each candidate's base time, times SPELL for calls offset..offset+LENGTH-1."""

    def __init__(self, offset: int | None) -> None:
        self.offset, self.calls = offset, 0

    def __call__(self, name, fn, number):
        slow = self.offset is not None and self.offset <= self.calls < self.offset + LENGTH
        self.calls += 1
        return BASE[name] * (SPELL if slow else 1.0)


def args():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 16, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, generator=g)


def stored():
    return [e["impl"] for e in store.DiskStore().entries()]


def test_without_a_spell_the_true_best_is_stored():
    with dispatch.use_timer(SpellTimer(None)):
        grouped_linear(*args())
    assert stored() == ["bmm"]


def test_a_spell_at_any_offset_leaves_the_true_best_or_nothing(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_REPS", "8")  # fewer samples, fewer offsets: a quicker test
    probe = SpellTimer(None)
    with dispatch.use_timer(probe):
        grouped_linear(*args())
    calls = probe.calls
    assert calls > LENGTH
    for offset in range(calls):  # every offset, from the first timed call on
        dispatch.clear_memory()
        store.DiskStore().clear()
        timer = SpellTimer(offset)
        with dispatch.use_timer(timer):
            grouped_linear(*args())
            assert stored() in ([], ["bmm"]), f"spell at call {offset} stored {stored()}"
            d = grouped_ops.lookup("grouped_linear", *args())
            if not stored():  # not stored: tuned again on the next call, once
                assert d.provisional
                before = timer.calls
                grouped_linear(*args())
                assert timer.calls > before
                after = timer.calls
                grouped_linear(*args())
                grouped_linear(*args())
                assert timer.calls == after, "tuned more than once more"
                # the spell may reach into that tuning too: then it is used, and still not stored
                assert stored() in ([], ["bmm"]) and not grouped_ops.lookup("grouped_linear", *args()).provisional


@pytest.mark.parametrize("offset", [0, 3])
def test_a_spell_in_the_second_tuning_too_uses_it_but_stores_nothing(offset):
    class TwoSpells(SpellTimer):
        def __call__(self, name, fn, number):  # a spell at the same offset of every tuning
            slow = self.calls % 1000 in range(offset, offset + LENGTH)
            self.calls += 1
            return BASE[name] * (SPELL if slow else 1.0)

    timer = TwoSpells(None)
    with dispatch.use_timer(timer):
        grouped_linear(*args())
        timer.calls = 1000
        grouped_linear(*args())  # the second (last) tuning, disturbed again
        timer.calls = 2000
        grouped_linear(*args())
    assert timer.calls == 2000 and stored() == []
    assert not grouped_ops.lookup("grouped_linear", *args()).provisional
