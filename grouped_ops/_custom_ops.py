"""The custom ops ``grouped_ops::grouped_linear_auto`` and ``grouped_ops::weighted_combine_auto``.

Registered when ``grouped_ops`` is imported (a few milliseconds), so ``torch.export.load`` of a
program that calls them works in a fresh process. The trace-time planner that emits them lives in
:mod:`grouped_ops._compile`, imported only while torch.compile traces (it loads ``torch._dynamo``).

When a compiled program runs, the custom op dispatches (and tunes, if allowed) on the concrete
shapes, with the grad mode of the traced call; its backward is written with the same ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from . import dispatch
from .ops import SPECS
from .ops.grouped_linear import SPEC as _GL
from .ops.weighted_combine import SPEC as _WC


def _grad_mask(grad: Any) -> int:
    return sum(1 << i for i, g in enumerate(grad or ()) if g)


def _flags(mask: int, count: int) -> Any:
    flags = tuple(bool(mask >> i & 1) for i in range(count))
    return flags if any(flags) else False


# ---- grouped_linear ------------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::grouped_linear_auto", mutates_args=())
def _grouped_linear_auto(input: Tensor, weight: Tensor, bias: Tensor | None, grad_mask: int, impl: str) -> Tensor:
    return _run_tuned(_GL.name, (input, weight, bias), grad_mask, 3, impl).contiguous()


@_grouped_linear_auto.register_fake
def _(input: Tensor, weight: Tensor, bias: Tensor | None, grad_mask: int, impl: str) -> Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[1])


def _gl_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, b, _, impl = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None
    ctx.impl = impl


def _gl_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = _grouped_linear_auto(grad, w.transpose(1, 2), None, 0, ctx.impl) if need_x else None
    gw = torch.einsum("...no,...ni->noi", grad, x) if need_w else None
    gb = (grad if grad.dim() == 2 else grad.flatten(0, -3).sum(0)) if (need_b and ctx.has_bias) else None
    return gx, gw, gb, None, None


_grouped_linear_auto.register_autograd(_gl_backward, setup_context=_gl_setup)


# ---- weighted_combine ----------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::weighted_combine_auto", mutates_args=())
def _weighted_combine_auto(inputs: Sequence[Tensor], weights: Tensor, stacked: bool, grad_mask: int,
                           impl: str) -> Tensor:
    args = (inputs[0] if stacked else tuple(inputs), weights)
    return _run_tuned(_WC.name, args, grad_mask, 2, impl).contiguous()


@_weighted_combine_auto.register_fake
def _(inputs: Sequence[Tensor], weights: Tensor, stacked: bool, grad_mask: int, impl: str) -> Tensor:
    shape = inputs[0].shape[:1] + inputs[0].shape[2:] if stacked else inputs[0].shape
    return inputs[0].new_empty(shape)


def _wc_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    xs, weights, stacked, _, _ = inputs
    ctx.save_for_backward(weights, *xs)
    ctx.stacked = stacked


def _wc_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    weights, *xs = ctx.saved_tensors
    b, k = weights.shape
    tail = (1,) * (grad.dim() - 1)
    gx: list[Tensor] | None = None
    if ctx.needs_input_grad[0]:
        if ctx.stacked:
            gx = [grad.unsqueeze(1) * weights.reshape(b, k, *tail)]
        else:
            gx = [grad * weights[:, i].reshape(b, *tail) for i in range(k)]
    gw = None
    if ctx.needs_input_grad[1]:
        stacked = xs[0] if ctx.stacked else torch.stack(xs, 1)
        gw = (stacked * grad.unsqueeze(1)).reshape(b, k, math.prod(grad.shape[1:])).sum(-1)
    return gx, gw, None, None, None


_weighted_combine_auto.register_autograd(_wc_backward, setup_context=_wc_setup)


def _run_tuned(op: str, args: tuple[Any, ...], grad_mask: int, count: int, impl: str) -> Tensor:
    """Dispatch on concrete tensors with the traced call's grad mode restored into the signature:
    to ``impl`` when one was forced at trace time, else as ``impl="auto"`` does.

    Decisions are kept in the dispatcher's own tables, so ``dispatch.clear_memory()`` forgets them
    and later calls cost one dict lookup, as in eager mode.
    """
    spec = SPECS[op]
    m = spec.meta(*args)
    assert m is not None
    m = (*m[:-1], _flags(grad_mask, count))
    return dispatch.implementation_for(spec, args, m, impl, around=_autograd_reenabled)(*args)


@contextlib.contextmanager
def _autograd_reenabled() -> Iterator[None]:
    """Undo the custom op's "below autograd" dispatch state while the tuner runs.

    A custom op's body runs with the autograd dispatch keys excluded, so ``torch.enable_grad()``
    alone records no graph there and a forward + backward timing of the candidates would fail.
    """
    guard = getattr(torch._C, "_ForceDispatchKeyGuard", None)
    if guard is None:  # pragma: no cover - torch without the guard: grad timings fall back to the default
        yield
        return
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        excluded = excluded.remove(key)
    with guard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


_AUTOGRAD_KEYS = tuple(
    getattr(torch._C.DispatchKey, name) for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor")
    if hasattr(torch._C.DispatchKey, name)
)


def call_auto(op: str, args: tuple[Any, ...], grad: Any, impl: str) -> Tensor:
    """The traced call of ``op`` as its custom op: ``impl`` forced at trace time, or "" to decide
    when the compiled code runs; ``grad`` is the traced call's grad flags (its description's last)."""
    if op == _GL.name:
        x, w, b = args
        return _grouped_linear_auto(x, w, b, _grad_mask(grad), impl)
    inputs, weights = args
    stacked = isinstance(inputs, Tensor)
    return _weighted_combine_auto([inputs] if stacked else list(inputs), weights, stacked, _grad_mask(grad), impl)
