"""The ragged op's ``grouped_mm`` implementation: torch's grouped GEMM with offsets
(``F.grouped_mm``), with the bias, the rows past the last offset zeroed, empty groups' gradients
zeroed where torch's backward may not, and a function prepared for one call description (see
:mod:`._ragged_impls` for the other implementations and the offsets' checks)."""

from __future__ import annotations

from typing import Any

import torch

from . import _huge_pages
from ._common import apply_function, direct_apply, plain_eager
from ._ragged_impls import (
    _checked,
    _composable_loop,
    _differentiable_grads,
    _empty_groups,
    _group_ids,
    _loop_weight_grads,
    _on,
    _recording,
    _sizes,
    check_values,
    ends,
    loop,
)
from .grouped_linear import (  # torch's grouped_mm rules, written once there
    _fit,
    _grouped_mm_op,
    _mat_ok,
)

Tensor = torch.Tensor


def grouped_mm(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
    # F.grouped_mm leaves the rows past the last offset uninitialised (values like 1.6 and 2e-36
    # were seen), takes no bias, and on some GPUs returns non-zero weight gradients for empty groups
    # (pytorch#152668, #172439): _RaggedGroupedMM zeroes those rows and groups and adds the bias.
    values = ends(x, w, b, offsets, need=False)
    if w.shape[0] == 0 or x.shape[0] == 0 or 0 in w.shape:
        return _empty_groups(x, w, b) if w.shape[0] == 0 or x.shape[0] == 0 else loop(x, w, b, offsets)
    if not plain_eager(x, w, b):  # torch.func, forward AD: torch's grouped_mm has no rules for them
        return _composable_loop(x, w, b, values if values is not None else ends(x, w, b, offsets, need=True))
    offs = _on(offsets, x, torch.int32)
    if not _recording(x, w, b):
        return _gmm_forward(x, w, b, offs, values)
    if not _native_backward_will_do(x, w, values):
        return apply_function(_RaggedGroupedMM, x, w, b, offs, values)
    y = _gmm_forward(x, w, b, offs, values)
    # torch's backward refuses a gradient it cannot take as an operand (.sum()'s stride-0 one); a
    # pre-hook of the node is a C++ call here (Tensor.register_hook's Python costs ~4 us)
    y.grad_fn.register_prehook(_operand_gradients)
    return y


def _operand_gradients(grads: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    # None keeps the gradients as they are (the common case: one torch takes as an operand). A
    # contiguous CPU [T, out] gradient with 16-byte rows is one (_mat_ok's rule): said first, as
    # the full check cost ~6 us a training step (T=16, E=8, 64->64: 134 -> 128 us, F.grouped_mm 98)
    g = grads[0]
    if len(grads) == 1 and g is not None and g.is_cpu and g.is_contiguous() and g.shape[-1] * g.element_size() % 16 == 0:
        return None
    fitted = tuple(g if g is None else _fit(g) for g in grads)
    return None if all(f is g for f, g in zip(fitted, grads, strict=True)) else fitted


def _native_backward_will_do(x: Tensor, w: Tensor, values: list[int] | None) -> bool:
    """Whether torch's own autograd of grouped_mm gives this call's gradients: on the CPU (one GEMM
    per group, so an empty group's weight gradient is exactly zero) with every row in a group (no
    rows past the last offset to zero). Then the forward's ops are recorded as they are, without
    _RaggedGroupedMM's Python (measured: a training step at T=16, E=8, 64->64, 143 -> 126 us; the
    bare F.grouped_mm 96 us). Not for a weight whose gradient is a fresh mapping, which
    _RaggedGroupedMM's backward writes into huge pages (:mod:`._huge_pages`)."""
    return (x.device.type == "cpu" and values is not None and values[-1] == x.shape[0]
            and not _huge_pages.fresh_mapping(w))


def _gmm_forward(x: Tensor, w: Tensor, b: Tensor | None, offs: Tensor, values: list[int] | None) -> Tensor:
    return _gmm_product(_fit(x), _fit(w.transpose(1, 2)), b, offs, values)


def _gmm_product(x: Tensor, wt: Tensor, b: Tensor | None, offs: Tensor, values: list[int] | None,
                 row_index: Tensor | None = None) -> Tensor:
    """``F.grouped_mm(x, wt, offs)`` of operands it takes, with the bias and the rows past the
    last offset zeroed (``row_index``: see :func:`_group_ids`)."""
    y = _GROUPED_MM(x, wt, offs=offs)
    gid = None
    if b is not None:
        gid = _group_ids(offs, x.shape[0], row_index)
        # rows past the last offset (group id E) are zeroed after: any bias row will do for them
        tail = values is None or values[-1] < x.shape[0]
        y.add_(b.index_select(0, gid.clamp(max=b.shape[0] - 1) if tail else gid))
    return _tail_zeroed(y, offs, values, gid)


_GROUPED_MM = _grouped_mm_op()  # F.grouped_mm, or torch._grouped_mm before 2.10, or None (not a candidate)


def _tail_zeroed(y: Tensor, offs: Tensor, values: list[int] | None, gid: Tensor | None) -> Tensor:
    """``y [T, k]`` with the rows past the last offset set to zero (in place; ``y`` is fresh)."""
    if values is not None:
        end = values[-1]
        if end < y.shape[0]:
            y[end:].zero_()
        return y
    gid = _group_ids(offs, y.shape[0]) if gid is None else gid
    return y.masked_fill_((gid == offs.shape[0]).unsqueeze(1), 0)


class _RaggedGroupedMM(torch.autograd.Function):
    """``F.grouped_mm(x, w^T, offs)`` with the bias, zero rows past the last offset, and a backward
    of grouped_mm products whose empty groups are zeroed (one masked fill at most)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, offs: Tensor,
                values: list[int] | None) -> Tensor:
        ctx.save_for_backward(x, w, offs)
        ctx.values, ctx.has_bias = values, b is not None
        return _gmm_forward(x, w, b, offs, values)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, offs = ctx.saved_tensors
        values = ctx.values
        if torch.is_grad_enabled():  # create_graph: the loop's differentiable gradients (a second backward)
            need_x, need_w, need_b = ctx.needs_input_grad[:3]
            grads = _differentiable_grads(gy, x, w, values if values is not None else offs.tolist(), need_x, need_w,
                                          need_b and ctx.has_bias)
            return (*grads, None, None)
        mm = _GROUPED_MM
        gy = _fit(gy)  # .sum()'s stride-0 gradient is not an operand grouped_mm takes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = _tail_zeroed(mm(gy, _fit(w), offs=offs), offs, values, None) if need_x else None
        gw = gb = None
        if need_w and values is not None and _huge_pages.fresh_mapping(w):
            # torch's CPU grouped_mm is these GEMMs (one per group), here written into huge pages
            gw = _loop_weight_grads(gy, x, w, values, True, False)[0]
        elif need_w:
            if w.stride(1) == 1 and w.stride(2) != 1 and _mat_ok(x.t()):
                # stored [E, in, out]: its gradient in that layout (x.t() is an operand torch takes
                # as it is, which a copy would not make of a one-row x)
                gw = mm(x.t(), gy, offs=offs).transpose(1, 2)
            else:
                gw = mm(_fit(gy.t()), _fit(x), offs=offs)
            if values is None:
                sizes = torch.diff(offs, prepend=offs.new_zeros(1))
                gw.masked_fill_((sizes == 0).view(-1, 1, 1), 0)
            else:  # gw is written already: its empty groups' slices only (a memset each)
                for g in (g for g, n in enumerate(_sizes(values)) if n == 0):
                    gw[g].zero_()
        if need_b and ctx.has_bias:
            sizes = torch.diff(offs, prepend=offs.new_zeros(1))
            rest = (gy.shape[0] - offs[-1:]).to(sizes.dtype)  # the rows past the last offset: a segment too
            gb = torch.segment_reduce(gy, "sum", lengths=torch.cat([sizes, rest]), unsafe=True)[:-1]
        return gx, gw, gb, None, None


# ---- prepared for one call description (see the note in _ragged_impls) ----------------------------

#: Up to this T a prepared grouped_mm keeps ``arange(T)`` for its bias (T=16, E=8, 64->64: 39 -> 37 us a call).
ROW_INDEX_LIMIT = 1 << 16


def prepare_grouped_mm(m: tuple[Any, ...], implementation: Any) -> Any:
    """:func:`grouped_mm` for a CPU call with host offsets described by ``m``, whose operands
    torch takes as they are and whose product is the fresh contiguous result (torch pads rows to 16
    bytes); None elsewhere."""
    (x_shape, x_stride, dtype, device), (w_shape, w_stride, _, _), b_meta, (_, o_dtype, o_device), _, _, grad = m
    if device.type != "cpu" or o_device.type != "cpu" or 0 in x_shape or 0 in w_shape or _GROUPED_MM is None or \
            w_shape[1] * dtype.itemsize % 16:
        return None
    if not (_mat_ok(torch.empty_strided(x_shape, x_stride, dtype=dtype, device="meta")) and
            _mat_ok(torch.empty_strided(w_shape, w_stride, dtype=dtype, device="meta").transpose(1, 2))):
        return None
    rows, recording, cast = x_shape[0], bool(grad) and any(grad), o_dtype != torch.int32
    inference = torch.is_inference_mode_enabled
    function = direct_apply(_RaggedGroupedMM)
    # the bias's row index, kept with the memo entry (read only; not kept for huge T)
    row_index = torch.arange(rows, dtype=torch.int32) if b_meta is not None and rows <= ROW_INDEX_LIMIT else None

    def bare(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
        values = offsets.tolist()
        check_values(x, w, b, offsets, values)
        offs = offsets.to(torch.int32) if cast else offsets
        recorded = recording and not inference()  # (inference mode with grad enabled records nothing)
        if recorded and not _native_backward_will_do(x, w, values):
            return function(x, w, b, offs, values)
        y = _gmm_product(x, w.transpose(1, 2), b, offs, values, row_index)
        if recorded:
            y.grad_fn.register_prehook(_operand_gradients)
        return y

    return _checked(bare, implementation)
