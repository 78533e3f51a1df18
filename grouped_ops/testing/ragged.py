"""Hypothesis strategies for ragged groups (``grouped_linear(..., offsets=)``): compositions of T
rows into E groups, and whole argument tuples of the op ``grouped_linear_ragged``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .strategies import LAYOUTS, _check_common, _check_int, _grad_flag, _view

#: The shapes of a composition :func:`compositions` draws from: any split, every row in one group,
#: every group empty, the rows spread evenly.
KINDS = ("any", "one_group", "all_empty", "balanced")
OFFSET_DTYPES = (torch.int32, torch.int64)


def _split(draw: Any, kind: str, used: int, groups: int) -> list[int]:
    if groups == 0:
        return []
    if kind == "all_empty" or used == 0:
        return [0] * groups
    if kind == "one_group":
        sizes = [0] * groups
        sizes[draw(st.integers(0, groups - 1))] = used
        return sizes
    if kind == "balanced":
        return [used // groups + (g < used % groups) for g in range(groups)]
    cuts = sorted(draw(st.lists(st.integers(0, used), min_size=groups - 1, max_size=groups - 1)))
    return [b - a for a, b in zip([0, *cuts], [*cuts, used], strict=True)]


def compositions(
    *,
    rows: int | st.SearchStrategy[int] | None = None,
    groups: int | st.SearchStrategy[int] | None = None,
    dtypes: Iterable[torch.dtype] = OFFSET_DTYPES,
    kinds: Iterable[str] = KINDS,
    tail: bool = True,
) -> st.SearchStrategy[tuple[int, torch.Tensor]]:
    """Draws ``(T, offsets)``: ``offsets [E]``, the cumulative ends of a split of T rows into E groups
    (empty groups included), as ``grouped_linear(..., offsets=)`` and ``F.grouped_mm`` take them.

    Covers T = 0, E = 0 and 1, every row in one group, every group empty, balanced splits, and (with
    ``tail``) rows past the last offset, which belong to no group.

    Example:
        >>> @given(compositions(rows=st.just(64), groups=st.just(8)))
        ... def test_sizes(drawn):
        ...     rows, offsets = drawn
        ...     assert int(offsets[-1]) <= rows

    Args:
        rows: T, or a strategy for it (default 0..24).
        groups: E, or a strategy for it (default 0..6).
        dtypes: the offsets' dtypes to draw from (int32, int64).
        kinds: a subset of :data:`KINDS`.
        tail: whether to leave rows past the last offset sometimes (about one draw in four).

    Returns:
        A strategy of ``(T, offsets)``, offsets a CPU tensor.
    """
    dtypes = tuple(dtypes)
    kinds = tuple(kinds)
    if not dtypes or any(d not in OFFSET_DTYPES for d in dtypes):
        raise InvalidArgument(f"dtypes={dtypes!r} must be a non-empty subset of {OFFSET_DTYPES}")
    if not kinds or any(k not in KINDS for k in kinds):
        raise InvalidArgument(f"kinds={kinds!r} must be a non-empty subset of {KINDS}")
    rows_st = st.integers(0, 24) if rows is None else st.just(_check_int("rows", rows, 0)) \
        if isinstance(rows, int) else rows
    groups_st = st.integers(0, 6) if groups is None else st.just(_check_int("groups", groups, 0)) \
        if isinstance(groups, int) else groups

    @st.composite
    def draw_offsets(draw: Any) -> tuple[int, torch.Tensor]:
        total, count = draw(rows_st), draw(groups_st)
        used = draw(st.integers(0, total)) if tail and total and draw(st.integers(1, 4)) == 4 else total
        sizes = _split(draw, draw(st.sampled_from(kinds)), used, count)
        dtype = draw(st.sampled_from(dtypes))
        return total, torch.tensor(sizes, dtype=dtype).cumsum(0, dtype=dtype)

    return draw_offsets()


def grouped_linear_ragged_inputs(
    *,
    dtypes: Iterable[torch.dtype] | torch.dtype = (torch.float32,),
    device: str | torch.device = "cpu",
    max_rows: int = 24,
    max_groups: int = 6,
    max_features: int = 12,
    feature_multiple: int = 1,
    requires_grad: bool | None = None,
    bias: bool | None = None,
    layouts: Iterable[str] = LAYOUTS,
    offset_dtypes: Iterable[torch.dtype] = OFFSET_DTYPES,
) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Draws ``(input [T, in], weight [E, out, in], bias [E, out] | None, offsets [E])`` for
    ``grouped_linear(input, weight, bias, offsets=offsets)`` (the op ``grouped_linear_ragged``).

    The offsets come from :func:`compositions` (empty groups, one group holding every row, rows past
    the last offset, T = 0, E = 0 and 1); the tensors' layouts from ``layouts`` (for the weight,
    ``transposed`` is ``W.transpose(1, 2)`` of an ``[E, in, out]`` tensor, as PyG and GPT-OSS keep it).
    The offsets are on the CPU (host offsets, which every device takes).

    Args:
        dtypes, device, requires_grad, bias, layouts: as for ``grouped_linear_inputs``.
        max_rows: T is drawn from 0..max_rows.
        max_groups: E is drawn from 0..max_groups.
        max_features, feature_multiple: in and out are drawn from 1..max_features, as multiples.
        offset_dtypes: int32 and/or int64.

    Returns:
        A strategy of argument tuples; the floating-point tensors are leaves.
    """
    dtypes, dev, layouts = _check_common(dtypes, device, requires_grad, layouts)
    _check_int("max_rows", max_rows, 0)
    _check_int("max_groups", max_groups, 0)
    _check_int("feature_multiple", feature_multiple, 1)
    _check_int("max_features", max_features, feature_multiple)
    if bias is not None and not isinstance(bias, bool):
        raise InvalidArgument(f"bias={bias!r} must be None (draw it), True or False")
    offsets_st = compositions(rows=st.integers(0, max_rows), groups=st.integers(0, max_groups),
                              dtypes=offset_dtypes)

    @st.composite
    def draw_args(draw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        dtype = draw(st.sampled_from(dtypes))
        rows, offsets = draw(offsets_st)
        groups = offsets.shape[0]
        feature = st.integers(1, max_features // feature_multiple).map(lambda v: v * feature_multiple)
        inn, out = draw(feature), draw(feature)
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        x = _view(draw, gen, (rows, inn), draw(st.sampled_from(layouts)), dtype, dev)
        w = _view(draw, gen, (groups, out, inn), draw(st.sampled_from(layouts)), dtype, dev,
                  1.0 / math.sqrt(inn), perm=(0, 2, 1))
        has_bias = draw(st.booleans()) if bias is None else bias
        b = _view(draw, gen, (groups, out), draw(st.sampled_from(layouts)), dtype, dev) if has_bias else None
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(_grad_flag(draw, requires_grad))
        return x, w, b, offsets

    return draw_args()
