"""How the ops behave under torch.compile.

Warm (a choice is cached for the traced shapes): the chosen implementation is traced inline, so
the compiler sees plain torch ops and can fuse around them. The choice is read once, at trace time,
through ``assume_constant_result``; no guard on our tables is installed.

Cold (nothing cached, or the batch dim is dynamic): the call becomes one ``torch.library``
custom op. The graph stays whole; when the compiled code really runs, the custom op dispatches
(and tunes, if allowed) on the concrete shapes, so ``grouped_ops.lookup`` finds the decision after
the first real run. Its backward is written with the same ops, so training works too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import dispatch
from ._errors import GroupedOpsError
from .ops import SPECS
from .registry import forced_impl
from .signature import bucketing_mode


@torch.compiler.assume_constant_result
def _trace_time_choice(op: str, m: Any, impl: str) -> str:
    """The implementation to inline for this traced call, '' for the custom op, or 'error:...'."""
    spec = SPECS[op]
    try:
        sig = spec.signature(m, bucketing_mode() == "pow2")
        name = impl if impl != "auto" else (forced_impl(op) or "")
        if name:
            dispatch.checked_impl(spec, sig, name)
            return name
        env = dispatch._env_impl(spec, sig)
        if env is not None:
            return env.impl
        known = dispatch.known_decision(spec, sig)
        return known.impl if known is not None else ""
    except GroupedOpsError as e:
        return f"error:{e}"


def _is_static(m: Any) -> bool:
    def walk(x: Any) -> bool:
        if isinstance(x, (tuple, list, torch.Size)):
            return all(walk(i) for i in x)
        return not isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))
    return walk(m)


def traced_call(op: str, args: tuple[Any, ...], impl: str) -> Tensor:
    spec = SPECS[op]
    spec.validate(*args)
    m = spec.meta(*args)
    if _is_static(m):
        name = _trace_time_choice(op, m, impl)
        if name.startswith("error:"):
            raise GroupedOpsError(name.removeprefix("error:"))
        if name:
            return spec.registry[name].fn(*args)
    elif impl != "auto":
        return spec.registry[impl].fn(*args)  # dynamic shapes: support checks happen at run time
    if op == "grouped_linear":
        x, w, b = args
        return _grouped_linear_auto(x, w, b, _grad_mask(m[-1]))
    inputs, weights = args
    stacked = isinstance(inputs, Tensor)
    return _weighted_combine_auto([inputs] if stacked else list(inputs), weights, stacked, _grad_mask(m[-1]))


def _grad_mask(grad: Any) -> int:
    return sum(1 << i for i, g in enumerate(grad or ()) if g)


def _flags(mask: int, count: int) -> Any:
    flags = tuple(bool(mask >> i & 1) for i in range(count))
    return flags if any(flags) else False


# ---- grouped_linear ------------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::grouped_linear_auto", mutates_args=())
def _grouped_linear_auto(input: Tensor, weight: Tensor, bias: Tensor | None, grad_mask: int) -> Tensor:
    return _run_tuned("grouped_linear", (input, weight, bias), grad_mask, 3).contiguous()


@_grouped_linear_auto.register_fake
def _(input: Tensor, weight: Tensor, bias: Tensor | None, grad_mask: int) -> Tensor:
    return input.new_empty(*input.shape[:-1], weight.shape[1])


def _gl_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, b, mask = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None
    ctx.mask = mask


def _gl_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx = _grouped_linear_auto(grad, w.transpose(1, 2), None, 0) if need_x else None
    gw = torch.einsum("...no,...ni->noi", grad, x) if need_w else None
    gb = grad.reshape(-1, *grad.shape[-2:]).sum(0) if (need_b and ctx.has_bias) else None
    return gx, gw, gb, None


_grouped_linear_auto.register_autograd(_gl_backward, setup_context=_gl_setup)


# ---- weighted_combine ----------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::weighted_combine_auto", mutates_args=())
def _weighted_combine_auto(inputs: Sequence[Tensor], weights: Tensor, stacked: bool, grad_mask: int) -> Tensor:
    args = (inputs[0] if stacked else tuple(inputs), weights)
    return _run_tuned("weighted_combine", args, grad_mask, 2).contiguous()


@_weighted_combine_auto.register_fake
def _(inputs: Sequence[Tensor], weights: Tensor, stacked: bool, grad_mask: int) -> Tensor:
    shape = inputs[0].shape[:1] + inputs[0].shape[2:] if stacked else inputs[0].shape
    return inputs[0].new_empty(shape)


def _wc_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    xs, weights, stacked, _ = inputs
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
    return gx, gw, None, None


_weighted_combine_auto.register_autograd(_wc_backward, setup_context=_wc_setup)


def _run_tuned(op: str, args: tuple[Any, ...], grad_mask: int, count: int) -> Tensor:
    """Dispatch on concrete tensors with the caller's grad mode restored into the signature."""
    spec = SPECS[op]
    m = spec.meta(*args)
    assert m is not None
    m = (*m[:-1], _flags(grad_mask, count))
    sig = spec.signature(m, bucketing_mode() == "pow2")
    decision, _ = dispatch._decide(spec, sig, args)
    return spec.registry[decision.impl].fn(*args)
