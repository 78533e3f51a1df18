"""How the ops behave under torch.compile.

Warm (a choice is cached for the traced shapes): the chosen implementation is traced inline, so
the compiler sees plain torch ops and can fuse around them. The choice is read once, at trace time,
through ``assume_constant_result``; no guard on our tables is installed.

Cold (nothing cached, or the batch dim is dynamic): the call becomes one ``torch.library``
custom op. The graph stays whole; when the compiled code really runs, the custom op dispatches
(and tunes, if allowed) on the concrete shapes, with the grad mode of the traced call, so
``grouped_ops.lookup`` finds the decision after the first real run. Its backward is written with
the same ops, so training works too. An implementation whose meta kernels reject the signature
(so compile cannot trace it, although eager mode runs it) also goes through the custom op, which
runs it eagerly.

What forces an implementation (``impl=``, a ``use_impl`` scope, ``GROUPED_OPS_IMPL``) is read
while dynamo traces, like the cached choice: the compiled code keeps it until dynamo recompiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental import symbolic_shapes

from . import dispatch
from ._errors import GroupedOpsError
from .ops import SPECS
from .registry import forced_impl
from .signature import Signature, bucketing_mode

# torch.fx.experimental.symbolic_shapes.has_static_value, which dynamo understands (torch >= 2.5)
_has_static_value = getattr(symbolic_shapes, "has_static_value", None)


@torch.compiler.assume_constant_result
def _trace_time_plan(op: str, m: Any, impl: str, dynamic: bool) -> str:
    """How to emit this traced call: ``inline:<impl>``; ``op:<impl>``, the custom op running that
    implementation; ``op:``, the custom op doing the tuned dispatch at run time; or ``error:<msg>``.

    With ``dynamic``, ``m`` holds placeholder sizes: only a forced implementation is planned then
    (and its support is checked when it runs), since the tuned choice depends on the batch size.
    """
    spec = SPECS[op]
    try:
        sig = spec.signature(m, bucketing_mode() == "pow2")
        name = impl if impl != "auto" else (forced_impl(op) or "")
        if name:
            if not dynamic:
                dispatch.checked_impl(spec, sig, name)
            return f"inline:{name}" if _traceable(op, sig, name) else f"op:{name}"
        if dynamic:
            return "op:"
        env = dispatch._env_impl(spec, sig)
        known = env if env is not None else dispatch.known_decision(spec, sig)
        if known is None:
            return "op:"
        # An implementation torch.compile cannot trace still runs, eagerly, inside the custom op.
        return f"inline:{known.impl}" if _traceable(op, sig, known.impl) else "op:"
    except GroupedOpsError as e:
        return f"error:{e}"


@functools.lru_cache(maxsize=256)
def _traceable(op: str, sig: Signature, name: str) -> bool:
    """Whether torch.compile can trace implementation ``name`` for ``sig``.

    Compilation runs the meta kernels, which do not always accept what the eager kernels do (in
    torch 2.13 the meta kernel of grouped_mm takes bfloat16 only, while the CPU kernel runs float32),
    so run the implementation, forward and backward as ``sig`` needs, on meta tensors.
    """
    spec = SPECS[op]
    meta_sig = dataclasses.replace(sig, device=torch.device("meta"))
    try:
        with torch.autocast("cpu", enabled=False), torch.enable_grad():
            args = spec.make_inputs(meta_sig, torch.Generator().manual_seed(0))
            out = spec.registry[name].fn(*args)
            targets = spec.grad_args(meta_sig, args)
            if targets:
                torch.autograd.grad(out, targets, torch.ones_like(out))
    except Exception:
        return False
    return True


_PLACEHOLDER = 64  # stands for a dynamic size when planning; only traceability is judged with it


def _concrete(m: Any, placeholder: int | None = None) -> Any:
    """``m`` with every size, stride and flag a plain int or bool; a dynamic one (a SymInt or
    SymBool) makes it None, or is replaced by ``placeholder`` (flags by True) when one is given.

    Inside dynamo a SymInt passes ``isinstance(x, int)`` (a SymBool ``isinstance(x, bool)``), so
    ask ``has_static_value``, which dynamo answers from the shape environment.
    """
    if isinstance(m, (tuple, list, torch.Size)):
        items = []
        for x in m:
            y = _concrete(x, placeholder)
            if y is None and x is not None:
                return None
            items.append(y)
        return tuple(items)
    flag = isinstance(m, (bool, torch.SymBool))
    if not (flag or isinstance(m, (int, torch.SymInt))):
        return m
    if _has_static_value is not None:
        static = _has_static_value(m)
    else:  # pragma: no cover - older torch
        static = not isinstance(m, (torch.SymInt, torch.SymBool))
    if static:  # guard_scalar: dynamo folds it to a constant (int()/bool() would stay symbolic)
        return symbolic_shapes.guard_scalar(m)
    if placeholder is None:
        return None
    return True if flag else placeholder


def traced_call(op: str, args: tuple[Any, ...], impl: str) -> Tensor:
    """What ``grouped_linear``/``weighted_combine`` do while dynamo traces them."""
    spec = SPECS[op]
    spec.validate(*args)
    m = spec.meta(*args)
    static = _concrete(m)
    dynamic = static is None
    plan = _trace_time_plan(op, _concrete(m, _PLACEHOLDER) if dynamic else static, impl, dynamic)
    kind, _, name = plan.partition(":")
    if kind == "error":
        raise GroupedOpsError(name)
    if kind == "inline":
        return spec.registry[name].fn(*args)
    if op == "grouped_linear":
        x, w, b = args
        return _grouped_linear_auto(x, w, b, _grad_mask(m[-1]), name)
    inputs, weights = args
    stacked = isinstance(inputs, Tensor)
    return _weighted_combine_auto([inputs] if stacked else list(inputs), weights, stacked, _grad_mask(m[-1]), name)


def _grad_mask(grad: Any) -> int:
    return sum(1 << i for i, g in enumerate(grad or ()) if g)


def _flags(mask: int, count: int) -> Any:
    flags = tuple(bool(mask >> i & 1) for i in range(count))
    return flags if any(flags) else False


# ---- grouped_linear ------------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::grouped_linear_auto", mutates_args=())
def _grouped_linear_auto(input: Tensor, weight: Tensor, bias: Tensor | None, grad_mask: int, impl: str) -> Tensor:
    return _run_tuned("grouped_linear", (input, weight, bias), grad_mask, 3, impl).contiguous()


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
    gb = grad.reshape(-1, *grad.shape[-2:]).sum(0) if (need_b and ctx.has_bias) else None
    return gx, gw, gb, None, None


_grouped_linear_auto.register_autograd(_gl_backward, setup_context=_gl_setup)


# ---- weighted_combine ----------------------------------------------------------------------------

@torch.library.custom_op("grouped_ops::weighted_combine_auto", mutates_args=())
def _weighted_combine_auto(inputs: Sequence[Tensor], weights: Tensor, stacked: bool, grad_mask: int,
                           impl: str) -> Tensor:
    args = (inputs[0] if stacked else tuple(inputs), weights)
    return _run_tuned("weighted_combine", args, grad_mask, 2, impl).contiguous()


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
    if impl:
        forced = dispatch._FORCED[op]
        fn = forced.get((m, impl))
        if fn is None:
            fn = forced[(m, impl)] = dispatch.checked_impl(spec, spec.signature(m, bucketing_mode() == "pow2"), impl)
        return fn(*args)
    table = dispatch._AUTO[op]
    fn = table.get(m)
    if fn is None:
        sig = spec.signature(m, bucketing_mode() == "pow2")
        with _autograd_reenabled():
            decision, keep = dispatch._decide(spec, sig, args, at=spec.signature(m, False))
        fn = spec.registry[decision.impl].fn
        if keep:
            table[m] = fn
    return fn(*args)


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
