"""Property-testing helpers for grouped_ops: hypothesis strategies and an agreement check.

Import it explicitly (``from grouped_ops.testing import ...``); it needs only torch and hypothesis.

- :func:`grouped_linear_inputs` and :func:`weighted_combine_inputs` draw argument tuples for the ops,
  including the awkward cases: one group, one feature, empty batches, unbatched inputs, permuted,
  sliced and broadcast (stride-0) views, weights stored transposed as TabM and rtdl do, no bias,
  lists and stacked tensors.
- :func:`assert_implementations_agree` runs every supported implementation on those arguments and
  checks the output and every gradient against a float64 reference.

Example:
    >>> from hypothesis import given
    >>> from grouped_ops.testing import assert_implementations_agree, grouped_linear_inputs
    >>> @given(grouped_linear_inputs(requires_grad=True))
    ... def test_my_layer(args):
    ...     assert_implementations_agree("grouped_linear", *args)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from ._errors import GroupedOpsError
from .functional import grouped_linear, implementations, weighted_combine
from .ops import SPECS

__all__ = [
    "LAYOUTS",
    "assert_implementations_agree",
    "grouped_linear_inputs",
    "reference_grouped_linear",
    "reference_weighted_combine",
    "tolerance",
    "weighted_combine_inputs",
]

#: Layout names the strategies accept. ``transposed``: a permuted view (for grouped_linear's weight
#: exactly ``W.transpose(1, 2)`` of a ``[n, in, out]`` tensor, as TabM/rtdl store it); ``strided``:
#: a sliced view of a larger tensor (steps, offsets), a broadcast (stride-0) view, or a view with
#: contiguous strides that starts one element into a buffer (a misaligned data pointer).
LAYOUTS = ("contiguous", "transposed", "strided")

_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "grouped_linear": grouped_linear,
    "weighted_combine": weighted_combine,
}

# Normwise relative tolerance (relative to the norm of |a|·|b|, see ``tolerance``) and the absolute
# floor per element. float64 is tight; low precision is loose because its unit roundoff is large.
_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# ---- strategies ----------------------------------------------------------------------------------

def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{name}={value!r} must be an int >= {low}")
    return value


def _check_common(dtypes: Any, device: Any, requires_grad: Any, layouts: Any) -> tuple[
        tuple[torch.dtype, ...], torch.device, tuple[str, ...]]:
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    try:
        dtypes = tuple(dtypes)
    except TypeError:
        raise InvalidArgument(f"dtypes={dtypes!r} must be a sequence of torch dtypes, "
                              "e.g. (torch.float32, torch.bfloat16)") from None
    if not dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise InvalidArgument(f"dtypes={dtypes!r} must be a non-empty sequence of floating-point "
                              "torch dtypes, e.g. (torch.float32, torch.bfloat16)")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError):
        raise InvalidArgument(f"device={device!r} is not a torch device; use e.g. 'cpu' or 'cuda'") from None
    if requires_grad is not None and not isinstance(requires_grad, bool):
        raise InvalidArgument(f"requires_grad={requires_grad!r} must be None (draw it), True or False")
    if isinstance(layouts, str):
        layouts = (layouts,)
    layouts = tuple(layouts)
    unknown = [name for name in layouts if name not in LAYOUTS]
    if not layouts or unknown:
        raise InvalidArgument(f"layouts={layouts!r} must be a non-empty subset of {LAYOUTS}")
    return dtypes, dev, layouts


def _randn(gen: torch.Generator, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
           scale: float = 1.0) -> torch.Tensor:
    # Drawn on the CPU in float64 from the drawn seed, then cast and moved: the same seed gives the
    # same values on every device, and the global RNG is never touched.
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return (t * scale).to(device=device, dtype=dtype)


def _view(draw: Any, gen: torch.Generator, shape: tuple[int, ...], layout: str, dtype: torch.dtype,
          device: torch.device, scale: float = 1.0, perm: tuple[int, ...] | None = None) -> torch.Tensor:
    """A tensor of logical ``shape`` whose memory layout is ``layout``; a fresh leaf."""
    dims = len(shape)
    if layout == "transposed" and dims >= 2:
        if perm is None:
            perm = tuple(draw(st.permutations(range(dims)).filter(lambda p: list(p) != sorted(p))))
        # store the permuted shape contiguously, view it back: t.permute(inverse) has ``shape``
        stored = _randn(gen, [shape[p] for p in perm], dtype, device, scale)
        inverse = [perm.index(i) for i in range(dims)]
        t = stored.permute(*inverse)
    elif layout == "strided" and dims >= 1:
        kind = draw(st.integers(0, 3))
        if kind == 3 and any(s > 1 for s in shape):
            # a broadcast view: one dim of stride 0 (the same values repeated)
            dim = draw(st.sampled_from([i for i, s in enumerate(shape) if s > 1]))
            small = list(shape)
            small[dim] = 1
            t = _randn(gen, small, dtype, device, scale).expand(*shape)
        elif kind == 2:
            # contiguous strides one element into a flat buffer (as in a flattened parameter
            # buffer): the data pointer is not 16-byte aligned
            flat = _randn(gen, [math.prod(shape) + 1], dtype, device, scale)
            t = flat[1:].view(shape)
        else:
            steps = [draw(st.integers(1, 2)) for _ in shape]
            offsets = [draw(st.integers(0, 1)) for _ in shape]
            if all(s == 1 for s in steps) and all(o == 0 for o in offsets):
                steps[-1] = 2  # make sure the view really is a slice
            big = [o + max(s * step, 1) for s, step, o in zip(shape, steps, offsets, strict=True)]
            base = _randn(gen, big, dtype, device, scale)
            t = base[tuple(slice(o, o + s * step, step)
                           for s, step, o in zip(shape, steps, offsets, strict=True))]
    else:
        t = _randn(gen, shape, dtype, device, scale)
    assert tuple(t.shape) == tuple(shape)
    return t.detach()


def _grad_flag(draw: Any, requires_grad: bool | None) -> bool:
    return draw(st.booleans()) if requires_grad is None else requires_grad


def _maybe_empty(draw: Any, sizes: list[int], one_in: int) -> list[int]:
    # Zero one of ``sizes`` about one draw in ``one_in``; shrinks towards non-empty.
    if sizes and draw(st.integers(1, one_in)) == one_in:
        sizes[draw(st.integers(0, len(sizes) - 1))] = 0
    return sizes


def grouped_linear_inputs(
    *,
    dtypes: Iterable[torch.dtype] | torch.dtype = (torch.float32,),
    device: str | torch.device = "cpu",
    max_groups: int = 6,
    max_features: int = 12,
    feature_multiple: int = 1,
    max_leading_dims: int = 3,
    max_leading_size: int = 4,
    requires_grad: bool | None = None,
    bias: bool | None = None,
    layouts: Iterable[str] = LAYOUTS,
    allow_empty: bool = True,
) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Draws ``(input, weight, bias)`` for :func:`grouped_ops.grouped_linear`.

    ``input [*lead, n, in]`` with 0 to ``max_leading_dims`` leading dims (none: an unbatched
    ``[n, in]``; sometimes one of them is 0: an empty batch), ``weight [n, out, in]``,
    ``bias [n, out]`` or None. Each tensor's layout is drawn from ``layouts``: for the weight,
    ``transposed`` is ``W.transpose(1, 2)`` of a ``[n, in, out]`` tensor. Values are standard normal
    (weights scaled by 1/sqrt(in)), drawn from a seeded generator; the global RNG is untouched.

    Example:
        >>> from hypothesis import given
        >>> @given(grouped_linear_inputs(dtypes=(torch.float32, torch.bfloat16), requires_grad=True))
        ... def test_agree(args):
        ...     assert_implementations_agree("grouped_linear", *args)

    Args:
        dtypes: the dtypes to draw from (all three tensors share one).
        device: where the tensors live.
        max_groups: n is drawn from 1..max_groups (see ``allow_empty``).
        max_features: in and out are drawn from 1..max_features ...
        feature_multiple: ... as multiples of this (e.g. 8 for grouped_mm's 16-byte alignment in bf16).
        max_leading_dims: at most this many leading dims, each of size 1..max_leading_size (or 0).
        max_leading_size: see above.
        requires_grad: None draws it per tensor; True/False sets it for all.
        bias: None draws whether there is one; True/False forces it.
        layouts: a subset of :data:`LAYOUTS`.
        allow_empty: sometimes (about one draw in eight) make a leading dim 0, and more rarely
            n, in or out; False never draws a zero-size dim.

    Returns:
        A strategy of ``(input, weight, bias)`` tuples; the tensors are leaves.
    """
    dtypes, dev, layouts = _check_common(dtypes, device, requires_grad, layouts)
    _check_int("max_groups", max_groups, 1)
    _check_int("feature_multiple", feature_multiple, 1)
    _check_int("max_features", max_features, feature_multiple)
    _check_int("max_leading_dims", max_leading_dims, 0)
    _check_int("max_leading_size", max_leading_size, 1)
    if not isinstance(allow_empty, bool):
        raise InvalidArgument(f"allow_empty={allow_empty!r} must be True or False")
    if bias is not None and not isinstance(bias, bool):
        raise InvalidArgument(f"bias={bias!r} must be None (draw it), True or False")

    @st.composite
    def draw_args(draw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dtype = draw(st.sampled_from(dtypes))
        n = draw(st.integers(1, max_groups))
        feature = st.integers(1, max_features // feature_multiple).map(lambda v: v * feature_multiple)
        inn, out = draw(feature), draw(feature)
        lead = draw(st.lists(st.integers(1, max_leading_size), max_size=max_leading_dims))
        if allow_empty:
            lead = _maybe_empty(draw, lead, 8)  # an empty batch
            n, inn, out = _maybe_empty(draw, [n, inn, out], 16)  # no groups, or no features
        has_bias = draw(st.booleans()) if bias is None else bias
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

        x = _view(draw, gen, (*lead, n, inn), draw(st.sampled_from(layouts)), dtype, dev)
        scale = 1.0 / math.sqrt(max(inn, 1))
        w = _view(draw, gen, (n, out, inn), draw(st.sampled_from(layouts)), dtype, dev, scale,
                  perm=(0, 2, 1))  # "transposed": W.transpose(1, 2) of a [n, in, out] tensor
        b = _view(draw, gen, (n, out), draw(st.sampled_from(layouts)), dtype, dev) if has_bias else None
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(_grad_flag(draw, requires_grad))
        return x, w, b

    return draw_args()


def weighted_combine_inputs(
    *,
    dtypes: Iterable[torch.dtype] | torch.dtype = (torch.float32,),
    device: str | torch.device = "cpu",
    max_batch: int = 4,
    max_branches: int = 5,
    max_feature_dims: int = 3,
    max_feature_size: int = 4,
    as_list: bool | None = None,
    requires_grad: bool | None = None,
    layouts: Iterable[str] = LAYOUTS,
    allow_empty: bool = True,
) -> st.SearchStrategy[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
    """Draws ``(inputs, weights)`` for :func:`grouped_ops.weighted_combine`.

    ``inputs`` is a stacked ``[b, k, *f]`` tensor or a list of k tensors ``[b, *f]`` (each with its
    own layout and grad flag), ``weights [b, k]``. ``*f`` has 0 to ``max_feature_dims`` dims; b is
    sometimes 0 (an empty batch). Values are standard normal from a seeded generator.

    Example:
        >>> from hypothesis import given
        >>> @given(weighted_combine_inputs(as_list=True))
        ... def test_agree(args):
        ...     assert_implementations_agree("weighted_combine", *args)

    Args:
        dtypes: the dtypes to draw from (all tensors share one).
        device: where the tensors live.
        max_batch: b is drawn from 1..max_batch (see ``allow_empty``).
        max_branches: k is drawn from 1..max_branches.
        max_feature_dims: ``*f`` has 0..max_feature_dims dims ...
        max_feature_size: ... each of size 1..max_feature_size.
        as_list: None draws list or stacked; True: always a list; False: always stacked.
        requires_grad: None draws it per tensor; True/False sets it for all.
        layouts: a subset of :data:`LAYOUTS`.
        allow_empty: sometimes (about one draw in eight) make b 0, and more rarely k (stacked
            inputs only) or a feature dim; False never draws a zero-size dim.

    Returns:
        A strategy of ``(inputs, weights)`` tuples; the tensors are leaves.
    """
    dtypes, dev, layouts = _check_common(dtypes, device, requires_grad, layouts)
    _check_int("max_batch", max_batch, 1)
    _check_int("max_branches", max_branches, 1)
    _check_int("max_feature_dims", max_feature_dims, 0)
    _check_int("max_feature_size", max_feature_size, 1)
    if not isinstance(allow_empty, bool):
        raise InvalidArgument(f"allow_empty={allow_empty!r} must be True or False")
    if as_list is not None and not isinstance(as_list, bool):
        raise InvalidArgument(f"as_list={as_list!r} must be None (draw it), True or False")

    @st.composite
    def draw_args(draw: Any) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        dtype = draw(st.sampled_from(dtypes))
        b = draw(st.integers(1, max_batch))
        k = draw(st.integers(1, max_branches))
        f = draw(st.lists(st.integers(1, max_feature_size), max_size=max_feature_dims))
        listed = draw(st.booleans()) if as_list is None else as_list
        if allow_empty:
            (b,) = _maybe_empty(draw, [b], 8)  # an empty batch
            if listed:  # a list cannot be empty: a zero-size feature dim
                f = _maybe_empty(draw, f, 16)
            else:  # no branches, or a zero-size feature dim
                k, *f = _maybe_empty(draw, [k, *f], 16)
        f = tuple(f)
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

        inputs: torch.Tensor | list[torch.Tensor]
        if listed:
            inputs = [_view(draw, gen, (b, *f), draw(st.sampled_from(layouts)), dtype, dev)
                      for _ in range(k)]
            for t in inputs:
                t.requires_grad_(_grad_flag(draw, requires_grad))
        else:
            inputs = _view(draw, gen, (b, k, *f), draw(st.sampled_from(layouts)), dtype, dev)
            inputs.requires_grad_(_grad_flag(draw, requires_grad))
        weights = _view(draw, gen, (b, k), draw(st.sampled_from(layouts)), dtype, dev)
        weights.requires_grad_(_grad_flag(draw, requires_grad))
        return inputs, weights

    return draw_args()


# ---- references ----------------------------------------------------------------------------------

def reference_grouped_linear(input: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: one ``F.linear`` per group, stacked. Computes in the arguments' dtype."""
    n = weight.shape[0]
    if n == 0:  # nothing to stack; einsum keeps the (empty) result in the graph
        y = torch.einsum("...ni,noi->...no", input, weight)
        return y if bias is None else y + bias
    return torch.stack([F.linear(input[..., i, :], weight[i], None if bias is None else bias[i])
                        for i in range(n)], dim=-2)


def reference_weighted_combine(inputs: torch.Tensor | Sequence[torch.Tensor],
                               weights: torch.Tensor) -> torch.Tensor:
    """The definition: multiply by the weights and sum over k. Computes in the arguments' dtype."""
    stacked = inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs), dim=1)
    b, k = weights.shape
    return (stacked * weights.reshape(b, k, *(1,) * (stacked.dim() - 2))).sum(1)


_REFERENCES: dict[str, Callable[..., torch.Tensor]] = {
    "grouped_linear": reference_grouped_linear,
    "weighted_combine": reference_weighted_combine,
}


def tolerance(dtype: torch.dtype, length: int = 1) -> tuple[float, float]:
    """``(rtol, atol)`` for a result of ``dtype`` that sums ``length`` products.

    A result passes when ``‖got − ref‖ ≤ rtol·‖mag‖ + atol·√numel`` and no element is off by more
    than ``4·rtol·mag + atol``, where ``mag`` is the reference computed on absolute values
    (``|W|·|x| + |b|``): the scale of the rounding errors, which cancellation in ``ref`` cannot shrink.
    ``rtol`` grows like √length beyond 16 terms (rounding errors add up like a random walk).
    """
    rtol = _RTOL.get(dtype, 2e-2) * max(1.0, math.sqrt(length / 16))
    return rtol, _ATOL.get(dtype, 1e-3)


# ---- the agreement check -------------------------------------------------------------------------

def _normalize(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in SPECS:
        raise GroupedOpsError(f"assert_implementations_agree: unknown op {name!r}; valid ops are {sorted(SPECS)}")
    kwargs = dict(kwargs)
    if name == "grouped_linear":
        if len(args) < 2:
            raise TypeError("assert_implementations_agree('grouped_linear', input, weight, bias=None)")
        bias = args[2] if len(args) > 2 else kwargs.pop("bias", None)
        args = (args[0], args[1], bias)
    else:
        if len(args) == 1 and "weights" in kwargs:
            args = (args[0], kwargs.pop("weights"))
        if len(args) != 2:
            raise TypeError("assert_implementations_agree('weighted_combine', inputs, weights)")
    if kwargs:
        raise TypeError(f"assert_implementations_agree: unexpected arguments {sorted(kwargs)} for {name}")
    return name, args


def _named_tensors(op: str, args: tuple[Any, ...]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor argument with a readable name, in the op's argument order."""
    if op == "grouped_linear":
        return [(n, t) for n, t in zip(("input", "weight", "bias"), args, strict=True) if t is not None]
    inputs, weights = args
    if isinstance(inputs, torch.Tensor):
        named = [("inputs", inputs)]
    else:
        named = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
    return [*named, ("weights", weights)]


def _reduction_lengths(op: str, args: tuple[Any, ...]) -> dict[str, int]:
    """How many products each result sums: it scales the tolerance."""
    if op == "grouped_linear":
        x, w, b = args
        n, out, inn = w.shape
        rows = math.prod(x.shape[:-2])
        return {"forward": inn + (b is not None), "input": out, "weight": rows, "bias": rows}
    inputs, weights = args
    k = weights.shape[1]
    f = inputs.shape[2:] if isinstance(inputs, torch.Tensor) else inputs[0].shape[1:]
    lengths = {"forward": k, "weights": math.prod(f)}
    return lengths | {name: 1 for name, _ in _named_tensors(op, args) if name.startswith("inputs")}


def _describe(name: str, t: Any) -> str:
    if t is None:
        return f"{name}: None"
    if not isinstance(t, torch.Tensor):
        return f"{name}: {type(t).__name__}"
    return (f"{name}: shape {tuple(t.shape)}, stride {t.stride()}, "
            f"{str(t.dtype).removeprefix('torch.')}, {t.device}, requires_grad={t.requires_grad}")


def _upcast(op: str, args: tuple[Any, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, ...]:
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return fn(t.detach().to(torch.float64)).requires_grad_(t.requires_grad)
    if op == "grouped_linear":
        return tuple(one(t) for t in args)
    inputs, weights = args
    if isinstance(inputs, torch.Tensor):
        return one(inputs), one(weights)
    return type(inputs)(one(t) for t in inputs), one(weights)


def _cast(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g.to(dtype)`` that keeps stride-0 (broadcast) dims, like the gradient ``out.sum()`` sends."""
    if g.dtype == dtype:
        return g
    small = g
    for d, (size, step) in enumerate(zip(g.shape, g.stride(), strict=True)):
        if step == 0 and size > 1:
            small = small.narrow(d, 0, 1)
    return small.to(dtype).expand(g.shape)


def _run(fn: Callable[..., torch.Tensor], args: tuple[Any, ...], targets: list[torch.Tensor],
         grad_output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    with torch.enable_grad() if targets else torch.no_grad():
        out = fn(*args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"returned {type(out).__name__}, not a tensor")
        grads: list[torch.Tensor | None] = []
        if targets and out.shape == grad_output.shape:
            if not out.requires_grad:
                raise RuntimeError("the output does not require grad, so no gradient flows to the arguments")
            grads = list(torch.autograd.grad(out, targets, _cast(grad_output, out.dtype),
                                              allow_unused=True))
    return out.detach(), grads


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _effective_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision float32 matmuls really run at: TF32 (about float16's mantissa) or bfloat16
    when ``torch.set_float32_matmul_precision`` or ``allow_tf32`` allow it."""
    if dtype != torch.float32:
        return dtype
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return torch.bfloat16
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return torch.float16 if precision == "high" or tf32 else dtype


def _compare(what: str, got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor,
             dtype: torch.dtype, length: int) -> str | None:
    """None when ``got`` matches ``ref`` (float64) within the tolerance of ``dtype``; else why not."""
    if tuple(got.shape) != tuple(ref.shape):
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return None
    g = got.detach().to(device=ref.device, dtype=torch.float64)
    finite = ref.isfinite()
    if not bool(finite.all()):  # non-finite reference entries must be reproduced exactly
        off = ~finite & ~((g == ref) | (g.isnan() & ref.isnan()))
        if bool(off.any()):
            idx = tuple(int(i) for i in off.nonzero()[0])
            return f"{what}: {float(g[idx])} at index {idx} where the reference has {float(ref[idx])}"
        g, ref, mag = g[finite], ref[finite], mag[finite]
    diff = (g - ref).abs()
    rtol, atol = tolerance(dtype, length)
    max_err = float(diff.max()) if diff.numel() else 0.0
    scale = float(mag.norm())
    err = float(diff.norm())
    allowed = rtol * scale + atol * math.sqrt(diff.numel())
    elementwise_ok = bool((diff <= 4 * rtol * mag.abs() + atol).all())
    if err <= allowed and elementwise_ok:  # both false for nan
        return None
    where = ""
    if diff.numel() and got.shape == ref.shape:
        flat = int(torch.nan_to_num(diff, nan=math.inf).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(ref.shape)))
        where = f" at index {idx} (got {float(g[idx]):.6g}, expected {float(ref[idx]):.6g})"
    rel = err / scale if scale > 0 else math.inf
    return (f"{what}: max abs err {max_err:.3g}{where}; normwise rel err {rel:.3g} "
            f"(relative to ‖|a|·|b|‖ = {scale:.3g}), tolerance rtol={rtol:.3g} atol={atol:.3g} "
            f"({str(dtype).removeprefix('torch.')}, sum of {length} terms)"
            + ("" if elementwise_ok or not (err <= allowed) else "; normwise fine but elementwise off"))


def assert_implementations_agree(
    op: str | Callable[..., Any],
    *args: Any,
    reference: Callable[..., torch.Tensor] | None = None,
    impls: Iterable[str] | None = None,
    grad_output: torch.Tensor | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[str, ...]:
    """Check every implementation of ``op`` against a float64 reference, forward and backward.

    Each implementation that supports the arguments (see ``grouped_ops.implementations(op)``) runs
    through the public op with ``impl=name``. Its output and the gradient of every argument that
    requires grad (from ``torch.autograd.grad`` with a random ``grad_output``) are compared with the
    reference evaluated in float64 on upcast copies of the arguments; see :func:`tolerance`. It
    also checks that no implementation changed its arguments.

    Example:
        >>> x, w, b = torch.randn(8, 4, 16), torch.randn(4, 32, 16), torch.randn(4, 32)
        >>> assert_implementations_agree("grouped_linear", x, w.requires_grad_(), b)
        ('bmm', 'einsum', 'grouped_mm', 'loop', 'masked_dense')

    Args:
        op: ``"grouped_linear"`` or ``"weighted_combine"`` (or the function itself).
        *args: the op's arguments (``bias=``/``weights=`` may be given by keyword).
        reference: a function taking the same arguments (float64 copies) that computes the right
            answer differentiably; default :func:`reference_grouped_linear` /
            :func:`reference_weighted_combine`.
        impls: the implementation names to check (``"auto"`` allowed); default all of them.
            Those that do not support the arguments are skipped.
        grad_output: the gradient of the output to back-propagate; default seeded random normal.
        seed: seeds the default ``grad_output``.

    Returns:
        The implementation names that were checked.

    Raises:
        AssertionError: listing each implementation that differs, in the output or which gradient,
            with its errors, the tolerance and the arguments' shapes, strides and dtypes.
        GroupedOpsError: the arguments themselves are invalid for ``op``.
    """
    name, args = _normalize(op, args, kwargs)
    spec = SPECS[name]
    if isinstance(args[0], list):
        args = (tuple(args[0]), *args[1:]) if name == "weighted_combine" else args
    spec.validate(*args)
    names = list(implementations(name)) if impls is None else list(impls)
    for impl in names:
        if impl != "auto":
            spec.registry[impl]  # raises a GroupedOpsError listing the valid names

    named = _named_tensors(name, args)
    dtype = named[0][1].dtype
    device = named[0][1].device
    targets = [(n, t) for n, t in named if t.requires_grad]
    lengths = _reduction_lengths(name, args)

    # the reference and the rounding-error scale |a|·|b|, in float64 without autocast
    ref_fn = reference or _REFERENCES[name]
    has_autocast = torch.amp.is_autocast_available(device.type)
    with torch.autocast(device.type, enabled=False) if has_autocast else contextlib.nullcontext():
        args64 = _upcast(name, args, lambda t: t)
        abs64 = _upcast(name, args, torch.abs)
        out_shape = _REFERENCES[name](*abs64).shape
        if grad_output is None:
            gen = torch.Generator().manual_seed(seed)
            # rounded to the arguments' dtype, so the reference sees exactly what the impls see
            g64 = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
        else:
            g64 = _cast(grad_output.detach(), torch.float64)
        g64 = g64.to(device)
        if tuple(g64.shape) != tuple(out_shape):
            raise TypeError(f"grad_output has shape {tuple(g64.shape)}; expected {tuple(out_shape)}")
        t64 = [t for n, t in _named_tensors(name, args64) if t.requires_grad]
        try:
            ref_out, ref_grads = _run(ref_fn, args64, t64, g64)
        except Exception as e:
            raise TypeError(f"assert_implementations_agree: the reference failed on float64 copies of the "
                            f"arguments ({type(e).__name__}: {e}); it must be differentiable when an "
                            f"argument requires grad") from e
        if ref_out.dtype != torch.float64:
            ref_out = ref_out.double()
        if tuple(ref_out.shape) != tuple(out_shape):
            raise TypeError(f"reference returned shape {tuple(ref_out.shape)}; expected {tuple(out_shape)}")
        t_abs = [t for n, t in _named_tensors(name, abs64) if t.requires_grad]
        mag_out, mag_grads = _run(_REFERENCES[name], abs64, t_abs, g64.abs())

    snapshot = [(n, t.detach().clone()) for n, t in named]
    meta = spec.meta(*args)
    sig = spec.signature(meta, False)
    autocast = has_autocast and torch.is_autocast_enabled(device.type)
    checked: list[str] = []
    failures: list[str] = []
    skipped: list[str] = []
    for impl in names:
        if impl != "auto":
            reasons = spec.registry[impl].not_supported_reasons(sig)
            if reasons:
                skipped.append(f"{impl} ({'; '.join(reasons)})")
                continue
        checked.append(impl)
        try:
            out, grads = _run(lambda *a, impl=impl: _OPS[name](*a, impl=impl), args,
                              [t for _, t in targets], g64)
        except Exception as e:  # an implementation that raises is a disagreement, reported as such
            failures.append(f"[{impl}] raised {type(e).__name__}: {e}")
            continue
        problems = []
        if out.device != device:
            problems.append(f"forward: output on {out.device}, expected {device}")
        if not autocast and out.dtype != dtype:
            problems.append(f"forward: output dtype {out.dtype}, expected {dtype}")
        low = _effective_dtype(out.dtype if out.dtype.itemsize < dtype.itemsize else dtype, device)
        problems.append(_compare("forward", out, ref_out, mag_out, low, lengths["forward"]))
        if out.shape == ref_out.shape:
            for (tname, t), g, rg, mg in zip(targets, grads, ref_grads, mag_grads, strict=True):
                g = torch.zeros_like(t) if g is None else g
                rg = torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
                mg = torch.zeros_like(rg) if mg is None else mg
                if g.dtype != t.dtype:
                    problems.append(f"grad {tname}: dtype {g.dtype}, expected {t.dtype}")
                key = "inputs" if tname.startswith("inputs[") else tname
                problems.append(_compare(f"grad {tname}", g, rg.double(), mg, low,
                                         lengths.get(tname, lengths.get(key, 1))))
        for (aname, before), (_, now) in zip(snapshot, named, strict=True):
            if not _same_values(before, now.detach()):
                problems.append(f"modified its argument {aname} in place")
        failures += [f"[{impl}] {p}" for p in problems if p]

    if failures:
        lines = [f"{name}: implementations disagree with the float64 reference "
                 f"({'given reference' if reference else 'default reference'}):"]
        lines += [f"  {f}" for f in failures]
        lines.append("arguments:")
        lines += [f"  {_describe(n, t)}" for n, t in _named_tensors(name, args)]
        if name == "grouped_linear" and args[2] is None:
            lines.append("  bias: None")
        lines.append(f"signature: {sig}")
        culprits = {f.split("]", 1)[0] for f in failures}
        if len(checked) > 1 and len(culprits) == len(checked):
            lines.append(f"all {len(checked)} implementations disagree: if they agree with each other, "
                         "suspect the reference")
        if skipped:
            lines.append("not run (unsupported): " + ", ".join(skipped))
        raise AssertionError("\n".join(lines))
    return tuple(checked)
