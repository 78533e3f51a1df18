"""bmm's eager training path for nn.Linear's weight layout, as one autograd Function (see
:class:`_BmmLinear`), and the write of a batched product into a fresh ``[..., n, out]`` that both
bmm paths share."""

from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


def _bmm_into_new(xt: Tensor, wt: Tensor, b: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """``xt [n, rows, in] @ wt [n, in, out]`` (+ ``b [n, out]``) as a fresh contiguous ``shape``
    (``[..., n, out]``), outside autograd: the bias add (or a copy) is the reordering pass, which
    saves baddbmm's bias fill (2-3 us on launch-bound shapes)."""
    y = torch.bmm(xt, wt).transpose(0, 1)  # [rows, n, out], a view
    result = xt.new_empty(shape)
    into = result if len(shape) == 3 else result.view(y.shape)  # a view costs ~1 us: only where needed
    if b is None:
        into.copy_(y)
    else:
        torch.add(y, b, out=into)
    return result


class _BmmLinear(torch.autograd.Function):
    """bmm's eager training path for nn.Linear's weight layout, as one autograd node: ``input [...,
    n, in]``, ``weight [n, out, in]`` (rows of ``in`` contiguous), ``bias [n, out]`` or None -> a
    fresh contiguous ``[..., n, out]``.

    Autograd's own graph (transpose, baddbmm, transpose, clone) computes the weight's gradient as
    ``x^T @ grad``, ``[n, in, out]``, which AccumulateGrad then copies element by element into the
    weight's ``[n, out, in]`` layout. This computes ``grad^T @ x``, already in that layout
    (measured 294 -> 172 us a training step at batch 1, 32 groups of 64->64, one thread: the TabM
    layer's time). The forward writes the result with the bias in one pass (``out=``).
    Its backward is made of differentiable ops on the saved inputs, so second derivatives work.
    :func:`~.grouped_linear.bmm` uses it only in plain eager autograd (:func:`~._common.plain_eager`:
    it has no forward-AD, vmap or tracing rules), and where the copy it saves outweighs its Python:
    weights of 32K elements or more, batches of at most 256 rows (measured; see there)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        # ctx in forward, no setup_context: with one, Function.apply binds the arguments through
        # inspect.signature, ~20 us a call (measured 224 -> 179 us a training step at batch 1,
        # 32 groups of 64->64); setup_context is only needed for torch.func, which never gets here.
        lead, rows, n, out, inn = _split(x, w)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _bmm_into_new(x.reshape(rows, n, inn).transpose(0, 1), w.transpose(1, 2), b, (*lead, n, out))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        lead, rows, n, out, inn = _split(x, w)
        flat = len(lead) == 1  # [rows, n, *] already: skip the reshapes (~1 us each)
        g = grad if flat else grad.reshape(rows, n, out)
        gt = g.transpose(0, 1)  # [n, rows, out]
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x:
            gx = torch.bmm(gt, w).transpose(0, 1)
            gx = gx if flat else gx.reshape(x.shape)
        if need_w:
            xt = (x if flat else x.reshape(rows, n, inn)).transpose(0, 1)  # [n, rows, in]
            gw = torch.bmm(gt.transpose(1, 2), xt)  # [n, out, in], the weight's layout
        if ctx.has_bias and need_b:
            gb = g.sum(0)
        return gx, gw, gb


def _split(x: Tensor, w: Tensor) -> tuple[tuple[int, ...], int, int, int, int]:
    lead = tuple(x.shape[:-2])
    n, out, inn = w.shape
    return lead, math.prod(lead), n, out, inn
