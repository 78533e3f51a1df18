"""The mixture-of-experts pieces around the ragged op: weighted_combine's out_dtype, the
unpermute_combine op (every implementation against a float64 reference, forward and backward) and
moe_routing (against a counting reference)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grouped_ops
from grouped_ops import GroupedOpsError, moe_routing, unpermute_combine, weighted_combine
from grouped_ops.ops import SPECS
from grouped_ops.registry import tolerance

UC = SPECS["unpermute_combine"]


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)

IMPLS = list(UC.registry)


# ---- weighted_combine(out_dtype=) ----------------------------------------------------------------

@pytest.mark.parametrize("impl", list(SPECS["weighted_combine"].registry))
def test_out_dtype_returns_the_rows_dtype_close_to_float64(impl):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(32, 4, 64, generator=g).bfloat16().requires_grad_()
    w = torch.softmax(torch.randn(32, 4, generator=g), -1).requires_grad_()  # float32 routing weights
    out = weighted_combine(rows, w, out_dtype=torch.bfloat16, impl=impl)
    assert out.dtype == torch.bfloat16
    ref = (rows.double() * w.double()[..., None]).sum(1)
    # the weights rounded once to bfloat16, the sum rounded once (loop: once per branch)
    torch.testing.assert_close(out.double(), ref, rtol=3 * 2 ** -8, atol=3 * 2 ** -8)
    out.double().square().sum().backward()
    assert rows.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    gw = ((rows.double() * 2 * ref.unsqueeze(1)).sum(-1))
    torch.testing.assert_close(w.grad.double(), gw, rtol=0.03, atol=0.03 * gw.abs().max().item())


def test_out_dtype_default_still_promotes_and_a_bad_one_is_refused():
    rows, w = torch.randn(4, 2, 3).bfloat16(), torch.rand(4, 2)
    assert weighted_combine(rows, w).dtype == torch.float32
    assert weighted_combine(rows, w, out_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(GroupedOpsError, match="weighted_combine: out_dtype"):
        weighted_combine(rows, w, out_dtype=torch.int32)


# ---- unpermute_combine ---------------------------------------------------------------------------

def _case(t: int, k: int, d: int, dtype: torch.dtype, seed: int, extra: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(t * k + extra, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    inverse = torch.randperm(t * k + extra, generator=g)[:t * k].view(t, k)
    w = torch.softmax(torch.randn(t, k, generator=g, dtype=torch.float64), -1).to(dtype).requires_grad_()
    return rows, inverse, w


def _reference(rows, inverse, w):
    r, ww = rows.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    return (r[inverse] * ww[..., None]).sum(1), r, ww


@settings(max_examples=25, deadline=None)
@given(t=st.integers(0, 9), k=st.integers(1, 4), d=st.integers(1, 17), extra=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2 ** 16),
       impl=st.sampled_from(["auto", *IMPLS]))
def test_every_implementation_matches_float64_forward_and_backward(t, k, d, extra, dtype, seed, impl):
    rows, inverse, w = _case(t, k, d, dtype, seed, extra)
    out = unpermute_combine(rows, inverse, w, impl=impl)
    ref, r, ww = _reference(rows, inverse, w)
    tol = tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=tol.rtol * 4, atol=tol.atol * 4 + tol.rtol * k)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.to(dtype))
    ref.backward(grad)
    scale = max([1.0, *grad.abs().reshape(-1).tolist()])
    torch.testing.assert_close(rows.grad.double(), r.grad, rtol=tol.rtol * 4, atol=tol.atol * 4 + tol.rtol * scale)
    torch.testing.assert_close(w.grad.double(), ww.grad, rtol=tol.rtol * 4, atol=(tol.atol + tol.rtol) * scale * d)
    if extra:  # rows no token points at get exactly zero gradient
        unused = torch.ones(rows.shape[0], dtype=torch.bool)
        unused[inverse.reshape(-1)] = False
        assert rows.grad[unused].abs().sum() == 0


def test_the_custom_op_backward_matches_float64():
    # the custom op's own backward (torch.compile's path when nothing is decided) is the spec's
    rows, inverse, w = _case(5, 3, 7, torch.float64, 1, extra=2)
    out = torch.ops.grouped_ops.unpermute_combine_auto(rows, inverse, w, 0b101, "gather_sum")
    ref, r, ww = _reference(rows, inverse, w)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rows.grad, r.grad)
    torch.testing.assert_close(w.grad, ww.grad)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.grouped_ops.unpermute_combine_auto(a, inverse, b, 0b101, ""),
                                    (rows.detach().requires_grad_(), w.detach().requires_grad_()))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    rows, inverse, w = _case(4, 2, 3, torch.float64, 3, extra=1)
    assert torch.autograd.gradcheck(lambda a, b: unpermute_combine(a, inverse, b, impl=impl), (rows, w))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_run_to_run_and_under_deterministic_algorithms(impl):
    rows, inverse, w = _case(64, 8, 32, torch.float32, 4)
    results = []
    with _deterministic():
        for _ in range(2):
            rows.grad = w.grad = None
            out = unpermute_combine(rows, inverse, w, impl=impl)
            out.square().sum().backward()
            results.append((out.detach().clone(), rows.grad.clone(), w.grad.clone()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_out_dtype_keeps_bfloat16_rows_with_float32_weights():
    rows, inverse, _ = _case(8, 2, 16, torch.bfloat16, 5)
    w = torch.rand(8, 2)
    assert unpermute_combine(rows, inverse, w).dtype == torch.float32  # promotion by default
    out = unpermute_combine(rows, inverse, w, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref, _, _ = _reference(rows, inverse, w)
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=2 ** -7)


def test_refusals_name_the_op_the_argument_and_the_shapes():
    rows, inverse, w = _case(3, 2, 4, torch.float32, 6)
    with pytest.raises(GroupedOpsError, match=r"unpermute_combine: inverse \(3, 2\) and weights \(3, 3\).*rows.shape"):
        unpermute_combine(rows, inverse, torch.rand(3, 3))
    with pytest.raises(GroupedOpsError, match="unpermute_combine: inverse must be int64 or int32"):
        unpermute_combine(rows, inverse.float(), w)
    with pytest.raises(GroupedOpsError, match=r"unpermute_combine: inverse holds rows 0\.\.6 but rows has 6"):
        unpermute_combine(rows, inverse.clone().fill_(6).index_fill_(0, torch.tensor([0]), 0), w)
    with pytest.raises(GroupedOpsError, match=r"unpermute_combine: inverse holds rows -6\.\.-1"):
        unpermute_combine(rows, -inverse - 1, w)
    with pytest.raises(GroupedOpsError, match="rows must be"):
        unpermute_combine(rows[0], inverse, w)
    # a second bad call with the same shapes is refused too (the value check runs every call)
    unpermute_combine(rows, inverse, w)
    with pytest.raises(GroupedOpsError, match="inverse holds rows"):
        unpermute_combine(rows, inverse + 1, w)


def test_compiles_fullgraph_with_a_dynamic_token_count():
    torch._dynamo.reset()
    fn = torch.compile(lambda r, i, w: unpermute_combine(r, i, w), backend="eager", fullgraph=True, dynamic=True)
    for t in (3, 5):
        rows, inverse, w = _case(t, 2, 4, torch.float32, t)
        ref, _, _ = _reference(rows, inverse, w)
        torch.testing.assert_close(fn(rows, inverse, w).double(), ref, rtol=1e-5, atol=1e-6)


# ---- moe_routing ---------------------------------------------------------------------------------

def _routing_reference(idx: torch.Tensor, e: int):
    t, k = idx.shape
    pairs = sorted(range(t * k), key=lambda p: (int(idx.reshape(-1)[p]), p))  # stable by expert
    ends = torch.cumsum(torch.bincount(idx.reshape(-1).clamp(max=e), minlength=e + 1)[:e], 0)
    inverse = [0] * (t * k)
    for pos, p in enumerate(pairs):
        inverse[p] = pos
    return pairs, ends, inverse


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 12), k=st.integers(1, 4), e=st.integers(1, 6), data=st.data(),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.int16]))
def test_moe_routing_matches_a_counting_reference(t, k, e, data, dtype):
    ids = data.draw(st.lists(st.integers(0, e - 1), min_size=t * k, max_size=t * k))
    idx = torch.tensor(ids, dtype=dtype).view(t, k)
    r = moe_routing(idx, e, torch.rand(t, k))
    pairs, ends, inverse = _routing_reference(idx.long(), e)
    assert r.sort_order.tolist() == pairs
    assert r.token_index.tolist() == [p // k for p in pairs]
    assert r.offsets.dtype == torch.int32 and r.offsets.tolist() == ends.tolist()
    assert r.inverse.shape == (t, k) and r.inverse.reshape(-1).tolist() == inverse
    # round trip: the rows in expert order, un-permuted, are the pairs again
    assert torch.equal(idx.reshape(-1)[r.sort_order][r.inverse.reshape(-1)], idx.reshape(-1))


def test_moe_routing_sentinels_sort_last_past_the_offsets():
    idx = torch.tensor([[2, 0], [5, 1]])  # 5: a sentinel of expert parallelism, E = 3
    r = moe_routing(idx, 3, expert_parallel=True)
    assert r.offsets.tolist() == [1, 2, 3]
    assert r.sort_order.tolist()[-1] == 2


def test_moe_routing_runs_under_deterministic_algorithms():
    idx = torch.randint(0, 8, (64, 2), generator=torch.Generator().manual_seed(0))
    with _deterministic():
        a, b = moe_routing(idx, 8), moe_routing(idx, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_moe_routing_refusals():
    idx = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(GroupedOpsError, match=r"top_k_weights must have top_k_index's shape.*\(2, 2\).*\(2, 3\)"):
        moe_routing(idx, 3, torch.rand(2, 3))
    with pytest.raises(GroupedOpsError, match="top_k_weights must be floating-point"):
        moe_routing(idx, 3, idx)
    with pytest.raises(GroupedOpsError, match="must hold integer expert ids, got float32"):
        moe_routing(idx.float(), 3)
    with pytest.raises(GroupedOpsError, match=r"2-D tensor \[T, k\] \(top_k_index.shape=\(2,\)\)$"):
        moe_routing(idx[0], 3)  # (no weights given: none named)
    with pytest.raises(GroupedOpsError, match="num_experts must be a positive int"):
        moe_routing(idx, 0)
    with pytest.raises(GroupedOpsError, match=r"holds experts 0\.\.2 but num_experts=2"):
        moe_routing(idx, 2)
    with pytest.raises(GroupedOpsError, match="holds experts -1"):
        moe_routing(idx - 1, 3)


def test_the_whole_layer_with_the_ragged_op_inputs():
    # routing + gather + a per-expert linear written by hand + unpermute_combine = the dense layer
    g = torch.Generator().manual_seed(7)
    t, k, e, d = 10, 2, 4, 6
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    weight = torch.randn(e, d, d, generator=g, dtype=torch.float64)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64)
    w, idx = torch.topk(logits.softmax(-1), k)
    r = moe_routing(idx, e, w)
    starts = [0, *r.offsets.tolist()[:-1]]
    rows = torch.cat([x[r.token_index[s:end]] @ weight[i].T
                      for i, (s, end) in enumerate(zip(starts, r.offsets.tolist(), strict=True))])
    out = unpermute_combine(rows, r.inverse, w)
    dense = sum(w[:, j, None] * torch.einsum("tod,td->to", weight[idx[:, j]], x) for j in range(k))
    torch.testing.assert_close(out, dense)
    assert grouped_ops.MoeRouting._fields == ("sort_order", "token_index", "offsets", "inverse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_testing_helper_checks_every_implementation_of_the_op(dtype):
    from grouped_ops.testing import assert_implementations_agree

    rows, inverse, w = _case(8, 3, 5, dtype, 9)
    assert_implementations_agree("unpermute_combine", rows, inverse, w)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_prepared_embedding_bag_computes_what_the_implementation_does(index_dtype, dtype):
    # the dispatcher's memo keeps it for decided calls (Implementation.prepare): torch's kernel
    # called directly with the bags' offsets made once
    spec = SPECS["unpermute_combine"]
    implementation = spec.registry["embedding_bag"]
    g = torch.Generator().manual_seed(3)
    routing = moe_routing(torch.randint(6, (5, 3), generator=g), 6)
    rows = torch.randn(15, 7, generator=g, dtype=dtype, requires_grad=True)
    weights = torch.rand(5, 3, generator=g, dtype=dtype, requires_grad=True)
    inverse = routing.inverse.to(index_dtype)
    run = implementation.prepared(spec.meta(rows, inverse, weights))
    assert run is not implementation
    for _ in range(2):
        got, want = run(rows, inverse, weights), implementation(rows, inverse, weights)
        assert torch.equal(got, want) and got.is_contiguous() and got._base is None
        up = torch.randn(want.shape, generator=g, dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got, (rows, weights), up),
                                                     torch.autograd.grad(want, (rows, weights), up), strict=True))
    assert implementation.prepare(spec.meta(rows, inverse[:0], weights[:0]), implementation) is None  # no bags
