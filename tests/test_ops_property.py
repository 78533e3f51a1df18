"""Every implementation of every op agrees with a float64 reference, forward and backward.

The tests parametrize over the registries themselves (ids read ``bmm-cpu-float32``), so a new
implementation is tested without touching this file. Inputs come from ``grouped_ops.testing``, the
same strategies users get; the last tests check that those strategies reach every awkward case and
that the agreement check really fails when something is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, find, given, settings
from hypothesis import strategies as st

import grouped_ops
from grouped_ops import GroupedOpsError, grouped_linear, implementations, weighted_combine
from grouped_ops.ops import SPECS
from grouped_ops.testing import (
    assert_implementations_agree,
    grouped_linear_inputs,
    reference_grouped_linear,
    reference_weighted_combine,
    weighted_combine_inputs,
)

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STRATEGIES = {"grouped_linear": grouped_linear_inputs, "weighted_combine": weighted_combine_inputs}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cases(op: str, extra: tuple[str, ...] = ()) -> list:
    """(impl, device, dtype) for every implementation of ``op``, with ids like ``bmm-cpu-float32``."""
    cases = []
    for impl in (*implementations(op), *extra):
        for device, dtypes, marks in (("cpu", CPU_DTYPES, ()), ("cuda", CUDA_DTYPES, (pytest.mark.gpu,))):
            for dtype in dtypes:
                cases.append(pytest.param(impl, device, dtype, marks=marks,
                                          id=f"{impl}-{device}-{_dtype_name(dtype)}"))
    return cases


def _strategy_options(op: str, impl: str, dtype: torch.dtype) -> dict:
    # grouped_mm needs 16-byte aligned feature sizes; draw them, or it would almost never run.
    if op == "grouped_linear" and impl == "grouped_mm":
        align = 16 // dtype.itemsize
        return {"feature_multiple": align, "max_features": max(12, 2 * align)}
    return {}


def _output_shape(op: str, args: tuple) -> tuple[int, ...]:
    if op == "grouped_linear":
        x, w, _ = args
        return (*x.shape[:-1], w.shape[1])
    inputs, weights = args
    first = inputs if isinstance(inputs, torch.Tensor) else inputs[0]
    tail = first.shape[2:] if isinstance(inputs, torch.Tensor) else first.shape[1:]
    return (weights.shape[0], *tail)


def _check_one(op: str, impl: str, args: tuple, data: st.DataObject) -> None:
    """``impl`` agrees with the reference, or, where it declares the input unsupported, refuses it."""
    spec = SPECS[op]
    sig = spec.signature(spec.meta(*args), False)
    head = args[0]  # input, or inputs (a tensor or a list)
    contiguous = all(t.is_contiguous() for t in ([head] if isinstance(head, torch.Tensor) else head))
    layout = sig.layout_of("contiguous" if op == "weighted_combine" else "input")
    assert (layout in ("yes", "contiguous")) == contiguous, "the signature disagrees with is_contiguous()"
    reasons = spec.registry[impl].not_supported_reasons(sig)
    if reasons:
        with pytest.raises(GroupedOpsError, match=rf"^{op}: impl '{impl}' does not support"):
            getattr(grouped_ops, op)(*args, impl=impl)
        return
    # Half the time back-propagate a stride-0 gradient, as `out.sum().backward()` does.
    grad_output = None
    if data.draw(st.booleans(), label="sum_grad"):
        grad_output = torch.ones((), dtype=torch.float64, device=sig.device).expand(_output_shape(op, args))
    assert assert_implementations_agree(op, *args, impls=[impl], grad_output=grad_output) == (impl,)


@pytest.mark.parametrize(("impl", "device", "dtype"), _cases("grouped_linear"))
@given(data=st.data())
def test_grouped_linear_agrees_with_reference(impl, device, dtype, data):
    options = _strategy_options("grouped_linear", impl, dtype)
    args = data.draw(grouped_linear_inputs(dtypes=(dtype,), device=device, **options), label="args")
    _check_one("grouped_linear", impl, args, data)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=_dtype_name)
@given(data=st.data())
def test_bmm_autograd_graph_agrees_with_reference(dtype, data):
    # bmm trains nn.Linear's layout through _BmmLinear up to LAYOUT_COPY_ROWS rows, which drawn
    # shapes never pass, and through autograd's own graph above: lowered here, every drawn
    # training call takes that graph
    from unittest import mock

    from grouped_ops.ops import _bmm_linear as bl

    args = data.draw(grouped_linear_inputs(dtypes=(dtype,)), label="args")
    with mock.patch.object(bl, "LAYOUT_COPY_ROWS", -1):
        _check_one("grouped_linear", "bmm", args, data)


@pytest.mark.parametrize(("impl", "device", "dtype"), _cases("weighted_combine"))
@given(data=st.data())
def test_weighted_combine_agrees_with_reference(impl, device, dtype, data):
    args = data.draw(weighted_combine_inputs(dtypes=(dtype,), device=device), label="args")
    _check_one("weighted_combine", impl, args, data)


# impl="auto" tunes each new signature (on a tiny budget here), so fewer examples.
@pytest.mark.parametrize("op", sorted(STRATEGIES))
@pytest.mark.parametrize(("device", "dtype"), [
    *(pytest.param("cpu", dt, id=f"cpu-{_dtype_name(dt)}") for dt in CPU_DTYPES),
    *(pytest.param("cuda", dt, id=f"cuda-{_dtype_name(dt)}", marks=pytest.mark.gpu) for dt in CUDA_DTYPES),
])
@settings(max_examples=15)
@given(data=st.data())
def test_auto_agrees_with_reference(op, device, dtype, data):
    args = data.draw(STRATEGIES[op](dtypes=(dtype,), device=device), label="args")
    assert assert_implementations_agree(op, *args, impls=["auto"]) == ("auto",)


def test_all_implementations_at_once():
    # The default call checks every supported implementation and says which it ran.
    x = torch.randn(3, 2, 4, 8, dtype=torch.float32).transpose(0, 1)
    w = torch.randn(4, 8, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    assert assert_implementations_agree("grouped_linear", x, w, b) == implementations("grouped_linear")
    assert assert_implementations_agree(grouped_linear, x, w, bias=b) == implementations("grouped_linear")
    # float64: grouped_mm does not take it and is skipped, not failed
    checked = assert_implementations_agree("grouped_linear", x.double(), w.double(), b.double())
    assert "grouped_mm" not in checked and "bmm" in checked
    outs = [torch.randn(3, 2, 5, requires_grad=True) for _ in range(4)]
    assert assert_implementations_agree(weighted_combine, outs, weights=torch.rand(3, 4)) == \
        implementations("weighted_combine")


@pytest.mark.parametrize("op", sorted(STRATEGIES))
def test_inputs_are_left_alone(op):
    """Calling an op with any implementation leaves the caller's tensors untouched."""
    args = find(STRATEGIES[op](requires_grad=False), lambda a: _output_shape(op, a)[0] > 0,
                settings=settings(database=None))
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if t is not None]
    before = [t.clone() for t in tensors]
    for impl in implementations(op):
        if SPECS[op].registry[impl].supports(SPECS[op].signature(SPECS[op].meta(*args), False)):
            getattr(grouped_ops, op)(*args, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(before, tensors, strict=True))


# ---- non-finite values stay where they belong ----------------------------------------------------

_LEAKS = pytest.mark.xfail(strict=True, reason="masked_dense multiplies every input by the zeros of its "
                           "block-diagonal weight, so inf*0=nan spreads to other groups/samples")


@pytest.mark.parametrize("impl", [pytest.param(i, marks=_LEAKS if i == "masked_dense" else ())
                                  for i in implementations("grouped_linear")])
def test_grouped_linear_nonfinite_input_stays_in_its_group(impl):
    x = torch.randn(2, 3, 8)
    x[0, 0, 0] = math.inf
    y = grouped_linear(x, torch.randn(3, 8, 8), torch.randn(3, 8), impl=impl)
    finite = y.isfinite().all(-1)
    assert finite.tolist() == [[False, True, True], [True, True, True]]


@pytest.mark.parametrize("impl", implementations("grouped_linear"))
def test_grouped_linear_nonfinite_weight_stays_in_its_group(impl):
    w = torch.randn(3, 8, 8)
    w[1, 0, 0] = math.nan
    y = grouped_linear(torch.randn(2, 3, 8), w, torch.randn(3, 8), impl=impl)
    assert y.isfinite().all(-1).tolist() == [[True, False, True]] * 2


@pytest.mark.parametrize("impl", [pytest.param(i, marks=_LEAKS if i == "masked_dense" else ())
                                  for i in implementations("weighted_combine")])
def test_weighted_combine_nonfinite_input_stays_in_its_sample(impl):
    outs = [torch.randn(3, 4) for _ in range(2)]
    outs[1][1, 2] = math.inf
    y = weighted_combine(outs, torch.rand(3, 2), impl=impl)
    assert y.isfinite().all(-1).tolist() == [True, False, True]


# ---- the strategies reach every case the issue lists ---------------------------------------------

def _transposed(w: torch.Tensor) -> bool:
    return w.shape[1] > 1 and w.shape[2] > 1 and w.transpose(1, 2).is_contiguous()


def _permuted(t: torch.Tensor) -> bool:
    strides = [st for st, size in zip(t.stride(), t.shape, strict=True) if size > 1]
    return t.numel() > 1 and strides != sorted(strides, reverse=True)


def _strided(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and not (t.dim() == 3 and _transposed(t))


GL_CASES = {
    "n=1": lambda x, w, b: w.shape[0] == 1,
    "in=1": lambda x, w, b: w.shape[2] == 1,
    "out=1": lambda x, w, b: w.shape[1] == 1,
    "empty-batch": lambda x, w, b: 0 in x.shape[:-2],
    "no-groups": lambda x, w, b: w.shape[0] == 0,
    "no-in-features": lambda x, w, b: w.shape[2] == 0,
    "no-out-features": lambda x, w, b: w.shape[1] == 0,
    "several-leading-dims": lambda x, w, b: x.dim() >= 4 and x.numel() > 0,
    "unbatched": lambda x, w, b: x.dim() == 2,
    "permuted-input": lambda x, w, b: _permuted(x),
    "sliced-input": lambda x, w, b: x.numel() > 1 and x.storage_offset() > 0,
    "transposed-weight": lambda x, w, b: _transposed(w),
    "strided-weight": lambda x, w, b: _strided(w) and 0 not in w.stride(),
    "broadcast-weight": lambda x, w, b: 0 in w.stride(),
    "misaligned-weight": lambda x, w, b: w.is_contiguous() and w.numel() > 1 and w.storage_offset() == 1,
    "no-bias": lambda x, w, b: b is None,
    "strided-bias": lambda x, w, b: b is not None and not b.is_contiguous(),
    "mixed-requires-grad": lambda x, w, b: x.requires_grad != w.requires_grad,
}

WC_CASES = {
    "list": lambda i, w: isinstance(i, list) and len(i) > 1,
    "stacked": lambda i, w: isinstance(i, torch.Tensor),
    "k=1": lambda i, w: w.shape[1] == 1,
    "empty-batch": lambda i, w: w.shape[0] == 0,
    "no-branches": lambda i, w: w.shape[1] == 0 and w.shape[0] > 0,
    "zero-size-feature-dim": lambda i, w: 0 in ((i.shape[2:]) if isinstance(i, torch.Tensor) else i[0].shape[1:]),
    "no-feature-dims": lambda i, w: (i.dim() == 2) if isinstance(i, torch.Tensor) else i[0].dim() == 1,
    "several-feature-dims": lambda i, w: (i.dim() if isinstance(i, torch.Tensor) else i[0].dim() + 1) >= 5,
    "noncontiguous-stacked": lambda i, w: isinstance(i, torch.Tensor) and not i.is_contiguous(),
    "noncontiguous-list-item": lambda i, w: isinstance(i, list) and not all(t.is_contiguous() for t in i),
    "transposed-weights": lambda i, w: min(w.shape) > 1 and w.t().is_contiguous(),
    "list-with-mixed-grad": lambda i, w: isinstance(i, list) and len({t.requires_grad for t in i}) == 2,
}


_FIND = settings(database=None, max_examples=3000, phases=[Phase.generate],
                 suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("case", GL_CASES)
def test_grouped_linear_inputs_reach(case):
    find(grouped_linear_inputs(), lambda a: GL_CASES[case](*a), settings=_FIND)


@pytest.mark.parametrize("case", WC_CASES)
def test_weighted_combine_inputs_reach(case):
    find(weighted_combine_inputs(), lambda a: WC_CASES[case](*a), settings=_FIND)


@given(grouped_linear_inputs(dtypes=(torch.bfloat16, torch.float64), max_groups=2, max_features=3,
                             max_leading_dims=1, requires_grad=True, bias=False, layouts=("contiguous",)))
def test_grouped_linear_inputs_respect_constraints(args):
    x, w, b = args
    assert b is None and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float64)
    assert x.is_contiguous() and w.is_contiguous() and x.dim() <= 3
    assert w.shape[0] <= 2 and max(w.shape[1:]) <= 3
    assert x.requires_grad and w.requires_grad and x.is_leaf and w.is_leaf


@given(weighted_combine_inputs(as_list=False, requires_grad=False, max_feature_dims=0, max_branches=2))
def test_weighted_combine_inputs_respect_constraints(args):
    inputs, weights = args
    assert isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[1] <= 2
    assert not inputs.requires_grad and not weights.requires_grad


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dtypes": (torch.int64,)}, "floating-point"),
    ({"dtypes": ()}, "non-empty"),
    ({"max_groups": 0}, "max_groups=0"),
    ({"requires_grad": "yes"}, "requires_grad"),
    ({"layouts": ("diagonal",)}, "layouts"),
    ({"feature_multiple": 8, "max_features": 4}, "max_features=4"),
], ids=["int-dtype", "no-dtype", "no-groups", "grad-flag", "layout", "multiple"])
def test_strategy_arguments_are_checked(kwargs, match):
    from hypothesis.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match=match):
        grouped_linear_inputs(**kwargs)


# ---- the check itself can fail -------------------------------------------------------------------

def _plus(fn, delta):
    return lambda *args: fn(*args) + delta


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient off by 10%: a reference with a wrong backward."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.1


@given(grouped_linear_inputs(dtypes=(torch.float32, torch.float64)))
def test_wrong_grouped_linear_reference_is_caught(args):
    assume(math.prod(_output_shape("grouped_linear", args)) > 0)
    with pytest.raises(AssertionError, match=r"\[bmm\] forward: max abs err"):
        assert_implementations_agree("grouped_linear", *args, impls=["bmm"],
                                     reference=_plus(reference_grouped_linear, 1e-2))


@given(weighted_combine_inputs(dtypes=(torch.float32, torch.float64)))
def test_wrong_weighted_combine_reference_is_caught(args):
    assume(math.prod(_output_shape("weighted_combine", args)) > 0)
    with pytest.raises(AssertionError, match=r"\[loop\] forward: max abs err"):
        assert_implementations_agree("weighted_combine", *args, impls=["loop"],
                                     reference=_plus(reference_weighted_combine, 1e-2))


@given(grouped_linear_inputs(dtypes=(torch.float32,), requires_grad=True))
def test_wrong_reference_gradient_is_caught(args):
    x, w, _ = args
    assume(x.numel() > 0 and w.numel() > 0)  # then the weight's gradient is not empty, nor all zero
    with pytest.raises(AssertionError, match=r"\[einsum\] grad weight: max abs err") as info:
        assert_implementations_agree("grouped_linear", *args, impls=["einsum"],
                                     reference=lambda *a: _ScaleGrad.apply(reference_grouped_linear(*a)))
    assert "[einsum] forward" not in str(info.value)


def _broken(op: str, impl: str, fn, monkeypatch) -> None:
    registry = SPECS[op].registry
    # prepare goes too: it is a specialisation of the function replaced (helpers.replace_impl)
    monkeypatch.setitem(registry._impls, impl, dataclasses.replace(registry[impl], fn=fn, prepare=None))


# the real functions, captured before any test swaps a registry entry for a broken one
_BMM = SPECS["grouped_linear"].registry["bmm"].fn
_GL_LOOP = SPECS["grouped_linear"].registry["loop"].fn
_WC_LOOP = SPECS["weighted_combine"].registry["loop"].fn


@pytest.mark.parametrize(("fn", "match"), [
    (lambda x, w, b: _BMM(x, w, None), r"\[bmm\] forward: max abs err"),
    (lambda x, w, b: _BMM(x, w.detach(), b), r"\[bmm\] grad weight: max abs err"),
    (lambda x, w, b: _BMM(x, w, b) * math.nan, r"\[bmm\] forward: max abs err nan"),
    (lambda x, w, b: _BMM(x, w, b).double(), r"\[bmm\] forward: output dtype torch.float64"),
    (lambda x, w, b: _BMM(x, w, b)[..., :-1], r"\[bmm\] forward: shape \(5, 3, 3\), expected"),
    (lambda x, w, b: x.t(), r"\[bmm\] raised RuntimeError"),
], ids=["drops-bias", "no-weight-grad", "nan", "wrong-dtype", "wrong-shape", "raises"])
def test_broken_grouped_linear_implementation_is_caught(fn, match, monkeypatch):
    _broken("grouped_linear", "bmm", fn, monkeypatch)
    x = torch.randn(5, 3, 2, requires_grad=True)
    w, b = torch.randn(3, 4, 2, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with pytest.raises(AssertionError, match=match) as info:
        assert_implementations_agree("grouped_linear", x, w, b)
    report = str(info.value)
    assert report.startswith("grouped_linear: implementations disagree")
    assert "input: shape (5, 3, 2), stride (6, 2, 1), float32, cpu, requires_grad=True" in report
    assert "[einsum]" not in report and "[loop]" not in report  # only the culprit is named


@pytest.mark.parametrize(("fn", "match"), [
    (lambda i, w: _WC_LOOP(i, w.flip(0)), r"\[loop\] forward"),
    (lambda i, w: _WC_LOOP(i, w.detach()), r"\[loop\] grad weights"),
    (lambda i, w: _WC_LOOP(tuple(t.detach() for t in i), w), r"\[loop\] grad inputs\[0\]"),
], ids=["wrong-pairing", "no-weights-grad", "no-inputs-grad"])
def test_broken_weighted_combine_implementation_is_caught(fn, match, monkeypatch):
    _broken("weighted_combine", "loop", fn, monkeypatch)
    outs = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    with pytest.raises(AssertionError, match=match):
        assert_implementations_agree("weighted_combine", outs, torch.randn(3, 2, requires_grad=True))


def test_in_place_change_of_an_argument_is_caught(monkeypatch):
    def scribbles(x, w, b):
        w.mul_(2)
        return _GL_LOOP(x, w, b)
    _broken("grouped_linear", "loop", scribbles, monkeypatch)
    with pytest.raises(AssertionError, match=r"\[loop\] modified its argument weight in place"):
        assert_implementations_agree("grouped_linear", torch.randn(2, 3), torch.randn(2, 3, 3), None,
                                     impls=["loop"])


def test_bad_calls_to_the_check():
    x, w = torch.randn(2, 3), torch.randn(2, 4, 3)
    with pytest.raises(GroupedOpsError, match=r"^grouped_linear: unknown impl 'fast'"):
        assert_implementations_agree("grouped_linear", x, w, impls=["fast"])
    with pytest.raises(GroupedOpsError, match=r"^grouped_linear: weight has 2 groups but input has 3"):
        assert_implementations_agree("grouped_linear", torch.randn(3, 3), w)
    with pytest.raises(GroupedOpsError, match="unknown op 'conv'"):
        assert_implementations_agree("conv", x, w)


# ---- the docs' examples run ----------------------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", ["grouped_linear.md", "weighted_combine.md", "testing.md"])
def test_doc_examples_run(page, capsys):
    """Every ```python block of the page runs; the test functions a page defines pass."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)
    assert blocks
    namespace: dict = {"__name__": f"docs_{page.removesuffix('.md')}"}
    exec(compile("\n".join(blocks), str(DOCS / page), "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    if page == "testing.md":
        assert len(tests) == 4
    for fn in tests:
        fn()
