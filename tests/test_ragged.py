"""grouped_linear with ragged groups (the op grouped_linear_ragged): the public call, what it decides
(empty groups, T=0, E=0 and 1, rows past the last offset), what it refuses and when, and its
names everywhere an op is named. Property tests against the float64 reference are in
test_ragged_property.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grouped_ops
from grouped_ops import GroupedLinear, GroupedOpsError, dispatch
from grouped_ops.ops import SPECS
from grouped_ops.ops import _ragged_impls as impls
from grouped_ops.ops import grouped_linear_ragged as ragged

OP = ragged.OP
IMPLS = list(ragged.REGISTRY)


def args(sizes=(3, 0, 4), rows=None, inn=16, out=8, *, bias=True, grad=False, dtype=torch.float32,
         offsets_dtype=torch.int64):
    g = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    total = sum(sizes) if rows is None else rows
    x = torch.randn(total, inn, generator=g, dtype=dtype, requires_grad=grad)
    w = torch.randn(len(sizes), out, inn, generator=g, dtype=dtype, requires_grad=grad)
    b = torch.randn(len(sizes), out, generator=g, dtype=dtype, requires_grad=grad) if bias else None
    offsets = torch.tensor(sizes, dtype=offsets_dtype).cumsum(0, dtype=offsets_dtype)
    return x, w, b, offsets


def expected(x, w, b, offsets):
    """The definition, written out independently of the op module."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        for t in range(start, end):
            out[t] = w[g].double() @ x[t].double() + (0 if b is None else b[g].double())
        start = end
    return out


def supported(impl, x, w, b, offsets):
    sig = SPECS[OP].signature(SPECS[OP].meta(x, w, b, offsets), False)
    return SPECS[OP].registry[impl].supports(sig)


# ---- the public call ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_offsets_and_group_sizes_give_the_definition(offsets_dtype):
    x, w, b, offsets = args(offsets_dtype=offsets_dtype)
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    assert y.shape == (7, 8) and y.is_contiguous() and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected(x, w, b, offsets), rtol=1e-5, atol=1e-5)
    sizes = torch.tensor([3, 0, 4], dtype=offsets_dtype)
    torch.testing.assert_close(grouped_ops.grouped_linear(x, w, b, group_sizes=sizes), y)
    torch.testing.assert_close(grouped_ops.grouped_linear(x, w, b, group_sizes=[3, 0, 4]), y)
    layer = GroupedLinear(3, 16, 8)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    torch.testing.assert_close(layer(x, offsets=offsets), y)
    torch.testing.assert_close(layer(x, group_sizes=sizes), y)


def test_the_weight_may_have_any_strides():
    x, w, b, offsets = args()
    stored = w.detach().transpose(1, 2).contiguous()  # [E, in, out], as PyG and GPT-OSS keep it
    for view in (stored.transpose(1, 2), torch.cat([w, w], 1)[:, :8], w.detach()[..., :].clone()[:, :, :]):
        torch.testing.assert_close(grouped_ops.grouped_linear(x, view, b, offsets=offsets).double(),
                                   expected(x, view, b, offsets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("storage", ["out_in", "in_out"])
@pytest.mark.parametrize("needs", ["all", "input", "weight", "none"])
def test_each_implementation_on_either_storage_gives_the_definition_and_its_gradients(impl, storage, needs):
    # [E, in, out] storage is read through its transposed view (GPT-OSS, PyG); gather_bmm gathers each
    # storage as it is and takes another form where the weight's gradient is needed: every branch here
    x, w, b, offsets = args(sizes=(2, 0, 3, 1), rows=7, dtype=torch.float64)
    stored = (w.transpose(1, 2).contiguous() if storage == "in_out" else w.clone())
    wanted = {"all": (x, stored, b), "input": (x,), "weight": (stored,), "none": ()}[needs]
    for t in wanted:
        t.requires_grad_(True)
    view = stored.transpose(1, 2) if storage == "in_out" else stored
    if not supported(impl, x, view, b, offsets):
        pytest.skip(f"{impl} does not take this call")
    y = grouped_ops.grouped_linear(x, view, b, offsets=offsets, impl=impl)
    ref_leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, stored, b)]
    ref_view = ref_leaves[1].transpose(1, 2) if storage == "in_out" else ref_leaves[1]
    ref = expected(ref_leaves[0], ref_view, ref_leaves[2], offsets)
    torch.testing.assert_close(y, ref)
    if wanted:
        grad = torch.randn(7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        got = torch.autograd.grad(y, wanted, grad)
        want = torch.autograd.grad(ref, [r for r, t in zip(ref_leaves, (x, stored, b), strict=True) if t.requires_grad],
                                   grad)
        for a, e in zip(got, want, strict=True):
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_groups_get_exactly_zero_weight_and_bias_gradients(impl):
    x, w, b, offsets = args(sizes=(0, 3, 0, 0, 4, 0), grad=True)
    if not supported(impl, x, w, b, offsets):
        pytest.skip(f"{impl} does not run this signature")
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
    y.square().sum().backward()
    for g in (0, 2, 3, 5):
        assert torch.equal(w.grad[g], torch.zeros_like(w.grad[g])), g
        assert torch.equal(b.grad[g], torch.zeros_like(b.grad[g])), g
    assert w.grad[1].abs().sum() > 0 and b.grad[4].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_past_the_last_offset_are_zero_with_zero_gradient_never_uninitialised(impl):
    x, w, b, offsets = args(sizes=(2, 0, 3), rows=9, grad=True)
    if not supported(impl, x, w, b, offsets):
        pytest.skip(f"{impl} does not run this signature")
    with torch.utils.deterministic.fill_uninitialized_memory_context() if hasattr(
            torch.utils.deterministic, "fill_uninitialized_memory_context") else _filling():
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
        y.sum().backward()
    assert torch.equal(y[5:], torch.zeros(4, 8))
    assert torch.equal(x.grad[5:], torch.zeros(4, 16))
    torch.testing.assert_close(y.detach().double(), expected(x, w, b, offsets), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gradient", ["stride-0", "contiguous", "column-major"])
def test_grouped_mm_takes_any_incoming_gradient(gradient):
    # torch's grouped_mm backward refuses a gradient it cannot take as an operand (.sum()'s stride-0
    # one): the node's pre-hook copies those, and lets the common contiguous one through unchecked.
    # Every row in a group: the path where torch's own backward runs; decided calls (the lean road)
    # and first calls both.
    for _ in range(2):
        x, w, b, offsets = args(sizes=(2, 0, 3), inn=16, out=8, grad=True)
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="grouped_mm")
        r = torch.randn(8, 5, generator=torch.Generator().manual_seed(3)).t()  # [5, 8], column-major
        loss = y.sum() if gradient == "stride-0" else (y * (r.contiguous() if gradient == "contiguous" else r)).sum()
        loss.backward()
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        weight = torch.ones(5, 8, dtype=torch.float64) if gradient == "stride-0" else r.double()
        (expected_linear(x64, w64, b64, offsets) * weight).sum().backward()
        for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [(0, 5, 0), (4,), (0, 0, 3)])
def test_loop_with_every_row_in_one_group_records_autograds_own_linear(sizes):
    # a top-1 MoE's decode step: the loop is one F.linear there, with no Function of ours (its
    # Python was most of such a step); the other groups' gradients are still exactly zero
    for _ in range(2):  # the first call, then the decided one (the prepared function)
        x, w, b, offsets = args(sizes=sizes, grad=True)
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="loop")
        assert "LoopLinear" not in type(y.grad_fn).__name__
        y.square().sum().backward()
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        expected_linear(x64, w64, b64, offsets).square().sum().backward()
        for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        full = sizes.index(max(sizes))
        assert all(not w.grad[g].any() and not b.grad[g].any() for g in range(len(sizes)) if g != full)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("written", [False, True])  # concatenated pieces, or written into the result (out=)
@pytest.mark.parametrize("context", ["eager", "torch.func"])
def test_the_loops_column_form_gives_the_definition_and_its_gradients(monkeypatch, bias, written, context):
    # float32 groups of 2-8 rows of an [out, in] row-major weight run as (w @ x^T)^T; groups of 1, 9
    # and 12 rows beside them as F.linear, rows past the last offset zero
    if written:
        monkeypatch.setattr(impls, "CAT_LIMIT", 0)
    sizes = (2, 1, 3, 0, 4, 8, 9, 12, 5)
    x, w, b, offsets = args(sizes=sizes, rows=sum(sizes) + 2, inn=256, out=128, bias=bias, grad=True)
    assert [n in impls._column_rows(x, w) for n in (1, 2, 3, 4, 8, 9)] == [False, True, True, True, True, False]
    r = torch.randn(x.shape[0], 128, generator=torch.Generator().manual_seed(3))
    x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b))
    want = expected_linear(x64[:sum(sizes)], w64, b64 if bias else torch.zeros(len(sizes), 128, dtype=torch.float64), offsets)
    want = torch.cat([want, want.new_zeros(2, 128)])
    want_grads = torch.autograd.grad((want * r.double()).sum(), [t for t in (x64, w64, b64) if t is not None])
    if context == "eager":
        for _ in range(2):  # the first call, then the decided one (the prepared function)
            y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="loop")
            assert y.is_contiguous() and y._base is None
            torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
            grads = torch.autograd.grad((y * r).sum(), [t for t in (x, w, b) if t is not None])
    else:
        def loss(x, w, b):
            return (grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="loop") * r).sum()
        grads = torch.func.grad(loss, argnums=(0, 1, 2) if bias else (0, 1))(x, w, b)
    for got, expect in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stored", ["out_in", "in_out"])
@pytest.mark.parametrize("impl", IMPLS)
def test_the_weight_gradient_comes_in_the_weights_own_layout(impl, stored):
    # else AccumulateGrad copies it element by element into the parameter's layout on every step
    # (dense_select reshaped [E, in, out] storage, padded_bmm took autograd's [E, in, out] bmm gradient)
    sizes = (3, 0, 4, 2)
    x, w, b, offsets = args(sizes=sizes, rows=10, dtype=torch.bfloat16, grad=True)
    if stored == "in_out":
        w = w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    sig = SPECS[OP].signature(SPECS[OP].meta(x, w, b, offsets))
    if not ragged.REGISTRY[impl].supports(sig):
        pytest.skip(f"{impl} does not support this call")
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
    gw = torch.autograd.grad(y, w, torch.randn(y.shape, dtype=y.dtype))[0]
    assert gw.stride() == w.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_padded_bmm_pads_further_in_bfloat16_on_the_cpu(monkeypatch, dtype):
    # a slab 3x the grouped rows (4 groups, the largest of 3 rows, 4 rows in all): bfloat16 runs the
    # slab (up to 4x), float32 the loop (up to 2x); both give the definition and its gradients
    ran_loop = []
    monkeypatch.setattr(impls, "loop", lambda *a: ran_loop.append(1) or impls._composable_loop(
        a[0], a[1], a[2], a[3].tolist()))
    sizes = (0, 3, 1, 0)
    x, w, b, offsets = args(sizes=sizes, rows=5, grad=True, dtype=dtype)  # one row past the last offset
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="padded_bmm")
    assert ran_loop == ([] if dtype == torch.bfloat16 else [1])
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.cat([expected_linear(x64[:4], w64, b64, offsets), x64.new_zeros(1, w.shape[1])])
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), want, **tol)
    grads = torch.autograd.grad((y.double() * r).sum(), (x, w, b))
    for got, expect in zip(grads, torch.autograd.grad((want * r).sum(), (x64, w64, b64)), strict=True):
        torch.testing.assert_close(got.double(), expect, **tol)
    assert grads[1][0].abs().sum() == 0 and grads[2][3].abs().sum() == 0  # empty groups: exactly zero
    if dtype == torch.bfloat16:  # the slab's weight gradient in the weight's own layout: no copy by AccumulateGrad
        assert grads[1].is_contiguous()


@pytest.mark.parametrize("fresh_mapping", [False, True])  # True: the weight's gradient counted as >= 32 MiB
@pytest.mark.parametrize("rows", [9, 11])  # 11: two rows past the last offset
def test_grouped_mm_gives_second_derivatives(monkeypatch, fresh_mapping, rows):
    # its own Function runs where rows lie past the last offset or the weight's gradient goes into
    # huge pages; its backward gives the loop's differentiable gradients under create_graph (it was
    # once-differentiable: "trying to differentiate twice", found by trying a >= 32 MiB weight)
    from grouped_ops.ops import _huge_pages
    if fresh_mapping:
        monkeypatch.setattr(_huge_pages, "FRESH_MAPPING_BYTES", 1)
    sizes = (2, 3, 0, 4)
    for _ in range(2):  # the first call, then the decided one (the prepared function)
        x, w, b, offsets = args(sizes=sizes, rows=rows, grad=True)
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl="grouped_mm")
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        y64 = torch.cat([expected_linear(x64[:9], w64, b64, offsets), x64.new_zeros(rows - 9, 8)])
        (gx64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
        gx64.square().sum().backward()
        for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def expected_linear(x, w, b, offsets):
    """:func:`expected` as differentiable float64 ops, for the gradients."""
    ids = torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, prepend=offsets.new_zeros(1)))
    return torch.einsum("ti,toi->to", x, w[ids]) + b[ids]


class _filling:
    """Deterministic mode with fill_uninitialized_memory: torch.empty gives NaN (floats), so an
    implementation that leaves rows unwritten shows NaN there instead of a zero."""

    def __enter__(self):
        self.before = (torch.are_deterministic_algorithms_enabled(),
                       torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before[0])
        torch.utils.deterministic.fill_uninitialized_memory = self.before[1]


def test_fill_uninitialized_memory_would_expose_unwritten_rows():
    # the check above can fail: under the filling mode torch.empty holds NaN
    with _filling():
        assert torch.empty(4, dtype=torch.float32).isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("sizes", "rows"), [((), 0), ((), 3), ((0, 0), 0), ((5,), 5), ((0,), 2), ((2, 3), 5)])
def test_no_rows_no_groups_and_one_group(impl, sizes, rows):
    x, w, b, offsets = args(sizes=sizes, rows=rows, grad=True)
    if not supported(impl, x, w, b, offsets):
        pytest.skip(f"{impl} does not run this signature")
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
    assert y.shape == (rows, 8)
    torch.testing.assert_close(y.detach().double(), expected(x, w, b, offsets), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    if rows:
        assert x.grad is not None and x.grad.shape == x.shape
    if len(sizes) and w.grad is not None:
        for g, size in enumerate(sizes):
            if size == 0:
                assert torch.equal(w.grad[g], torch.zeros_like(w.grad[g]))


def test_autocast_computes_in_the_autocast_dtype():
    x, w, b, offsets = args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), expected(x, w, b, offsets), rtol=3e-2, atol=3e-2)


# ---- what is refused, and when -------------------------------------------------------------------------

@pytest.mark.parametrize(("offsets", "message"), [
    (torch.tensor([3, 2, 7]), r"non-decreasing .* offsets\[1\]=2 < offsets\[0\]=3"),
    (torch.tensor([-1, 2, 7]), r"offsets\[0\]=-1 is negative"),
    (torch.tensor([3, 3, 8]), r"the last offset, offsets\[2\]=8, is past the input's 7 rows"),
    (torch.tensor([3, 7]), r"one entry per group: 3 \(weight's E\), got 2"),
    (torch.tensor([3.0, 3.0, 7.0]), r"must be int32 or int64, got float32"),
    (torch.tensor([[3, 3, 7]]), r"must be 1-D \[E\], got 2-D"),
    (torch.tensor(7), r"must be 1-D \[E\], got 0-D"),
    ([3, 3, 7], r"offsets must be a 1-D integer tensor, got list: pass torch.tensor\(offsets\), or the counts as "
                r"group_sizes="),
])
def test_bad_offsets_are_refused_naming_the_op_the_argument_and_the_shapes(offsets, message):
    x, w, b, _ = args()
    for _ in range(2):  # the first call and the lean road's second
        with pytest.raises(GroupedOpsError, match=message) as e:
            grouped_ops.grouped_linear(x, w, b, offsets=offsets)
        assert str(e.value).startswith(f"{OP}: ")
        assert "input.shape=(7, 16), weight.shape=(3, 8, 16)" in str(e.value)
        if isinstance(offsets, torch.Tensor):
            assert "offsets.shape=" in str(e.value)


def test_a_second_bad_call_with_the_same_shapes_is_refused_on_the_memo_hit():
    x, w, b, offsets = args()
    grouped_ops.grouped_linear(x, w, b, offsets=offsets)  # decided and memoised
    grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    for impl in ("auto", *IMPLS):
        for bad in (torch.tensor([3, 2, 7]), torch.tensor([3, 3, 9])):
            if impl != "auto" and not supported(impl, x, w, b, bad):
                continue
            for _ in range(2):  # the second time surely from the memo
                with pytest.raises(GroupedOpsError, match=OP):
                    grouped_ops.grouped_linear(x, w, b, offsets=bad, impl=impl)


def test_group_sizes_and_both_given():
    x, w, b, offsets = args()
    with pytest.raises(GroupedOpsError, match=r"give offsets .* or group_sizes .*, not both .*group_sizes.shape=\(3,\)"):
        grouped_ops.grouped_linear(x, w, b, offsets=offsets, group_sizes=torch.tensor([3, 0, 4]))
    with pytest.raises(GroupedOpsError, match=r"group_sizes must be >= 0; group_sizes\[1\]=-1"):
        grouped_ops.grouped_linear(x, w, b, group_sizes=torch.tensor([3, -1, 5]))
    # the refusals name the argument given (group_sizes), not the offsets made from it
    with pytest.raises(GroupedOpsError, match=r"group_sizes add up to 8 rows, past the input's 7 .*group_sizes.shape=\(3,\)"):
        grouped_ops.grouped_linear(x, w, b, group_sizes=[3, 1, 4])
    with pytest.raises(GroupedOpsError, match=r"group_sizes must have one entry per group: 3 \(weight's E\), got 2"):
        grouped_ops.grouped_linear(x, w, b, group_sizes=torch.tensor([3, 4]))
    with pytest.raises(GroupedOpsError, match="group_sizes must be int32 or int64, got float32"):
        grouped_ops.grouped_linear(x, w, b, group_sizes=torch.tensor([3.0, 0.0, 4.0]))
    with pytest.raises(GroupedOpsError, match="group_sizes must be ints"):
        grouped_ops.grouped_linear(x, w, b, group_sizes=[3.0, 0, 4])


def test_shapes_are_refused_as_for_the_dense_op():
    x, w, b, offsets = args()
    with pytest.raises(GroupedOpsError, match=r"input must be 2-D \[T, in\]"):
        grouped_ops.grouped_linear(x[None], w, b, offsets=offsets)
    with pytest.raises(GroupedOpsError, match=r"passed as W.transpose\(1, 2\)"):
        grouped_ops.grouped_linear(x[:, :8], w, b, offsets=offsets)
    with pytest.raises(GroupedOpsError, match=r"bias must have shape \(3, 8\)"):
        grouped_ops.grouped_linear(x, w, b[:2], offsets=offsets)
    with pytest.raises(GroupedOpsError, match="one dtype"):
        grouped_ops.grouped_linear(x, w.double(), b, offsets=offsets)


def test_quantized_and_fp8_weights_are_refused_clearly():
    x, w, b, offsets = args()
    quantized = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
    with pytest.raises(GroupedOpsError, match=r"weight is quantized or FP8 \(qint8\).*dequantize"):
        grouped_ops.grouped_linear(x, quantized, b, offsets=offsets)
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(GroupedOpsError, match=r"quantized or FP8 \(float8_e4m3fn\)"):
            grouped_ops.grouped_linear(x, w.to(torch.float8_e4m3fn), b, offsets=offsets)


# ---- names: implementations(), use_impl, GROUPED_OPS_IMPL, GroupedLinear(impl=) ---------------------------

def test_the_op_is_known_by_its_name():
    assert grouped_ops.implementations(OP) == tuple(IMPLS)
    assert hasattr(torch.ops.grouped_ops, f"{OP}_auto")
    x, w, b, offsets = args()
    grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    found = grouped_ops.lookup(OP, x, w, b, offsets)
    assert found is not None and found.signature.op == OP and "offsets=host" in str(found.signature)


def test_use_impl_without_an_op_applies_to_each_op_that_has_the_name(monkeypatch):
    x, w, b, offsets = args()
    with grouped_ops.use_impl("loop"):
        assert grouped_ops.lookup(OP, x, w, b, offsets).source == "forced"
        assert grouped_ops.lookup("grouped_linear", torch.randn(2, 3, 4), torch.randn(3, 5, 4)).impl == "loop"
    with grouped_ops.use_impl("padded_bmm") if "padded_bmm" in IMPLS else grouped_ops.use_impl(**{OP: "loop"}):
        assert grouped_ops.lookup(OP, x, w, b, offsets).source == "forced"
        dense = grouped_ops.lookup("grouped_linear", torch.randn(2, 3, 4), torch.randn(3, 5, 4))
        assert dense is None or dense.source != "forced"  # the dense op has no such name: left on auto
    monkeypatch.setenv("GROUPED_OPS_IMPL", f"{OP}=loop")
    found = grouped_ops.lookup(OP, x, w, b, offsets)
    assert (found.impl, found.source) == ("loop", "env")


def test_grouped_linear_impl_is_checked_against_the_op_its_call_reaches():
    x, w, b, offsets = args()
    layer = GroupedLinear(3, 16, 8, impl="bmm")
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 8)
    with pytest.raises(GroupedOpsError, match=rf"{OP}: impl 'bmm' is an implementation of grouped_linear, but a "
                                              rf"call with offsets or group_sizes runs {OP}"):
        layer(x, offsets=offsets)
    ragged_only = next(n for n in IMPLS if n not in SPECS["grouped_linear"].registry) if any(
        n not in SPECS["grouped_linear"].registry for n in IMPLS) else None
    if ragged_only:
        layer = GroupedLinear(3, 16, 8, impl=ragged_only)
        assert layer(x, offsets=offsets).shape == (7, 8)
        with pytest.raises(GroupedOpsError, match=rf"grouped_linear: impl '{ragged_only}' is an implementation of {OP}"):
            layer(torch.randn(2, 3, 16))
    with pytest.raises(GroupedOpsError, match="GroupedLinear: unknown impl 'nope'"):
        GroupedLinear(3, 16, 8, impl="nope")


# ---- torch.compile and export: the op's custom op ----------------------------------------------------------

@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_fullgraph_with_tensor_offsets_and_a_dynamic_T_goes_through_the_custom_op(_fresh_dynamo):
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    layer = GroupedLinear(3, 16, 8)
    compiled = torch.compile(lambda x, o: F.relu(layer(x, offsets=o)), backend=backend, fullgraph=True, dynamic=True)
    for sizes in ((3, 0, 4), (5, 2, 6), (1, 1, 0)):
        x, _, _, offsets = args(sizes=sizes, rows=sum(sizes) + 1)
        x.requires_grad_(True)
        y = compiled(x, offsets)
        torch.testing.assert_close(y.detach().double(), expected(x, layer.weight, layer.bias, offsets).relu(),
                                   rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert torch.equal(x.grad[-1], torch.zeros(16))
    assert f"grouped_ops.{OP}_auto.default" in seen
    assert not any("mm" in name and "grouped_ops" not in name for name in seen)  # nothing inlined


def test_export_keeps_the_custom_op(_fresh_dynamo):
    layer = GroupedLinear(3, 16, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, offsets):
            return self.layer(x, offsets=offsets)

    x, _, _, offsets = args()
    program = torch.export.export(Model(), (x, offsets))
    assert f"grouped_ops.{OP}_auto" in str(program.graph)
    torch.testing.assert_close(program.module()(x, offsets), layer(x, offsets=offsets))


# ---- the tuner's private inputs ------------------------------------------------------------------------------

def test_private_offsets_are_a_fixed_seed_balanced_split():
    a, b = ragged.balanced_offsets(1000, 8), ragged.balanced_offsets(1000, 8)
    assert torch.equal(a, b) and a.dtype == torch.int32 and int(a[-1]) == 1000
    sizes = torch.diff(a, prepend=a.new_zeros(1))
    assert int(sizes.min()) > 80 and int(sizes.max()) < 170
    sig = SPECS[OP].signature(SPECS[OP].meta(*args()), True)
    x, w, b, offsets = SPECS[OP].make_inputs(sig, torch.Generator().manual_seed(0))
    assert x.shape == (8, 16) and offsets.shape == (3,) and int(offsets[-1]) == 8
    assert dispatch.decide_signature(SPECS[OP], sig).impl in IMPLS


# ---- the ragged sweep (python -m grouped_ops bench --ragged) ---------------------------------------------------

def test_the_ragged_sweep_runs_and_writes_its_report(tmp_path):
    from grouped_ops.cli import main

    md, js = tmp_path / "ragged.md", tmp_path / "ragged.json"
    assert main(["bench", "--ragged", "--quick", "--passes", "fwd", "--cell-time", "0.02", "--reps", "2",
                 "--threads", "1", "--markdown", str(md), "--json", str(js), "--no-progress"]) == 0
    text = md.read_text()
    for column in (*IMPLS, "auto", "python loop", "F.grouped_mm", "auto picks", "% floor"):
        assert f"| {column} |" in text or f" {column} |" in text, column
    import json

    data = json.loads(js.read_text())
    assert len(data["cells"]) == 6 and all(c["results"]["auto"]["status"] == "ok" for c in data["cells"])
    auto = data["cells"][0]["results"]["auto"]
    assert 0 < auto["min_s"] <= auto["median_s"]
    assert {"auto_over_fastest_geomean", "auto_vs_baseline_geomean", "below_1"} <= set(data["stats"])
    again = tmp_path / "again.json"  # re-rendered from the JSON, nothing measured: the same numbers
    assert main(["bench", "--ragged", "--from-json", str(js), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["stats"] == data["stats"]


def test_skewed_offsets_have_the_largest_group_share_they_name():
    from grouped_ops.bench.ragged import skewed_offsets

    for skew, share in (("balanced", 0.2), ("half", 0.5), ("all", 1.0)):
        o = skewed_offsets(1000, 8, skew)
        sizes = torch.diff(o, prepend=o.new_zeros(1))
        assert int(o[-1]) == 1000 and abs(int(sizes.max()) / 1000 - share) < 0.1, skew


# ---- the command line, record and prewarm ------------------------------------------------------------------

def test_cli_explain_and_prewarm_key_as_a_real_call(capsys):
    from grouped_ops.cli import main

    def fast(name, fn, number):
        return 1e-6 if name == "padded_bmm" else 1e-3

    with dispatch.use_timer(fast):
        assert main(["explain", OP, "--batch", "7", "--groups", "3", "--in", "16", "--out", "8", "--grad"]) == 0
        out = capsys.readouterr().out
        assert f"{OP}(batch=8, n=3, in=16, out=8" in out and "offsets=host" in out and "decision:  padded_bmm" in out
    x, w, b, offsets = args()
    found = grouped_ops.lookup(OP, x, w.requires_grad_(), b.requires_grad_(), offsets)
    assert found is not None and found.impl == "padded_bmm"  # the key the CLI tuned is a real call's


def test_record_then_prewarm_signatures():
    x, w, b, offsets = args()
    with grouped_ops.record() as rec:
        grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    assert [s.op for s in rec.signatures] == [OP]
    with dispatch.use_timer(lambda name, fn, number: 1e-6 if name == "loop" else 1e-3):
        decisions = rec.prewarm()
    assert [d.impl for d in decisions] == ["loop"]
    assert grouped_ops.lookup(OP, x, w, b, offsets).impl == "loop"


# ---- the split's class: part of the key where the offsets are on the host -------------------------------------

@pytest.mark.parametrize(("sizes", "split"), [
    ((), "balanced"), ((5,), "balanced"), ((0, 0, 0), "balanced"), ((4, 4, 4, 4), "balanced"),
    ((8, 1, 1, 1, 1), "skewed"), ((0, 19, 1, 0), "one"), ((0, 10, 0), "one"), ((6, 2, 2, 2), "balanced"),
])
def test_split_class(sizes, split):
    assert ragged.split_class(torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()) == split


def test_the_split_class_is_in_the_key_and_the_tuner_times_a_split_of_that_class():
    spec = SPECS[OP]
    keys = {}
    for sizes in ((4, 4, 4, 4), (13, 1, 1, 1), (0, 16, 0, 0)):
        x, w, b, offsets = args(sizes=sizes)
        sig = spec.signature(spec.meta(x, w, b, offsets), True)
        keys[sig.layout_of("split")] = sig.key()
        private = spec.make_inputs(sig, torch.Generator().manual_seed(0))[3]
        assert ragged.split_class(private.tolist()) == sig.layout_of("split")
    assert set(keys) == {"balanced", "skewed", "one"} and len(set(keys.values())) == 3


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "grouped_mm"])  # grouped_mm refuses empty features
@pytest.mark.parametrize(("inn", "out"), [(5, 0), (0, 6)])
def test_no_output_or_no_input_features(impl, inn, out):
    # out=0 made dense_select's reshape(E*out, -1) ambiguous ("cannot reshape tensor of 0 elements")
    x, w, b, offsets = args(sizes=(1, 2, 1), inn=inn, out=out, grad=True)
    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
    torch.testing.assert_close(y.double(), expected(x, w, b, offsets).to(y.dtype).double())
    y.sum().backward()
    assert w.grad.shape == w.shape and b.grad.shape == b.shape
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 2.0, 1.0]).unsqueeze(1).expand(3, out))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [(2, 2), (0, 3, 1, 0)])
def test_inference_mode_with_grad_enabled_gives_the_definition_and_records_no_graph(impl, sizes):
    # inference mode with grad enabled records nothing (as the dense op's test_edge_contexts one):
    # padded_bmm's slab took _BmmLinear3d there and failed ("Inference tensors cannot be saved for
    # backward"); grouped_mm's native path failed registering its pre-hook on a None grad_fn; the
    # loop's _LoopLinear recorded a graph on an inference tensor
    x, w, b, offsets = args(sizes=sizes, inn=8, out=8, bias=False, dtype=torch.bfloat16)
    w.requires_grad_(True)
    if not supported(impl, x, w, b, offsets):
        pytest.skip(f"{impl} does not run this signature")
    with torch.inference_mode(), torch.enable_grad():
        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y.double(), expected(x, w.detach(), b, offsets), rtol=2e-2, atol=2e-2)
