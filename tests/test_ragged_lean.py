"""The ragged op's short road: the lean key of ``functional.ragged_grouped_linear`` and the
functions ``grouped_mm``, ``loop`` and ``gather_bmm`` prepare for one call description (``Implementation.prepare``).
They must compute what the implementations compute, check the offsets' values on every call, and be
guarded by everything the memo's key covers."""

from __future__ import annotations

import pytest
import torch
from helpers import FakeTimer

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch
from grouped_ops.dispatch import _LEAN
from grouped_ops.ops import _ragged_gather as gather
from grouped_ops.ops import _ragged_grouped_mm as gmm
from grouped_ops.ops import _ragged_impls as impls
from grouped_ops.ops import grouped_linear_ragged as ragged

SPEC = ragged.SPEC
PREPARED = [name for name in SPEC.registry if SPEC.registry[name].prepare is not None]


def _args(sizes, rows=None, *, bias=True, grad=False, offsets_dtype=torch.int32, x_strided=False,
          w_layout="contiguous", inn=16, out=8):
    g = torch.Generator().manual_seed(len(sizes) * 31 + sum(sizes))
    total = sum(sizes) if rows is None else rows
    x = torch.randn(inn, total, generator=g).t() if x_strided else torch.randn(total, inn, generator=g)
    if w_layout == "transposed":
        w = torch.randn(len(sizes), inn, out, generator=g).transpose(1, 2)
    elif w_layout == "one_wide":  # out == 1: rows one element wide, a misfit grouped_mm's check refuses
        w = torch.randn(len(sizes), 1, inn, generator=g)
    else:
        w = torch.randn(len(sizes), out, inn, generator=g)
    b = torch.randn(len(sizes), w.shape[1], generator=g) if bias else None
    for t in (x, w, b):
        if t is not None and grad:
            t.requires_grad_(True)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(offsets_dtype)
    return x, w, b, offsets


def _grads(y, tensors):
    targets = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(y.sum(), targets) if targets else ()


CASES = [
    dict(sizes=(3, 0, 4, 1)),
    dict(sizes=(3, 0, 4, 1), rows=11),  # rows past the last offset
    dict(sizes=(2, 2, 2), bias=False, offsets_dtype=torch.int64),
    dict(sizes=(0, 8, 0), x_strided=True),  # a column-major input torch takes as it is
    dict(sizes=(0, 5, 0), x_strided=True),  # one it does not (prepared: loop only)
    dict(sizes=(4, 1, 3), w_layout="transposed"),
    dict(sizes=(4, 1, 3), w_layout="one_wide", rows=9),
    dict(sizes=(6,)),
]


@pytest.mark.parametrize("impl", PREPARED)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "training"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_a_prepared_function_computes_what_its_implementation_computes(impl, grad, case):
    implementation = SPEC.registry[impl]
    x, w, b, offsets = _args(**case, grad=grad)
    if not implementation.supports(SPEC.signature(SPEC.meta(x, w, b, offsets), False)):
        pytest.skip(f"{impl} does not run this signature")
    m = SPEC.meta(x, w, b, offsets)
    run = implementation.prepared(m)
    if run is implementation:  # grouped_mm: only where its product is the result (rows of 16 bytes)
        assert impl == "grouped_mm" and (case.get("w_layout") == "one_wide" or sum(case["sizes"]) == 5)
        return
    for fn in (run, run.bare):
        want, got = implementation(x, w, b, offsets), fn(x, w, b, offsets)
        assert torch.equal(got, want) and got.is_contiguous() and got._base is None
        for g_got, g_want in zip(_grads(got, (x, w, b)), _grads(want, (x, w, b)), strict=True):
            torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
        if rows := case.get("rows"):
            assert not got[offsets[-1]:rows].any()


@pytest.mark.parametrize("impl", PREPARED)
def test_a_prepared_function_still_refuses_bad_offsets_of_the_same_shape(impl):
    x, w, b, offsets = _args((3, 0, 4))
    run = SPEC.registry[impl].prepared(SPEC.meta(x, w, b, offsets))
    for bad in (torch.tensor([3, 2, 7], dtype=torch.int32), torch.tensor([3, 3, 9], dtype=torch.int32)):
        with pytest.raises(GroupedOpsError, match="grouped_linear_ragged: .*offsets"):
            run.bare(x, w, b, bad)


def test_prepared_only_where_its_shortcuts_hold():
    x, w, b, offsets = _args((3, 0, 4))
    assert gmm.prepare_grouped_mm(SPEC.meta(x, w, b, offsets), None) is not None
    for no_rows in (_args((0, 0)), _args((), rows=3)):  # T = 0; E = 0
        assert gmm.prepare_grouped_mm(SPEC.meta(*no_rows), None) is None
    assert impls.prepare_loop(SPEC.meta(*_args((), rows=3)), None) is None
    meta_args = [t.to("meta") if t is not None else None for t in (x, w, b)]
    assert impls.prepare_loop(SPEC.meta(*meta_args, offsets), None) is None
    assert gather.prepare_gather_bmm(SPEC.meta(x, w, b, offsets), None) is not None
    for no_rows in (_args((0, 0)), _args((), rows=3)):
        assert gather.prepare_gather_bmm(SPEC.meta(*no_rows), None) is None
    assert gather.prepare_gather_bmm(SPEC.meta(*meta_args, offsets), None) is None


def test_the_lean_key_holds_everything_the_memo_key_holds():
    x, w, b, offsets = _args((3, 1, 4), grad=True)
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        for _ in range(2):
            grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    memo_key = next(k for k in dispatch._MEMO if k[0] == SPEC.name)
    lean_key = next(k for k in _LEAN if k[-2] == SPEC.name)
    xm, wm, bm, om, capturing, split, grad = memo_key[1]
    assert lean_key[:8] == (*xm, *wm) and lean_key[8] == bm and lean_key[9] == grad[:3] and grad[3] is False
    assert lean_key[10] == memo_key[2] and lean_key[11:14] == memo_key[3] and lean_key[14:-2] == memo_key[4]
    assert lean_key[-1] == (om, capturing, split)


def test_the_split_class_and_overrides_take_effect_on_the_next_call(ran):
    x, w, b, balanced = _args((4, 4, 4, 4))
    _, _, _, one = _args((0, 16, 0, 0))
    timer = FakeTimer({"grouped_mm": lambda count: 1e-6, "loop": lambda count: 2e-6})
    with dispatch.use_timer(timer):
        for offsets in (balanced, one):
            for _ in range(2):
                grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    ran.clear()
    grouped_ops.grouped_linear(x, w, b, offsets=one)
    with grouped_ops.use_impl(grouped_linear_ragged="padded_bmm"):
        grouped_ops.grouped_linear(x, w, b, offsets=balanced)
    grouped_ops.grouped_linear(x, w, b, offsets=balanced)
    assert ran[-2] == "grouped_linear_ragged.padded_bmm"
    assert len({k for k in _LEAN if k[-2] == SPEC.name}) >= 3  # one per split class and override


def test_the_lean_road_gives_the_long_roads_result_and_gradients():
    x, w, b, offsets = _args((3, 0, 4, 2), rows=12, grad=True)
    want = ragged.reference(*(t.detach().double() if t.is_floating_point() else t for t in (x, w, b, offsets)))
    for _ in range(3):  # tunes, then the memo, then the lean road
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        gx, gw, gb = torch.autograd.grad((y * y).sum(), (x, w, b))
        assert not gw[1].any() and not gb[1].any() and not gx[9:].any()
