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
from .ops.grouped_linear_ragged import SPEC as _GLR
from .ops.grouped_linear_ragged import offsets_from as _offsets_from
from .ops.grouped_linear_ragged import offsets_meta as _offsets_meta
from .ops.unpermute_combine import SPEC as _UC
from .ops.unpermute_combine import check_rows
from .ops.weighted_combine import SPEC as _WC
from .ops.weighted_combine import promote


def grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, offsets: Tensor | None = None,
                   group_sizes: Tensor | Sequence[int] | None = None, impl: str = "auto") -> Tensor:
    """n independent linear layers in one call.

    ``input [..., n, in]`` (any number of leading dims, or none), ``weight [n, out, in]``
    (nn.Linear's layout per group), ``bias [n, out]`` or None -> ``[..., n, out]``. The same result
    as ``torch.stack([F.linear(input[..., i, :], weight[i], bias[i]) for i in range(n)], -2)``.
    Any strides work, e.g. ``W.transpose(1, 2)`` of a ``[n, in, out]`` tensor.

    Ragged groups (mixture-of-experts experts, docs/ragged.md): with ``offsets`` or
    ``group_sizes``, ``input [T, in]`` holds rows sorted by group, ``weight [E, out, in]``,
    ``bias [E, out]`` -> ``[T, out]``: group ``g``'s rows ``offsets[g-1] <= t < offsets[g]`` get
    ``F.linear(input[t], weight[g], bias[g])``; rows past ``offsets[E-1]`` are zero. ``offsets`` are
    the cumulative ends as ``F.grouped_mm`` takes them (int32 or int64), ``group_sizes`` the
    counts; give at most one. This is the op ``grouped_linear_ragged``, with implementations of its
    own (``impl`` is one of ``implementations("grouped_linear_ragged")``).

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
            that does not support these inputs (the message lists why); with ragged groups also
            offsets that are not int32/int64, of the wrong length, decreasing or past ``T`` (values
            are checked where that costs no host sync), or both ``offsets`` and ``group_sizes``.
    """
    if offsets is not None or group_sizes is not None:
        offsets = _offsets_from(input, weight, bias, offsets, group_sizes)
        return ragged_grouped_linear(input, weight, bias, offsets, _impl_of(_GLR, _GL, impl))
    if impl != "auto":
        impl = _impl_of(_GL, _GLR, impl)
    return dense_grouped_linear(input, weight, bias, impl)


def dense_grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None, impl: str) -> Tensor:
    """:func:`grouped_linear` without ragged groups, ``impl`` already checked against the dense op
    (GroupedLinear.forward calls it too): the lean road to the dispatcher's memo for plain eager
    calls, else autocast's casts and the long road."""
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


def ragged_grouped_linear(input: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, impl: str) -> Tensor:
    """:func:`grouped_linear` with ragged groups, ``offsets`` made and ``impl`` checked against the
    ragged op: the lean road to the dispatcher's memo for plain eager calls (as
    :func:`dense_grouped_linear`'s), else autocast's casts and the long road. Measured (CPU, one
    thread, T=16, E=8, 64->64, grouped_mm): 35 -> 27 us a call, F.grouped_mm itself 19-20 us."""
    if type(input) is Tensor and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN) and \
            type(offsets) is Tensor and not _any_autocast() and not _is_compiling() and not _RECORDING.get() and \
            not _function_mode():
        key = _lean_key(_GLR.name, input, weight, bias, impl, _offsets_meta(input, offsets, False))
        run = _LEAN.get(key)
        if run is not None:
            return run(input, weight, bias, offsets)
        return dispatch.lean_call(_GLR, key, (input, weight, bias, offsets), impl)
    return _with_autocast(_GLR, (input, weight, bias, offsets), impl)


def grouped_linear_ragged(input: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, *,
                          impl: str = "auto") -> Tensor:
    """The ragged-groups op itself: ``grouped_linear(input, weight, bias, offsets=offsets)`` with
    every argument positional, as ``prewarm``, ``lookup`` and the testing helpers take it.

    ``input [T, in]`` (rows sorted by group), ``weight [E, out, in]``, ``bias [E, out]`` or None,
    ``offsets [E]`` (int32/int64 cumulative ends) -> ``[T, out]``, fresh and contiguous; rows past
    ``offsets[E-1]`` are zero. See :func:`grouped_linear` and docs/ragged.md.

    Raises:
        GroupedOpsError: as :func:`grouped_linear` with offsets.
    """
    return ragged_grouped_linear(input, weight, bias, offsets, _impl_of(_GLR, _GL, impl))


def weighted_combine(inputs: Tensor | Sequence[Tensor], weights: Tensor, *, out_dtype: torch.dtype | None = None,
                     impl: str = "auto") -> Tensor:
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
        out_dtype: the dtype to compute in and return, e.g. the inputs' bfloat16 under float32
            routing weights: only the small ``[b, k]`` weights are cast (rounded to it), never the
            inputs, and no float32 ``[b, *f]`` result is made; the matmul implementations
            accumulate the sum over k in float32. None: torch's type promotion.
        impl: ``"auto"`` or one of ``implementations("weighted_combine")``.

    Returns:
        ``[b, *f]``, a fresh contiguous tensor in ``out_dtype``, else in the promoted dtype of
        ``inputs`` and ``weights`` (torch's type promotion, as ``(inputs * weights[..., None]).sum(1)``:
        bfloat16 inputs with float32 weights give float32), or the autocast dtype under
        ``torch.autocast`` (``out_dtype`` wins over it).

    Raises:
        GroupedOpsError: wrong ranks or sizes, ragged or empty lists, mixed dtypes or devices, an
            unknown or unsupported ``impl``, an ``out_dtype`` that is not a floating-point dtype.
    """
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if _any_autocast() and isinstance(weights, Tensor) and _autocast_on(weights.device.type):
        device_type = weights.device.type
        inputs, weights = _autocast_combine(device_type, inputs, weights)
        with torch.autocast(device_type, enabled=False):  # see _dispatch
            # float64 is left alone by autocast: promote as the multiply-and-sum would
            return _dispatch(_WC, promote(inputs, weights, _out_dtype(_WC, out_dtype)), impl)
    return _dispatch(_WC, promote(inputs, weights, _out_dtype(_WC, out_dtype)), impl)


def unpermute_combine(rows: Tensor, inverse: Tensor, weights: Tensor, *, out_dtype: torch.dtype | None = None,
                      impl: str = "auto") -> Tensor:
    """Un-permute rows in expert order and take each token's weighted sum, in one call:
    ``out[t] = sum_j weights[t, j] * rows[inverse[t, j]]``.

    The last step of a mixture-of-experts layer: ``rows [N, d]`` are the experts' outputs in expert
    order (``N = T*k``; rows that no token points at, such as expert-parallel sentinel rows, are
    ignored), ``inverse [T, k]`` is where each (token, choice) went (:func:`grouped_ops.moe_routing`
    returns it) and ``weights [T, k]`` the routing weights. Deterministic, forward and backward, on
    every device when ``inverse`` holds distinct rows: a gather and a sum over k, never an
    ``index_add_`` with repeated indices.

    Example:
        >>> idx = torch.tensor([[1, 0], [1, 2]])                    # T=2, top-2 of E=3
        >>> r = grouped_ops.moe_routing(idx, 3)
        >>> rows = torch.randn(4, 8)                               # the experts' outputs, sorted
        >>> unpermute_combine(rows, r.inverse, torch.full((2, 2), 0.5)).shape
        torch.Size([2, 8])

    Args:
        rows: ``[N, d]``.
        inverse: ``[T, k]`` int64 or int32 indices into ``rows``.
        weights: ``[T, k]``.
        out_dtype: as :func:`weighted_combine`'s: bfloat16 rows with float32 routing weights give
            bfloat16 (the weights are cast), accumulating the sum over k in float32 in the matmul
            and fused implementations. None: torch's type promotion.
        impl: ``"auto"`` or one of ``implementations("unpermute_combine")``.

    Returns:
        ``[T, d]``, a fresh contiguous tensor in ``out_dtype`` or the promoted dtype (the autocast
        dtype under ``torch.autocast``). Gradients flow to ``rows`` and ``weights``.

    Raises:
        GroupedOpsError: wrong ranks, ``inverse`` and ``weights`` of different shapes, a
            non-integer ``inverse``, mixed devices, an unknown or unsupported ``impl``, and, on the
            CPU (where it costs no sync), an index outside ``rows``.
    """
    dtype = _out_dtype(_UC, out_dtype)
    if _any_autocast() and isinstance(rows, Tensor) and _autocast_on(rows.device.type):
        device_type = rows.device.type
        rows, weights = _autocast_combine(device_type, rows, weights)
        with torch.autocast(device_type, enabled=False):  # see _dispatch
            return unpermute_combine(rows, inverse, weights, out_dtype=dtype, impl=impl)
    rows, weights = promote(rows, weights, dtype)
    if isinstance(rows, Tensor) and isinstance(inverse, Tensor):
        check_rows(rows, inverse)
    return _dispatch(_UC, (rows, inverse, weights), impl)


def call_arguments(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], who: str) -> tuple[OpSpec, tuple[Any, ...]]:
    """The op a public call with these arguments reaches, and that op's positional arguments, as the
    call makes them: ``grouped_linear`` with ``offsets=`` or ``group_sizes=`` is
    ``grouped_linear_ragged``; ``weighted_combine`` and ``unpermute_combine`` apply ``out_dtype=``
    and type promotion. What ``prewarm`` and ``lookup`` describe, so that they key as the call does.
    ``kwargs`` is emptied of what is taken; the op's ``normalize`` refuses the rest."""
    spec = SPECS[op]
    if op == _GL.name:
        offsets, sizes = kwargs.pop("offsets", None), kwargs.pop("group_sizes", None)
        if offsets is None and sizes is None:
            return spec, spec.normalize(args, kwargs, who)
        x, w, b = spec.normalize(args, kwargs, who)
        return _GLR, (x, w, b, _offsets_from(x, w, b, offsets, sizes))
    if op in (_WC.name, _UC.name):
        dtype = _out_dtype(spec, kwargs.pop("out_dtype", None))
        values = spec.normalize(args, kwargs, who)
        if op == _WC.name:
            return spec, promote(values[0], values[1], dtype)
        rows, inverse, weights = values
        rows, weights = promote(rows, weights, dtype)
        return spec, (rows, inverse, weights)
    return spec, spec.normalize(args, kwargs, who)


def _out_dtype(spec: OpSpec, dtype: object) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise GroupedOpsError(f"{spec.name}: out_dtype must be None or a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _impl_of(spec: OpSpec, other: OpSpec, impl: str) -> str:
    # a name of the other form's op (GroupedLinear(impl=...) serves both): say which call reaches which op
    if impl != "auto" and impl not in spec.registry and impl in other.registry:
        form = "with offsets or group_sizes" if spec is _GLR else "without offsets or group_sizes"
        raise GroupedOpsError(f"{spec.name}: impl {impl!r} is an implementation of {other.name}, but a call "
                              f"{form} runs {spec.name}, whose options are {['auto', *spec.registry]}")
    return impl


def _with_autocast(spec: OpSpec, args: tuple, impl: str) -> Tensor:
    # nn.Linear's autocast rule for an op whose floating-point arguments are cast (see grouped_linear)
    first = args[0]
    if _any_autocast() and isinstance(first, Tensor) and _autocast_on(first.device.type):
        device_type = first.device.type
        args = _autocast(device_type, *args)
        with torch.autocast(device_type, enabled=False):
            return _dispatch(spec, args, impl)
    return _dispatch(spec, args, impl)


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


_PUBLIC: dict[str, Callable[..., Tensor]] = {_GL.name: grouped_linear, _WC.name: weighted_combine,
                                             _GLR.name: grouped_linear_ragged, _UC.name: unpermute_combine}
