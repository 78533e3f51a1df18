"""Hypothesis strategies drawing the ops' arguments, awkward layouts included: one written out per
built-in op, and :func:`op_inputs` for any registered op, from the dims its arguments name."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from ..ops import SPECS

#: Layout names the strategies accept. ``transposed``: a permuted view (for grouped_linear's weight
#: exactly ``W.transpose(1, 2)`` of a ``[n, in, out]`` tensor, as TabM/rtdl store it); ``strided``:
#: a sliced view of a larger tensor (steps, offsets), a broadcast (stride-0) view, or a view with
#: contiguous strides that starts one element into a buffer (a misaligned data pointer).
LAYOUTS = ("contiguous", "transposed", "strided")


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


def op_inputs(
    op: str | Any,
    *,
    dtypes: Iterable[torch.dtype] | torch.dtype = (torch.float32,),
    device: str | torch.device = "cpu",
    max_size: int = 6,
    max_extra_dims: int = 3,
    requires_grad: bool | None = None,
    layouts: Iterable[str] = LAYOUTS,
    allow_empty: bool = True,
) -> st.SearchStrategy[tuple[Any, ...]]:
    """Draws argument tuples for any registered op, from the dims its arguments name
    (``OpSpec.arguments``: e.g. ``input ("*", "n", "in")``, ``weight ("n", "out", "in")``).

    Each named dim is one size from 1..``max_size``, shared by every argument that names it; ``"*"``
    is 0..``max_extra_dims`` dims of 1..``max_size``, the same for every argument. An optional
    argument is drawn present or None; a tensor-or-sequence argument is drawn as one tensor. Layouts,
    values and grad flags are drawn as by :func:`grouped_linear_inputs`.

    Example:
        >>> @given(op_inputs("grouped_linear", requires_grad=True))
        ... def test_agree(args):
        ...     assert_implementations_agree("grouped_linear", *args)

    Raises:
        InvalidArgument: an unknown op, one whose arguments name no dims, or a bad option.
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in SPECS:
        raise InvalidArgument(f"op_inputs: unknown op {name!r}; valid ops are {sorted(SPECS)}")
    arguments = SPECS[name].arguments
    if not all(a.dims for a in arguments):
        raise InvalidArgument(f"op_inputs: {name}'s arguments do not name their dims (OpSpec.arguments)")
    dtypes, dev, layouts = _check_common(dtypes, device, requires_grad, layouts)
    _check_int("max_size", max_size, 1)
    _check_int("max_extra_dims", max_extra_dims, 0)
    if not isinstance(allow_empty, bool):
        raise InvalidArgument(f"allow_empty={allow_empty!r} must be True or False")
    dim_names = list(dict.fromkeys(d for a in arguments for d in a.dims if d != "*"))

    @st.composite
    def draw_args(draw: Any) -> tuple[Any, ...]:
        dtype = draw(st.sampled_from(dtypes))
        sizes = [draw(st.integers(1, max_size)) for _ in dim_names]
        extra = draw(st.lists(st.integers(1, max_size), max_size=max_extra_dims))
        if allow_empty:
            extra = _maybe_empty(draw, extra, 8)
            sizes = _maybe_empty(draw, sizes, 16)
        size = dict(zip(dim_names, sizes, strict=True))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        out: list[Any] = []
        for a in arguments:
            if a.optional and not draw(st.booleans()):
                out.append(None)
                continue
            shape = tuple(s for d in a.dims for s in (extra if d == "*" else [size[d]]))
            scale = 1.0 / math.sqrt(max(size[a.scale], 1)) if a.scale else 1.0
            perm = a.perm if "*" not in a.dims else None
            out.append(_view(draw, gen, shape, draw(st.sampled_from(layouts)), dtype, dev, scale, perm))
        for t in out:
            if t is not None:
                t.requires_grad_(_grad_flag(draw, requires_grad))
        return tuple(out)

    return draw_args()
