"""bmm's training path for nn.Linear's weight layout, as one autograd Function (see
:class:`_BmmLinear` and :func:`takes_bmm_linear`; :class:`_BmmLinear3d` on the prepared road), the
gemms writing the group-major result ``[..., n, out]`` (:func:`written`; grouped_mm's product
re-labelled as it: :func:`own_group_major`), and bmm prepared for one call description
(:func:`prepare_bmm`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..registry import group_major, group_major_strides
from . import _huge_pages
from ._common import apply_function as _apply
from ._common import bias_operand, direct_apply, plain_tensors, traced_plainly

Tensor = torch.Tensor

LAYOUT_COPY_ROWS = 256  # rows up to which training takes _BmmLinear


def takes_bmm_linear(x: Tensor, w: Tensor, b: Tensor | None, rows: int, plain: bool) -> bool:
    """Whether bmm's training call (autograd records it) goes through :class:`_BmmLinear`;
    ``plain`` is :func:`~._common.plain_eager` of the arguments.

    Only for nn.Linear's layout (rows of ``in`` contiguous), whose weight gradient autograd's own
    bmm backward gives as ``[n, in, out]``, to be copied element by element. Measured (CPU, one
    thread, training step time against autograd's graph, 2026-12-07): at any weight size it is as
    fast or faster, 0.90-1.01x the time below 32K weight elements (6 x 4 256->24: 127 vs 138 us;
    it used to cost 1.05-1.26x there, before its Python was trimmed) and 0.55-0.96x above; from
    512 rows on the copy is a few % of the step and the other orientation of the weight-gradient
    gemm costs as much (0.94-1.07x; 1.05x in the peers table's 512x4 64->256 cell). Under
    torch.compile it is traced into the graph (no Python per call) at any weight size: there the copy is a kernel of the
    compiled backward: a compiled two-layer model at 16x64 256->256 trained at 0.74x the TabM
    model's speed without this Function, 0.98-1.11x with it (docs/benchmarks/peers.md).
    """
    if not plain:  # (plain_eager is false while compiling: dynamo cannot trace the inference-mode query)
        return layout_copy_saved(w.requires_grad, w.stride(2), rows) and traced_plainly(x, w, b)
    # inference mode with grad enabled: autograd records nothing, and neither may this Function
    return layout_copy_saved(w.requires_grad, w.stride(2), rows) and not torch.is_inference_mode_enabled()


def layout_copy_saved(w_requires_grad: bool, w_in_stride: int, rows: int) -> bool:
    """The rule of :func:`takes_bmm_linear` and :func:`prepare_bmm` (and of bmm's declared workspace)."""
    return w_requires_grad and w_in_stride == 1 and rows <= LAYOUT_COPY_ROWS


def prepare_bmm(m: tuple[Any, ...], implementation: Callable[..., Tensor]) -> Callable[..., Tensor] | None:
    """grouped_linear's bmm for the calls described by ``m`` (its ``meta``: input and weight shape,
    strides, dtype and device, the bias's, the grad flags), for the dispatcher's memo (see
    ``Implementation.prepare``): what :func:`~.grouped_linear.bmm` does for such a call in plain
    eager mode, with the sizes and branches worked out once. Where the tensors are not plain
    (a subclass, autocast on), it hands over to ``implementation``. Saves ~4 us a call (measured:
    34.7 -> 30.5 us a GroupedLinear forward at batch 1, 32 groups of 64->64, CPU, one thread).
    Its ``bare`` attribute, where it has one, skips those per-call checks: for callers that made
    them already (the dispatcher's lean road, ``dispatch.lean_key``)."""
    (x_shape, _, _, _), (w_shape, w_stride, _, _), _, grad = m
    lead = tuple(x_shape[:-2])
    n, out, inn = w_shape
    rows = math.prod(lead)
    flat, shape, strides = len(lead) == 1, (*lead, n, out), group_major_strides((*lead, n, out))
    if grad and any(grad):  # autograd records these calls
        if layout_copy_saved(grad[1], w_stride[2], rows):
            function = _BmmLinear3d if flat else _BmmLinear
            direct, inference = direct_apply(function), torch.is_inference_mode_enabled

            def trained(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                # inference mode with grad enabled: not recorded (see takes_bmm_linear)
                return implementation(x, w, b) if inference() else direct(x, w, b)

            def train(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                if inference() or not plain_tensors(x, w, b):
                    return implementation(x, w, b)
                return _apply(function, x, w, b)
            train.bare = trained  # type: ignore[attr-defined]
            return train

        def recorded(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            # autograd's own graph: the product [n, rows, out] is the result's group-major memory,
            # re-labelled as a tensor of its own (no copy), as bmm and the contract do
            xt = (x if flat else x.reshape(rows, n, inn)).transpose(0, 1)
            y = (torch.bmm(xt, w.transpose(1, 2)) if b is None else
                 torch.baddbmm(bias_operand(b, rows, 1), xt, w.transpose(1, 2)))
            return torch.ops.aten._unsafe_view(y.transpose(0, 1) if flat else y.view(n, *lead, out).movedim(0, -2),
                                               shape)

        def record(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return recorded(x, w, b) if plain_tensors(x, w, b) else implementation(x, w, b)
        record.bare = recorded  # type: ignore[attr-defined]
        return record

    def written_here(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        xt = (x if flat else x.reshape(rows, n, inn)).transpose(0, 1)  # [n, rows, in]
        result = x.new_empty_strided(shape, strides)
        into = result.transpose(0, 1) if flat else result.movedim(-2, 0).view(n, rows, out)
        if b is None:
            torch.bmm(xt, w.transpose(1, 2), out=into)
        else:
            torch.baddbmm(b.unsqueeze(1), xt, w.transpose(1, 2), out=into)
        return result

    def infer(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return written_here(x, w, b) if plain_tensors(x, w, b) else implementation(x, w, b)
    infer.bare = written_here  # type: ignore[attr-defined]
    return infer


def written(xt: Tensor, wt: Tensor, b: Tensor | None, lead: tuple[int, ...]) -> Tensor:
    """``xt [n, rows, in] @ wt [n, in, out]`` (+ ``b [n, out]``) written by one batched gemm into a
    fresh ``[*lead, n, out]`` laid out group-major (the output contract), outside autograd (the
    caller checks that ``out=`` is allowed). Its ``[n, rows, out]`` view is contiguous, so the gemm
    writes it with no reordering pass and no temporary; baddbmm fills the bias in first (beta 1)."""
    n, rows, out = xt.shape[0], xt.shape[1], wt.shape[2]
    shape = (*lead, n, out)
    result = xt.new_empty_strided(shape, group_major_strides(shape))
    into = result.transpose(0, 1) if len(lead) == 1 else result.movedim(-2, 0).view(n, rows, out)
    if b is None:
        torch.bmm(xt, wt, out=into)
    else:
        torch.baddbmm(b.unsqueeze(1), xt, wt, out=into)
    return result


def own_group_major(y: Tensor, b: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """A fresh grouped product ``y [n, rows, out]`` (+ ``b [n, out]``, added in place: ``y`` is
    the caller's own, outside autograd) as the group-major result ``shape`` (``[..., n, out]``), a
    tensor of its own: no copy (grouped_mm's product, which takes no bias)."""
    if b is not None:
        y.add_(b.unsqueeze(1))
    return group_major(y.view(shape[-2], *shape[:-2], shape[-1]).movedim(0, -2))


class _BmmLinear(torch.autograd.Function):
    """bmm's training path for nn.Linear's weight layout, as one autograd node: ``input [...,
    n, in]``, ``weight [n, out, in]`` (rows of ``in`` contiguous), ``bias [n, out]`` or None -> a
    fresh ``[..., n, out]``, group-major (the output contract).

    Autograd's own graph (transpose, baddbmm, transpose, clone) computes the weight's gradient as
    ``x^T @ grad``, ``[n, in, out]``, which AccumulateGrad then copies element by element into the
    weight's ``[n, out, in]`` layout. This computes ``grad^T @ x``, already in that layout
    (measured 294 -> 172 us a training step at batch 1, 32 groups of 64->64, one thread: the TabM
    layer's time). The forward's gemm writes the result with the bias (``out=``).
    Its backward is made of differentiable ops on the saved inputs, so second derivatives work.
    :func:`~.grouped_linear.bmm` uses it in plain eager autograd (:func:`~._common.plain_eager`: it
    has no forward-AD, vmap or jit-tracing rules) and under torch.compile, which traces it into the
    graph (:func:`~._common.traced_plainly`); both for batches of at most 256 rows (measured; see
    :func:`takes_bmm_linear`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        # ctx in forward, no setup_context: with one, Function.apply binds the arguments through
        # inspect.signature, ~20 us a call (measured 224 -> 179 us a training step at batch 1,
        # 32 groups of 64->64); setup_context is only needed for torch.func, which never gets here.
        lead, rows, n, out, inn = _split(x, w)
        ctx.save_for_backward(x, w)
        xt, wt = (x if len(lead) == 1 else x.reshape(rows, n, inn)).transpose(0, 1), w.transpose(1, 2)
        if torch.compiler.is_compiling():  # no out= in a graph: inductor fuses the add
            y = torch.bmm(xt, wt) if b is None else torch.bmm(xt, wt) + b.unsqueeze(1)
            return group_major(y.view(n, *lead, out).movedim(0, -2))
        return written(xt, wt, b, lead)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        if x.dim() == 3:  # [rows, n, *] already: no reshapes (~1 us each)
            return _grads(grad, x, w, ctx.needs_input_grad)
        _, rows, n, out, inn = _split(x, w)
        gx, gw, gb = _grads(grad.reshape(rows, n, out), x.reshape(rows, n, inn), w, ctx.needs_input_grad)
        return None if gx is None else gx.reshape(x.shape), gw, gb


class _BmmLinear3d(torch.autograd.Function):
    """:class:`_BmmLinear` for a 3-D input ``[rows, n, in]`` in plain eager mode only (the
    prepared road: :func:`prepare_bmm`), with no Python the call does not need. Its Python is
    most of a small training step: measured (CPU, one thread, interleaved minima, 2026-12-07) a
    step at batch 1, 13 groups of 56->16 took 93.8 us through :class:`_BmmLinear` and 79.3 us
    through this, the TabM layer 92.0 us."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        rows, n, _ = x.shape
        out = w.shape[1]
        result = x.new_empty_strided((rows, n, out), (out, max(rows, 1) * out, 1))  # group-major
        if b is None:
            torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out=result.transpose(0, 1))
        else:
            torch.baddbmm(b.unsqueeze(1), x.transpose(0, 1), w.transpose(1, 2), out=result.transpose(0, 1))
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        return _grads(grad, x, w, ctx.needs_input_grad)


def _grads(grad: Tensor, x: Tensor, w: Tensor, needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of both Functions for ``grad [rows, n, out]`` and ``x [rows, n, in]``, made of
    differentiable ops (a second derivative works); the weight's as ``grad^T @ x``, ``[n, out, in]``,
    its own layout, in huge pages where it is a fresh mapping (:mod:`._huge_pages`; ``out=`` only
    where no second derivative is recorded). ``needs``: ``ctx.needs_input_grad`` (the bias's is
    False where there is none)."""
    need_x, need_w, need_b = needs
    gt = grad.transpose(0, 1)  # [n, rows, out]
    gw = None
    if need_w:
        if _huge_pages.fresh_mapping(w) and not torch.is_grad_enabled():
            gw = torch.bmm(gt.transpose(1, 2), x.transpose(0, 1), out=_huge_pages.empty(w.shape, w))
        else:
            gw = torch.bmm(gt.transpose(1, 2), x.transpose(0, 1))
    return (torch.bmm(gt, w).transpose(0, 1) if need_x else None, gw, grad.sum(0) if need_b else None)


def _split(x: Tensor, w: Tensor) -> tuple[tuple[int, ...], int, int, int, int]:
    lead = tuple(x.shape[:-2])
    n, out, inn = w.shape
    return lead, math.prod(lead), n, out, inn
