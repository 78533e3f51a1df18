"""bmm's eager training path as one autograd Function (see :class:`_BmmLinear`), and the write of a
batched product into a fresh ``[..., n, out]`` that both bmm paths share."""

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
    if b is None:
        result.view(y.shape).copy_(y)
    else:
        torch.add(y, b, out=result.view(y.shape))
    return result


class _BmmLinear(torch.autograd.Function):
    """bmm's eager training path as one autograd node: ``input [..., n, in]``, ``weight [n, out,
    in]``, ``bias [n, out]`` or None -> a fresh contiguous ``[..., n, out]``.

    Two things autograd's own graph (transpose, baddbmm, transpose, clone) does not do:
    - the weight's gradient is computed in the weight's own layout (``grad^T @ x`` for nn.Linear's
      contiguous ``[n, out, in]``, ``(x^T @ grad)^T`` for ``[n, in, out]`` storage), so
      AccumulateGrad keeps it; bmm's backward gives ``[n, in, out]``, which autograd then copies
      element by element into nn.Linear's layout (measured 259 -> 172 us a training step at batch
      1, 32 groups of 64->64, one thread: the TabM layer's time);
    - the forward writes the result with the bias in one pass (``out=``), and the graph has one node
      instead of five.
    Its backward is made of differentiable ops on the saved inputs, so second derivatives work.
    Used only in plain eager autograd (:func:`~._common.plain_eager`): it has no forward-AD, vmap or
    tracing rules, and torch.func and torch.compile take the plain ops instead."""

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
        g = grad.reshape(rows, n, out)
        gt = g.transpose(0, 1)  # [n, rows, out]
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if need_x:
            gx = torch.bmm(gt, w).transpose(0, 1).reshape(x.shape)
        if need_w:
            xt = x.reshape(rows, n, inn).transpose(0, 1)  # [n, rows, in]
            if w.dim() == 3 and w.stride(1) == 1 and w.stride(2) != 1:  # stored [n, in, out]
                gw = torch.bmm(xt.transpose(1, 2), gt).transpose(1, 2)
            else:
                gw = torch.bmm(gt.transpose(1, 2), xt)
        if ctx.has_bias and need_b:
            gb = g.sum(0)
        return gx, gw, gb


def _split(x: Tensor, w: Tensor) -> tuple[tuple[int, ...], int, int, int, int]:
    lead = tuple(x.shape[:-2])
    n, out, inn = w.shape
    return lead, math.prod(lead), n, out, inn
