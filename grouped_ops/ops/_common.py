"""Helpers shared by the op modules: error text and argument descriptions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad

from .._errors import GroupedOpsError
from ..registry import FLOATING


def shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(shape_of(t) for t in x) + "]"
    return type(x).__name__


def fail(op: str, message: str, **args: Any) -> GroupedOpsError:
    shapes = ", ".join(f"{name}.shape={shape_of(value)}" for name, value in args.items() if value is not None)
    return GroupedOpsError(f"{op}: {message}" + (f" ({shapes})" if shapes else ""))


def tensor_meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.shape, t.stride(), t.dtype, t.device)


def check_dtypes_devices(op: str, named: dict[str, torch.Tensor], shapes: dict[str, Any]) -> None:
    dtypes = {name: t.dtype for name, t in named.items()}
    for name, dtype in dtypes.items():  # first: an integer argument is not fixed by casting the others
        if dtype not in FLOATING:  # float8 too: no implementation computes in it
            raise fail(op, f"dtype {str(dtype).removeprefix('torch.')} is not supported ({name} has it); use a "
                           "floating-point dtype: float16, bfloat16, float32 or float64", **shapes)
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={str(d).removeprefix('torch.')}" for n, d in dtypes.items())
        raise fail(op, f"arguments must share one dtype, got {listed}; cast them first", **shapes)
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise fail(op, f"arguments must be on one device, got {listed}", **shapes)


def may_write_into(*tensors: torch.Tensor | None) -> bool:
    """Whether an implementation may write its result into a fresh buffer with ``out=``.

    Writing ``[..., n, out]`` straight into its own buffer keeps the output contract (a fresh
    tensor, not a view of an intermediate) without a copy, or without the ~4 us re-label that a
    reshaped matmul result needs (``aten._unsafe_view`` from Python, 2-core CPU). Not allowed where
    ``out=`` is not: autograd recording for these tensors, and wherever :func:`plain_eager` is
    false. Cheap: it runs on the hot path.
    """
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, not any() over a generator: ~0.5 us less on the hot path
            if t is not None and t.requires_grad:
                return False
    return plain_eager(*tensors)


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """No forward-mode AD (a dual level), torch.func transform, torch.compile / torch.export /
    torch.jit tracing (a traced graph must not depend on the grad mode), autocast, or tensor
    subclass: a plain eager call, whose implementation may take shortcuts (``out=``, a Function of
    its own) that those contexts do not allow."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _functorch_active() is not None:
        return False
    if getattr(_forward_ad, "_current_level", 0) >= 0:  # -1 outside forward AD's dual_level
        return False
    return plain_tensors(*tensors)


def plain_tensors(*tensors: torch.Tensor | None) -> bool:
    """The part of :func:`plain_eager` that depends on the tensors: no subclass, no autocast on
    their device. (The rest is the context, which a prepared function's memo key holds: see
    ``Implementation.prepare``.)"""
    first = None
    for t in tensors:  # loops, not generators: this runs on every call (1.4 -> 0.6 us)
        if t is not None:
            if type(t) not in _PLAIN:
                return False
            first = t if first is None else first
    return first is None or not (_any_autocast() and autocast_on(first.device.type))


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for one autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # e.g. "meta": autocast has no such device type, so it is not on
        return False


def traced_plainly(*tensors: torch.Tensor | None) -> bool:
    """Being traced by torch.compile with no torch.func transform, forward-mode AD or tensor
    subclass: where dynamo traces an ``autograd.Function`` without ``setup_context`` (forward and
    backward) into the graph. Not under torch.export: strict export records such a Function with
    grad mode off, and the exported module's result would have no gradient."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting() or \
            torch._C._are_functorch_transforms_active():
        return False
    if getattr(_forward_ad, "_current_level", 0) >= 0:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def apply_function(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``, every argument given positionally, without the cost of binding them.

    For a Function with ``setup_context`` (which torch.func needs), ``Function.apply`` binds the
    arguments through ``inspect.signature`` on every call: ~15 us on CPU, as much as a small
    kernel. With all arguments positional there is nothing to bind, so the autograd base's own
    ``apply`` is called directly (what ``Function.apply`` calls next). Inside a torch.func transform
    or under torch.compile it is ``function.apply``, which those need.
    """
    if _BASE_APPLY is None or torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return function.apply(*args)
    return _BASE_APPLY.__get__(None, function)(*_unwrap_dead_wrappers(args))


def direct_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` with nothing checked or bound: the autograd base's own ``apply``, bound
    to ``function``, for a prepared function on the dispatcher's lean road (``dispatch.lean_key``),
    whose key already says plain eager (no torch.func transform, forward AD, tracing or compiling).
    A tensor left over from a finished torch.func transform (a dead wrapper), which
    :func:`apply_function` unwraps first, needs nothing here: the Function's ops unwrap it (a test
    checks result and gradients)."""
    return function.apply if _BASE_APPLY is None else _BASE_APPLY.__get__(None, function)


def _no_unwrap(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return args


_BASE_APPLY = getattr(torch._C, "_FunctionBase", object).__dict__.get("apply")
try:  # what Function.apply does first: tensors left over from a finished transform become plain
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - every supported torch has it
    _unwrap_dead_wrappers = _no_unwrap


def own_tensor(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``y`` reshaped to ``shape`` as a tensor of its own, not a view: what a custom
    autograd.Function must return for forward-mode AD, whose tangent has no view to follow."""
    if torch.jit.is_tracing():  # a traced _unsafe_view would fix the sizes of this one call
        return y.reshape(shape).clone()
    return torch.ops.aten._unsafe_view(y, shape)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_functorch_active = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``Tensor.is_contiguous()`` from a shape and strides (dims of size 1 may have any stride)."""
    if 0 in shape:  # as torch says: an empty tensor is contiguous whatever its strides
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=False):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def random_like(shape: tuple[int, ...], sig_dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=sig_dtype, device=device, generator=generator)


# ---- what follows from an op's list of arguments (OpSpec.arguments) --------------------------------

def normalize_call(op: str, arguments: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                   who: str) -> tuple[Any, ...]:
    """The op's positional arguments from ``args`` and ``kwargs`` (which it empties of them); a list
    given for a sequence argument becomes a tuple."""
    names = [a.name for a in arguments]
    values = dict(zip(names, args, strict=False))
    for name in list(kwargs):
        if name in names and name not in values:
            values[name] = kwargs.pop(name)
    required = {a.name for a in arguments if not a.optional}
    if kwargs or len(args) > len(names) or not required <= values.keys():
        shown = ", ".join(a.name + ("=None" if a.optional else "") for a in arguments)
        raise fail(op, f"{who}: takes ({shown}), got {len(args)} positional and "
                       f"{sorted(kwargs)} keyword arguments")
    out = [values.get(a.name) for a in arguments]
    return tuple(tuple(v) if a.many and isinstance(v, list) else v for a, v in zip(arguments, out, strict=True))


def grad_tensors(arguments: tuple[Any, ...], sig: Any, args: tuple[Any, ...]) -> list[torch.Tensor]:
    """The tensors among ``args`` whose argument ``sig.grad`` names, in argument order."""
    out: list[torch.Tensor] = []
    for a, value in zip(arguments, args, strict=False):
        if a.name in sig.grad:
            out += list(value) if isinstance(value, (tuple, list)) else [value]
    return out


def bias_operand(b: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """``b.unsqueeze(dim)``, the bias a ``baddbmm`` adds to a product of ``rows`` rows per group.

    With one row the bias has the product's own shape, so autograd passes the incoming gradient
    itself back as the bias's, and AccumulateGrad keeps that view as ``b.grad``: two layers fed by
    one gradient then share one ``.grad`` buffer (accumulating a second micro-batch doubles both),
    and a second ``backward(g)`` writes into the caller's ``g``. Multiplying by one there gives the
    bias a gradient of its own (one small multiply, only where the bias is recorded).
    """
    bias = b.unsqueeze(dim)
    return bias * 1 if rows == 1 and b.requires_grad and torch.is_grad_enabled() else bias

