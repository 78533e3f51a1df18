"""grouped_linear_ragged's implementations against the float64 per-group reference, forward and
backward, on drawn compositions (empty groups, one group holding every row, rows past the last
offset, T = 0, E = 0 and 1, int32 and int64 offsets, awkward layouts); gradcheck; the custom op's
own backward (what torch.compile runs); the CUDA-graph rule; and, with a GPU, no host syncs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch
from grouped_ops.dispatch import resolve
from grouped_ops.ops import SPECS
from grouped_ops.ops import grouped_linear_ragged as ragged
from grouped_ops.testing import (
    assert_implementations_agree,
    compositions,
    grouped_linear_ragged_inputs,
)

OP = ragged.OP
SPEC = SPECS[OP]
IMPLS = list(SPEC.registry)


# ---- the strategies ----------------------------------------------------------------------------------

@given(compositions())
def test_compositions_are_valid_offsets(drawn):
    rows, offsets = drawn
    assert offsets.dim() == 1 and offsets.dtype in (torch.int32, torch.int64)
    values = offsets.tolist()
    assert values == sorted(values) and all(v >= 0 for v in values) and (not values or values[-1] <= rows)


@pytest.mark.parametrize(("what", "condition"), [
    ("no rows", lambda d: d[0] == 0),
    ("no groups", lambda d: d[1].numel() == 0),
    ("one group", lambda d: d[1].numel() == 1 and d[0] > 0),
    ("every row in one of several groups", lambda d: d[1].numel() > 2 and d[0] > 0 and int(d[1][0]) == 0
     and (torch.diff(d[1], prepend=d[1].new_zeros(1)) == d[0]).sum() == 1),
    ("rows past the last offset", lambda d: d[1].numel() > 0 and int(d[1][-1]) < d[0]),
    ("int32", lambda d: d[1].dtype == torch.int32 and d[1].numel() > 0),
    ("int64", lambda d: d[1].dtype == torch.int64 and d[1].numel() > 0),
])
def test_compositions_reach_every_edge_case(what, condition):
    find(compositions(), condition, settings=settings(max_examples=2000, database=None))


# ---- every implementation against the reference ------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(grouped_linear_ragged_inputs(dtypes=(torch.float32, torch.float64, torch.bfloat16), requires_grad=True))
def test_every_implementation_agrees_with_the_float64_reference(drawn):
    checked = assert_implementations_agree(OP, *drawn, impls=("auto", *IMPLS))
    assert {"auto", "loop", "padded_bmm", "gather_bmm"} <= set(checked)


@settings(max_examples=25, deadline=None)
@given(grouped_linear_ragged_inputs(dtypes=(torch.float32,), requires_grad=None, layouts=("contiguous",),
                                    max_features=16, feature_multiple=8))
def test_grouped_mm_runs_on_aligned_features(drawn):
    # in and out multiples of 4 float32s: grouped_mm supports the signature, so it is checked too
    assert "grouped_mm" in assert_implementations_agree(OP, *drawn)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "grouped_mm"])  # torch's grouped_mm has no float64
@pytest.mark.parametrize("sizes", [(2, 0, 3), (0, 0, 0), (4,)])
def test_gradcheck(impl, sizes):
    g = torch.Generator().manual_seed(1)
    rows = sum(sizes) + 1  # one row past the last offset
    x = torch.randn(rows, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(len(sizes), 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(len(sizes), 2, dtype=torch.float64, generator=g, requires_grad=True)
    offsets = torch.tensor(sizes).cumsum(0)

    def f(x, w, b):
        return grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_the_custom_op_backward_is_the_definition():
    # what torch.compile and export run: the op itself for the input's gradient, the opaque weight
    # gradient op for the rest; empty groups and rows past the last offset included
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, generator=g).transpose(1, 2).contiguous().transpose(1, 2)
    w = w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    b = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)
    op = getattr(torch.ops.grouped_ops, f"{OP}_auto")
    y = op(x, w, b, offsets, 0b0111, "")
    ref = ragged.reference(x, w, b, offsets)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(9, 5, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, (x, w, b), gy)
    want = torch.autograd.grad(ref, (x, w, b), gy)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
    assert torch.equal(got[1][1], torch.zeros(5, 4, dtype=torch.float64)) and torch.equal(got[0][7:], torch.zeros(2, 4))


# ---- CUDA-graph capture: only the implementations that need no host sync -------------------------------

def test_while_capturing_auto_considers_only_sync_free_implementations(monkeypatch):
    x, w, b = torch.randn(16, 8), torch.randn(4, 8, 8), torch.randn(4, 8)
    offsets = torch.tensor([4, 8, 12, 16])
    sig = SPEC.signature(SPEC.meta(x, w, b, offsets), True)
    syncing = {n for n, i in SPEC.registry.items() if i.syncs(sig)}
    assert syncing == {"loop", "padded_bmm"}
    timings = dict.fromkeys(IMPLS, 1e-3) | {"loop": 1e-6}  # the loop is fastest outside capture
    with dispatch.use_timer(lambda name, fn, number: timings[name]):
        assert dispatch.decide_signature(SPEC, sig).impl == "loop"
        monkeypatch.setattr(resolve, "_capturing", lambda s: True)
        decision, _ = resolve.decide(SPEC, sig)
        assert decision.impl not in syncing
        with pytest.raises(GroupedOpsError, match=r"impl 'loop' .* reads values on the host \(a sync\)"), \
                grouped_ops.use_impl(**{OP: "loop"}):
            resolve.decide(SPEC, sig)


# ---- on a GPU: device offsets are not read (no sync) unless asked -------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["gather_bmm", "dense_select", "grouped_mm"])
def test_sync_free_implementations_do_not_sync_and_debug_mode_checks(impl, monkeypatch):
    dt = torch.bfloat16
    x = torch.randn(64, 64, device="cuda", dtype=dt)
    w = torch.randn(4, 64, 64, device="cuda", dtype=dt)
    offsets = torch.tensor([10, 10, 40, 60], device="cuda", dtype=torch.int32)
    sig = SPEC.signature(SPEC.meta(x, w, None, offsets), False)
    if not SPEC.registry[impl].supports(sig):
        pytest.skip(f"{impl}: {SPEC.registry[impl].not_supported_reasons(sig)}")
    grouped_ops.grouped_linear(x, w, offsets=offsets, impl=impl)  # decided and memoised outside the mode
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = grouped_ops.grouped_linear(x, w, offsets=offsets, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(y.float(), ragged.reference(x.float(), w.float(), None, offsets), rtol=3e-2, atol=3e-2)
    assert torch.equal(y[60:], torch.zeros_like(y[60:]))
    bad = torch.tensor([10, 5, 40, 60], device="cuda", dtype=torch.int32)
    grouped_ops.grouped_linear(x, w, offsets=bad, impl=impl)  # not read: not refused
    monkeypatch.setenv("GROUPED_OPS_DEBUG", "1")
    with pytest.raises(GroupedOpsError, match="non-decreasing"):
        grouped_ops.grouped_linear(x, w, offsets=bad, impl=impl)


def test_int_strategy_arguments_are_checked():
    from hypothesis.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="kinds"):
        compositions(kinds=("nope",)).example()
    with pytest.raises(InvalidArgument, match="dtypes"):
        compositions(dtypes=(torch.float32,)).example()
    assert compositions(rows=5, groups=st.just(2)).example()[1].shape == (2,)
