"""The output contract, for every implementation in the registries and on every path a call takes:
a fresh result (not a view of an intermediate, ``_base is None``) of the documented shape, in the
op's layout (grouped_linear: group-major, ``[n, ..., out]`` in memory; other ops: contiguous), in
the input's dtype, or the autocast dtype under autocast; the same layout whatever ``auto`` picks.

Parametrized over the registries, so a new implementation is covered without editing this file.
"""

from __future__ import annotations

import pytest
import torch

import grouped_ops
from grouped_ops import dispatch, grouped_linear, weighted_combine
from grouped_ops.functional import public
from grouped_ops.ops import SPECS
from grouped_ops.registry import group_major_strides

CASES = [(op, impl) for op, spec in SPECS.items() for impl in spec.registry]
PATHS = ["forced", "auto", "compiled-inline", "compiled-custom-op", "exported"]


def _args(op: str, dtype: torch.dtype = torch.float32, grad: bool = False, list_inputs: bool = False):
    g = torch.Generator().manual_seed(0)
    if op == "grouped_linear":  # in/out multiples of 8: every implementation runs
        x, w, b = torch.randn(6, 4, 16, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, generator=g)
        return (x.to(dtype), w.to(dtype).requires_grad_(grad), b.to(dtype)), (6, 4, 8)
    if op == "unpermute_combine":  # 6 tokens, top-3, rows in expert order
        rows, inverse = torch.randn(18, 5, generator=g).to(dtype), torch.randperm(18, generator=g).view(6, 3)
        w = torch.softmax(torch.randn(6, 3, generator=g), -1).to(dtype)
        return (rows.requires_grad_(grad), inverse, w), (6, 5)
    if op == "grouped_linear_ragged":  # an empty group and a row past the last offset
        x, w, b = torch.randn(9, 16, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, generator=g)
        offsets = torch.tensor([3, 3, 5, 8], dtype=torch.int32)
        return (x.to(dtype), w.to(dtype).requires_grad_(grad), b.to(dtype), offsets), (9, 8)
    xs, w = torch.randn(6, 3, 2, 5, generator=g).to(dtype), torch.softmax(torch.randn(6, 3, generator=g), -1).to(dtype)
    inputs = list(xs.unbind(1)) if list_inputs else xs
    return (inputs, w.requires_grad_(grad)), (6, 2, 5)


def _run(op: str, impl: str, path: str, args: tuple, tmp_path=None) -> torch.Tensor:
    fn = getattr(grouped_ops, op, None) or public(SPECS[op])  # an op without a public name of its own
    if path == "forced":
        return fn(*args, impl=impl)
    if path == "auto":
        with grouped_ops.use_impl(**{op: impl}):
            return fn(*args)
    if path in ("compiled-inline", "compiled-custom-op"):
        torch._dynamo.reset()
        if path == "compiled-inline":
            compiled = torch.compile(lambda *a: fn(*a, impl=impl), backend="eager", fullgraph=True)
            return compiled(*args)
        # nothing decided and a dynamic batch: the call goes through the custom op, which runs impl
        with dispatch.use_timer(lambda name, fn_, number: 1e-6 if name == impl else 1e-4):
            compiled = torch.compile(lambda *a: fn(*a), backend="eager", fullgraph=True, dynamic=True)
            return compiled(*args)

    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a, impl=impl)

    flat = tuple(args[0]) + (args[1],) if isinstance(args[0], list) else args
    if isinstance(args[0], list):
        module = type("L", (torch.nn.Module,), {"forward": lambda self, *a: fn(list(a[:-1]), a[-1], impl=impl)})()
    else:
        module = M()
    program = torch.export.export(module, flat)
    return program.module()(*flat)


def _want_strides(op: str, shape: tuple) -> tuple:
    if op == "grouped_linear":  # [n, batch, out] in memory: y.transpose(0, 1) of a contiguous one
        return group_major_strides(shape)
    return torch.empty(shape).stride()


def test_group_major_strides_are_those_of_a_moved_contiguous_tensor():
    assert group_major_strides((6, 4, 8)) == torch.empty(4, 6, 8).transpose(0, 1).stride() == (8, 48, 1)
    for shape in [(2, 3, 4, 5), (1, 4, 5), (0, 4, 5), (3, 0, 2), (4, 5), (7,), ()]:
        if len(shape) >= 3:
            want = torch.empty(shape[-2], *shape[:-2], shape[-1]).movedim(0, -2).stride()
        else:
            want = torch.empty(shape).stride()
        assert group_major_strides(shape) == want, shape


def _check(out: torch.Tensor, shape: tuple, dtype: torch.dtype, what: str, op: str = "weighted_combine") -> None:
    assert tuple(out.shape) == shape, what
    assert out.dtype == dtype, what
    assert out.stride() == _want_strides(op, shape), f"{what}: strides {out.stride()}"
    assert not out._is_view() and out._base is None, f"{what}: a view of an intermediate"


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("op", "impl"), CASES)
def test_every_implementation_returns_a_fresh_result_in_the_ops_layout_on_every_path(op, impl, path, grad):
    if path == "exported" and grad:
        pytest.skip("export traces inference programs here")
    args, shape = _args(op, grad=grad)
    try:
        out = _run(op, impl, path, args)
    except grouped_ops.GroupedOpsError as e:
        if "does not support" in str(e):
            pytest.skip(f"{impl} does not run this signature here")
        raise
    _check(out, shape, torch.float32, f"{op}/{impl}/{path}", op)


@pytest.mark.parametrize(("op", "impl"), CASES)
def test_list_inputs_and_channels_last_give_a_contiguous_result(op, impl):
    if op != "weighted_combine":
        pytest.skip("lists and images are weighted_combine's")
    branches = [torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    w = torch.softmax(torch.randn(4, 3), -1)
    out = weighted_combine(branches, w, impl=impl)
    # decided: the result is in torch.contiguous_format whatever the branches' memory format
    _check(out, (4, 3, 5, 5), torch.float32, impl)
    torch.testing.assert_close(out, sum(b * w[:, i, None, None, None] for i, b in enumerate(branches)))


@pytest.mark.parametrize(("op", "impl"), CASES)
def test_autocast_gives_the_autocast_dtype_for_every_implementation(op, impl):
    args, shape = _args(op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            out = getattr(grouped_ops, op)(*args, impl=impl)
        except grouped_ops.GroupedOpsError:
            pytest.skip(f"{impl} does not run this signature here")
    _check(out, shape, torch.bfloat16, f"{op}/{impl}", op)


def test_auto_gives_the_same_layout_whatever_it_picks():
    args, shape = _args("grouped_linear")
    layouts = set()
    for impl in grouped_ops.implementations("grouped_linear"):
        dispatch.clear_memory()
        with dispatch.use_timer(lambda name, fn, number, impl=impl: 1e-6 if name == impl else 1e-4):
            out = grouped_linear(*args)
        layouts.add((out.stride(), out._is_view()))
    assert layouts == {((8, 48, 1), False)}  # group-major: [4 groups, 6 rows, 8 out] in memory


def test_in_place_activation_after_the_op_trains_like_the_loop():
    # nn.ReLU(inplace=True) on the result: fine for a fresh tensor, whichever implementation ran
    for impl in grouped_ops.implementations("grouped_linear"):
        args, _ = _args("grouped_linear", grad=True)
        try:
            y = grouped_linear(*args, impl=impl)
        except grouped_ops.GroupedOpsError:
            continue
        torch.relu_(y).sum().backward()
        w = args[1].detach().clone().requires_grad_()
        ref = torch.stack([torch.nn.functional.linear(args[0][:, i], w[i], args[2][i]) for i in range(4)], 1)
        ref.relu().sum().backward()
        torch.testing.assert_close(args[1].grad, w.grad, msg=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("op", "impl"), CASES)
def test_cuda_autocast_gives_the_autocast_dtype_for_every_implementation(op, impl, dtype):
    # CUDA autocast puts `sum` on its float32 list: an implementation that ran under it would return
    # float32 (CPU autocast has no such entry, so only a GPU can show this)
    args, shape = _args(op)
    args = tuple([t.cuda() for t in a] if isinstance(a, list) else a.cuda() for a in args)
    with torch.autocast("cuda", dtype=dtype):
        try:
            out = getattr(grouped_ops, op)(*args, impl=impl)
        except grouped_ops.GroupedOpsError:
            pytest.skip(f"{impl} does not run this signature here")
    _check(out, shape, dtype, f"{op}/{impl}")


def _two_layers(storage: str, groups: int, inn: int, out: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Two layers' weights (``[groups, out, inn]``, stored so or transposed from ``[groups, inn, out]``)
    and biases, all requiring grad."""
    def weight():
        w = torch.randn(groups, inn, out, generator=g).transpose(1, 2) if storage == "in_out" else \
            torch.randn(groups, out, inn, generator=g)
        return w.requires_grad_()
    w1, w2 = weight(), weight()
    return w1, w2, *(torch.randn(groups, out, generator=g, requires_grad=True) for _ in range(2))


LINEAR_CASES = [(op, impl) for op in ("grouped_linear", "grouped_linear_ragged") for impl in SPECS[op].registry]


@pytest.mark.parametrize("storage", ["out_in", "in_out"])
@pytest.mark.parametrize(("op", "impl"), LINEAR_CASES)
def test_gradients_are_tensors_of_their_own_and_accumulate(op, impl, storage):
    # One row per group, so a bias has the product's own shape: autograd would hand the incoming
    # gradient itself back as the bias's (found: bmm's and bmm_weight_left's b.grad were views of it,
    # two layers fed by one gradient shared one .grad buffer, and three backward passes gave 2x)
    g = torch.Generator().manual_seed(0)
    groups, inn, out = 4, 16, 8
    w1, w2, b1, b2 = _two_layers(storage, groups, inn, out, g)
    if op == "grouped_linear":
        x = torch.randn(1, groups, inn, generator=g)
        kwargs = {}

        def reference(x, w, b):
            return torch.einsum("bni,noi->bno", x, w) + b
    else:
        x = torch.randn(groups, inn, generator=g)  # row t in group t
        kwargs = {"offsets": torch.arange(1, groups + 1)}

        def reference(x, w, b):
            return torch.einsum("ti,toi->to", x, w) + b
    upstream = torch.randn(reference(x, w1, b1).shape, generator=g)
    results = []
    for f in (lambda x, w, b: grouped_linear(x, w, b, impl=impl, **kwargs), reference):
        for t in (w1, w2, b1, b2):
            t.grad = None
        for _ in range(3):
            (f(x, w1, b1) + f(x, w2, b2)).backward(upstream)
        storages = {t.grad.untyped_storage().data_ptr() for t in (w1, w2, b1, b2)}
        assert len(storages) == 4 and upstream.untyped_storage().data_ptr() not in storages
        results.append([t.grad.clone() for t in (w1, w2, b1, b2)])
    for mine, want in zip(*results, strict=True):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("impl", "storage"), [("bmm", "out_in"), ("bmm", "in_out"), ("bmm_weight_left", "out_in")])
def test_compiled_gradients_are_tensors_of_their_own_and_accumulate(impl, storage):
    # the compiled bmm adds the bias after the GEMM (inductor fuses it): with one row that add handed
    # the incoming gradient back as the bias's too (b.grad aliased the upstream gradient: 2x after
    # three passes, as plain torch's `bmm(...) + b.unsqueeze(1)` does)
    g = torch.Generator().manual_seed(0)
    groups, inn, out = 4, 16, 8
    w1, w2, b1, b2 = _two_layers(storage, groups, inn, out, g)
    x, upstream = torch.randn(1, groups, inn, generator=g), torch.randn(1, groups, out, generator=g)

    torch._dynamo.reset()

    @torch.compile(backend="aot_eager")  # AOTAutograd's backward, as inductor's, without its compile time
    def both(x, w1, b1, w2, b2):
        return grouped_linear(x, w1, b1, impl=impl) + grouped_linear(x, w2, b2, impl=impl)
    for _ in range(3):
        both(x, w1, b1, w2, b2).backward(upstream)
    assert b1.grad.untyped_storage().data_ptr() not in (b2.grad.untyped_storage().data_ptr(),
                                                        upstream.untyped_storage().data_ptr())
    for b in (b1, b2):
        torch.testing.assert_close(b.grad, 3 * upstream[0])
    torch._dynamo.reset()
