"""Forcing and excluding implementations: ``use_impl``, ``exclude_impls``, GROUPED_OPS_IMPL and
GROUPED_OPS_EXCLUDE."""

from __future__ import annotations

import pytest
from helpers import FakeTimer, disk_entries, gl_args, wc_args

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch, use_impl

# ---- forcing -----------------------------------------------------------------------------------------

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
