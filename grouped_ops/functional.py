"""The public ops. Each validates once, follows autocast, and hands over to the dispatcher.

``grouped_linear`` and ``weighted_combine`` are written out (their docstrings are the reference);
:func:`op_function` makes the public function of any other registered op."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import dispatch
from ._errors import GroupedOpsError
from .ops import SPECS
from .ops._common import autocast_on as _autocast_on
from .ops._spec import OpSpec
from .ops.grouped_linear import SPEC as _GL
from .ops.weighted_combine import SPEC as _WC
from .ops.weighted_combine import promote


def grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, impl: str = "auto") -> Tensor:
    """n independent linear layers in one call.

    ``input [..., n, in]`` (any number of leading dims, or none), ``weight [n, out, in]``
    (nn.Linear's layout per group), ``bias [n, out]`` or None -> ``[..., n, out]``. The same result
    as ``torch.stack([F.linear(input[..., i, :], weight[i], bias[i]) for i in range(n)], -2)``.
    Any strides work, e.g. ``W.transpose(1, 2)`` of a ``[n, in, out]`` tensor.

    Example:
        >>> x = torch.randn(8, 4, 16)                  # batch 8, 4 groups, 16 features each
        >>> w, b = torch.randn(4, 32, 16), torch.randn(4, 32)
        >>> grouped_linear(x, w, b).shape
        torch.Size([8, 4, 32])

    Args:
        input: ``[..., n, in]``.
        weight: ``[n, out, in]``.
        bias: ``[n, out]`` or None.
        impl: ``"auto"`` (the tuned choice) or one of ``implementations("grouped_linear")``.

    Returns:
        ``[..., n, out]`` in the input's dtype (the autocast dtype under ``torch.autocast``), a
        fresh tensor stored group-major (``[n, ..., out]`` in memory, as ``torch.einsum`` and TabM's
        layer return it), whichever implementation ran. ``.view()`` across the group dim raises
        torch's error: use ``reshape``, or ``y.contiguous()`` for the contiguous layout.

    Raises:
        GroupedOpsError: wrong ranks or sizes, mixed dtypes or devices, an unknown ``impl`` or one
            that does not support these inputs (the message lists why).
    """
    if type(input) is Tensor and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN) and \
            not _any_autocast() and not _is_compiling() and not _RECORDING.get() and not _function_mode():
        # the lean road to the dispatcher's memo (dispatch.lean_key): the same entry, less Python
        key = _lean_key(_GL.name, input, weight, bias, impl)
        run = _LEAN.get(key)
        if run is not None:
            return run(input, weight, bias)
        return dispatch.lean_call(_GL, key, (input, weight, bias), impl)
    if _any_autocast() and isinstance(input, Tensor) and _autocast_on(input.device.type):
        device_type = input.device.type
        input, weight, bias = _autocast(device_type, input, weight, bias)
        with torch.autocast(device_type, enabled=False):  # see _dispatch
            return _dispatch(_GL, (input, weight, bias), impl)
    return _dispatch(_GL, (input, weight, bias), impl)


def weighted_combine(inputs: Tensor | Sequence[Tensor], weights: Tensor, *, impl: str = "auto") -> Tensor:
    """Per-sample weighted sum of k branch outputs: ``out[b] = sum_k weights[b, k] * inputs[b, k]``.

    ``inputs`` is a stacked tensor ``[b, k, *f]`` or a list/tuple of k tensors ``[b, *f]`` (the
    outputs of k parallel convolutions or experts; a list is never stacked by ``loop``),
    ``weights [b, k]`` -> ``[b, *f]``. Gradients flow to every input and to the weights.

    Example:
        >>> outs = [torch.randn(16, 32, 8, 8) for _ in range(4)]   # 4 conv branches
        >>> w = torch.softmax(torch.randn(16, 4), dim=-1)
        >>> weighted_combine(outs, w).shape
        torch.Size([16, 32, 8, 8])

    Args:
        inputs: ``[b, k, *f]``, or a list/tuple of k tensors ``[b, *f]`` of one shape.
        weights: ``[b, k]``.
        impl: ``"auto"`` or one of ``implementations("weighted_combine")``.

    Returns:
        ``[b, *f]``, a fresh contiguous tensor in the promoted dtype of ``inputs`` and ``weights``
        (torch's type promotion, as ``(inputs * weights[..., None]).sum(1)``: bfloat16 inputs with
        float32 weights give float32), or the autocast dtype under ``torch.autocast``.

    Raises:
        GroupedOpsError: wrong ranks or sizes, ragged or empty lists, mixed dtypes or devices, an
            unknown or unsupported ``impl``.
    """
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if _any_autocast() and isinstance(weights, Tensor) and _autocast_on(weights.device.type):
        device_type = weights.device.type
        inputs, weights = _autocast_combine(device_type, inputs, weights)
        with torch.autocast(device_type, enabled=False):  # see _dispatch
            # float64 is left alone by autocast: promote as the multiply-and-sum would
            return _dispatch(_WC, promote(inputs, weights), impl)
    return _dispatch(_WC, promote(inputs, weights), impl)


def _dispatch(spec: OpSpec, args: tuple, impl: str) -> Tensor:
    # Under autocast the arguments arrive cast to the autocast dtype, and the implementation runs
    # with autocast off: otherwise its own ops would follow autocast's per-op lists (CUDA's puts
    # `sum` on the float32 list, so `broadcast` alone would return float32).
    if torch.compiler.is_compiling():
        from ._compile import traced_call  # loads torch._dynamo: only while torch.compile traces

        return traced_call(spec.name, args, impl)
    return dispatch.call(spec, args, impl)


def op_function(spec: OpSpec) -> Callable[..., Tensor]:
    """The public function of an op registered with ``grouped_ops.ops.register(spec)``.

    ``fn(*args, impl="auto", **kwargs)`` takes the op's arguments as ``spec.arguments`` lists them
    (by position or name), follows autocast as the built-in ops do (floating-point tensors other than
    float64 are cast to the autocast dtype, then the op runs with autocast off), and dispatches;
    under torch.compile it is traced like them. Its ``__name__`` is the op's name, so ``prewarm``,
    ``lookup`` and ``assert_implementations_agree`` take it in place of the name.

    Raises:
        GroupedOpsError: from the call: arguments that do not fit ``spec.arguments`` or that
            ``spec.validate`` rejects, an unknown or unsupported ``impl``.
    """
    def fn(*args: Any, impl: str = "auto", **kwargs: Any) -> Tensor:
        call_args = spec.normalize(args, dict(kwargs), "call")
        first = next(_tensors(call_args), None)
        if _any_autocast() and first is not None and _autocast_on(first.device.type):
            device_type = first.device.type
            dtype = torch.get_autocast_dtype(device_type)
            call_args = tuple(tuple(_cast(t, dtype) for t in a) if isinstance(a, tuple) else _cast(a, dtype)
                              for a in call_args)
            with torch.autocast(device_type, enabled=False):  # see _dispatch
                return _dispatch(spec, call_args, impl)
        return _dispatch(spec, call_args, impl)

    fn.__name__ = fn.__qualname__ = spec.name
    fn.__doc__ = f"The op {spec.name} (see grouped_ops.functional.op_function)."
    fn._spec = spec  # type: ignore[attr-defined]
    _PUBLIC[spec.name] = fn
    return fn


def public(spec: OpSpec) -> Callable[..., Tensor]:
    """The public function of ``spec``'s op (made by :func:`op_function` when it has none yet)."""
    fn = _PUBLIC.get(spec.name)
    return fn if fn is not None and getattr(fn, "_spec", spec) is spec else op_function(spec)


def _tensors(args: tuple) -> Any:
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from (t for t in a if isinstance(t, Tensor))


def implementations(op: str) -> tuple[str, ...]:
    """The implementation names of ``op`` (``"grouped_linear"``, ``"weighted_combine"`` or a
    registered op's name), in preference order."""
    if op not in SPECS:
        raise GroupedOpsError(f"implementations: unknown op {op!r}; valid ops are {sorted(SPECS)}")
    return tuple(SPECS[op].registry)


def _cast(t: object, dtype: torch.dtype) -> object:
    # Autocast's own eligibility rule: floating-point tensors other than float64 are cast.
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


# One cheap global check keeps the common no-autocast call fast (before the per-device query,
# ops._common.autocast_on).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_PLAIN = (Tensor, torch.nn.Parameter)
_is_compiling, _RECORDING = torch.compiler.is_compiling, dispatch.RECORDING
# a TorchFunctionMode sees every tensor attribute read: under one, the long road (it shows the mode
# the same reads on a first and a decided call)
_function_mode = torch._C._is_torch_function_mode_enabled
_lean_key, _LEAN = dispatch.lean_key, dispatch._LEAN


def _autocast(device_type: str, *tensors: object) -> tuple:
    # What nn.Linear (a matmul on autocast's lower-precision list) does: compute in the autocast
    # dtype (CUDA float16/bfloat16, CPU bfloat16); float64 stays float64. The casts are ordinary
    # differentiable ops, so float32 parameters get float32 gradients.
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(t, dtype) for t in tensors)


def _autocast_combine(device_type: str, inputs: object, weights: Tensor) -> tuple:
    dtype = torch.get_autocast_dtype(device_type)
    if isinstance(inputs, tuple):
        inputs = tuple(_cast(t, dtype) for t in inputs)
    else:
        inputs = _cast(inputs, dtype)
    return inputs, _cast(weights, dtype)


_PUBLIC: dict[str, Callable[..., Tensor]] = {_GL.name: grouped_linear, _WC.name: weighted_combine}
