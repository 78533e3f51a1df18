"""grouped_linear's masked_dense: one dense matmul over a block-diagonal ``[n*out, n*in]`` weight
(the "partitioned linear"), as an autograd Function whose gradients go group by group.

A module of its own only to keep :mod:`grouped_ops.ops.grouped_linear` under the size limit; it
belongs to that op (registered there with the others).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._bmm_linear import _split
from ._common import may_write_into, own_tensor

Tensor = torch.Tensor


def _block_diagonal_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    lead, rows, n, out, inn = _split(x, w)
    # The weight is copied onto the diagonal of zeros (not multiplied by a mask), so inf/nan in one
    # group's weight cannot leak into another as 0*inf. The zeros derive from w so that under
    # torch.func.vmap they are batched like w and the in-place copy is allowed.
    block = torch.zeros_like(w)[:, :, None, :].expand(n, out, n, inn).contiguous()
    torch.diagonal(block, dim1=0, dim2=2).copy_(w.permute(1, 2, 0))
    x2, block2 = x.reshape(rows, n * inn), block.reshape(n * out, n * inn)
    if not may_write_into(x, w, *(() if b is None else (b,))):
        y = F.linear(x2, block2, None if b is None else b.reshape(n * out))
        return own_tensor(y, (*lead, n, out))
    result = x.new_empty(*lead, n, out)
    flat = result.view(rows, n * out)
    if b is None:
        torch.mm(x2, block2.t(), out=flat)
    else:
        torch.addmm(b.reshape(n * out), x2, block2.t(), out=flat)
    return result


class _BlockDiagonalLinear(torch.autograd.Function):
    """masked_dense: forward as one dense matmul; gradients group by group.

    The dense backward would multiply the incoming gradient by the zero blocks, so a non-finite
    gradient of one group (an ensemble member that diverged) would reach every group of its sample;
    per-group gradients keep it where the ``nn.Linear`` loop keeps it, and do n times less work.
    (A non-finite *input* still spreads in the forward: see docs/grouped_linear.md.)
    """

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func derives the rule

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return _block_diagonal_linear(x, w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.has_bias = b is not None
        ctx.out_shape = output.shape

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = torch.einsum("...no,noi->...ni", grad, w) if need_x else None
        gw = torch.einsum("...no,...ni->noi", grad, x) if need_w else None
        gb = (grad if grad.dim() == 2 else grad.flatten(0, -3).sum(0)) if need_b and ctx.has_bias else None
        return gx, gw, gb


class _BlockDiagonalLinearWithJvp(_BlockDiagonalLinear):
    """_BlockDiagonalLinear with forward-mode AD (torch.func.jvp); dynamo cannot trace a custom jvp, so
    compiled code uses the plain class."""

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
        x, w = ctx.saved_tensors  # the output is linear in each argument
        terms = [t for t in (None if x_t is None else torch.einsum("...ni,noi->...no", x_t, w),
                             None if w_t is None else torch.einsum("...ni,noi->...no", x, w_t),
                             b_t) if t is not None]
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out.expand(ctx.out_shape)  # a bias tangent alone is [n, out]
