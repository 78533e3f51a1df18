"""The one path every op call takes: describe the arguments, look the choice up, call it.

The hot path (a decided signature) is ``spec.meta`` (a cheap hashable description), one dict
lookup keyed by that description, the ``impl`` argument and the overrides' state, and the call.
Everything else (validation, signatures, forced and remembered choices, tuning) is
:func:`grouped_ops.dispatch.resolve.decide`, shared by eager calls, torch.compile, prewarm and lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import torch.autograd.forward_ad as _forward_ad

from .._errors import GroupedOpsError
from ..decision import Decision
from ..ops._spec import OpSpec
from ..registry import Implementation
from ..signature import bucketing_mode
from ..tuning.harness import no_function_modes
from . import overrides, resolve
from .resolve import (
    checked_impl,
    clear_memory,
    decide_signature,
    entry_for,
    impl_set_version,
    known_decision,
    use_timer,
)

__all__ = [
    "Decision", "call", "checked_impl", "clear_memory", "decide_signature", "entry_for",
    "impl_set_version", "implementation_for", "known_decision", "use_timer",
]

# (op, argument description, impl, overrides, settings) -> implementation, or the function it
# prepared for that description (Implementation.prepare), for decided calls.
# Bounded: a workload with endless distinct shapes (dynamic batch sizes in exact-bucket mode) must
# not grow it forever; when full it is emptied, and hot entries come back on their next call.
MEMO_LIMIT = 4096
_MEMO: dict[Hashable, Callable[..., torch.Tensor]] = {}
# The grouped_ops.record() blocks active in this thread (or asyncio task); each sees its calls.
RECORDING: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("grouped_ops_recording", default=())


def _settings() -> tuple[Any, ...]:
    # What changes a decision besides the arguments, read on every call (~0.3 us): deterministic
    # mode, the CPU thread count and float32 matmul precision (part of the signature); whether
    # a torch.func transform or forward-mode AD is on (some implementations cannot run there), and
    # jit tracing (a prepared function is only for plain eager calls: see _runner).
    return (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
            torch.get_float32_matmul_precision(), torch._C._are_functorch_transforms_active(),
            getattr(_forward_ad, "_current_level", -1), torch._C._is_tracing())


def _key(spec: OpSpec, m: Hashable, impl: str) -> tuple[Any, ...]:
    return spec.name, m, impl, overrides.state(spec.name), _settings()


def call(spec: OpSpec, args: tuple[Any, ...], impl: str) -> torch.Tensor:
    """Run ``spec``'s op on ``args`` with implementation ``impl`` (or ``"auto"``)."""
    return call_keeping(spec, args, impl)[0]


def call_keeping(spec: OpSpec, args: tuple[Any, ...], impl: str) -> tuple[torch.Tensor, Callable[..., torch.Tensor] | None]:
    """:func:`call`, and what the memo keeps for these arguments (None where it keeps nothing)."""
    m = spec.meta(*args)
    key = _key(spec, m, impl)
    if not RECORDING.get():
        implementation = _MEMO.get(key)
        if implementation is not None:
            return implementation(*args), implementation
    implementation, keep = _choose(spec, args, m, impl)
    if not keep:
        return implementation(*args), None
    run = _runner(implementation, m, key)  # the first call runs what the later ones will
    _remember(key, run)
    return run(*args), run


# The lean road to the memo for the grouped_linear ops (input, weight, bias or None, and the ragged
# op's offsets), taken by functional.dense_grouped_linear and functional.ragged_grouped_linear
# (grouped_linear and GroupedLinear.forward): a flat key of everything the memo's key is made of
# (meta's shapes, strides, dtypes, devices and grad flags; the impl; overrides.state; _settings),
# read inline -> the memo's entry (its ``bare`` function, where it has one). Only plain eager calls get here (the
# caller checks: exact tensor types, no autocast, not compiling, not recording). Emptied with the memo.
_LEAN: dict[Hashable, Callable[..., torch.Tensor]] = {}
_scope, _RAW, _KEYS = overrides._scope, overrides._RAW, overrides._KEYS
_grad_enabled, _deterministic = torch.is_grad_enabled, torch.are_deterministic_algorithms_enabled
_threads, _precision = torch.get_num_threads, torch.get_float32_matmul_precision
_functorch, _tracing = torch._C._are_functorch_transforms_active, torch._C._is_tracing


def lean_key(name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, impl: str,
             more: Hashable = None) -> Hashable:
    """The lean key of a call (see ``_LEAN``); None where the environment cannot be read raw.
    ``more``: what else the op's ``meta`` describes (the ragged op's offsets)."""
    if _KEYS is None:
        return None
    grad = _grad_enabled() and (x.requires_grad, w.requires_grad, b is not None and b.requires_grad)
    return (x.shape, x.stride(), x.dtype, x.device, w.shape, w.stride(), w.dtype, w.device,
            None if b is None else (b.shape, b.dtype, b.device), grad, impl,
            _scope.get().get(name), _RAW.get(_KEYS[0]), _RAW.get(_KEYS[1]),  # type: ignore[union-attr]
            _deterministic(), _threads(), _precision(), _functorch(),
            getattr(_forward_ad, "_current_level", -1), _tracing(), name, more)


def lean_call(spec: OpSpec, key: Hashable, args: tuple[Any, ...], impl: str) -> torch.Tensor:
    """The call by the long road, remembering its memo entry under the lean ``key``."""
    out, run = call_keeping(spec, args, impl)
    if run is not None and key is not None and not RECORDING.get():
        if len(_LEAN) >= MEMO_LIMIT:
            _LEAN.clear()
        _LEAN[key] = getattr(run, "bare", run)  # the caller checked what its checks would
    return out


def _runner(implementation: Implementation, m: Hashable, key: tuple[Any, ...]) -> Callable[..., torch.Tensor]:
    """What the memo keeps for ``key``: the implementation's prepared function for ``m`` where the
    key's settings say a plain eager context (no torch.func transform, forward-mode AD or jit
    tracing; torch.compile never gets here), else the implementation. Measured: 34.7 -> 30.5 us a
    GroupedLinear forward at batch 1, 32 groups of 64->64 (CPU, one thread)."""
    _deterministic, _threads, _precision, functorch, forward_ad_level, tracing = key[-1]  # _settings()
    if functorch or forward_ad_level >= 0 or tracing:
        return implementation
    return implementation.prepared(m)


def _remember(key: Hashable, run: Callable[..., torch.Tensor]) -> None:
    if len(_MEMO) >= MEMO_LIMIT:
        _clear_memo()
    _MEMO[key] = run


def _clear_memo() -> None:
    _MEMO.clear()
    _LEAN.clear()


def implementation_for(spec: OpSpec, args: tuple[Any, ...], m: Hashable, impl: str,
                       around: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> Implementation:
    """What :func:`call` would run, for a description ``m`` that the caller adjusted (the
    torch.compile custom op passes the traced call's grad flags; ``impl=""`` means ``auto``).
    A decision still to be made is made inside ``around()``."""
    impl = impl or "auto"
    # its own memo entries (the same decisions): ``m`` holds the traced call's grad flags, not this
    # context's, so the prepared functions that :func:`call` keeps are not for it
    key = (*_key(spec, m, impl), "implementation_for")
    implementation = _MEMO.get(key)
    if implementation is None:
        with around():
            implementation, keep = _choose(spec, args, m, impl)
        if keep:
            _remember(key, implementation)
    return cast(Implementation, implementation)


def _choose(spec: OpSpec, args: tuple[Any, ...], m: Hashable | None, impl: str) -> tuple[Implementation, bool]:
    # A TorchFunctionMode sees every Tensor method: the checks and describing done here once per
    # signature are ours, not the user's call, so they are hidden from it (the call itself is not).
    with no_function_modes():
        return _choose_quietly(spec, args, m, impl)


def _choose_quietly(spec: OpSpec, args: tuple[Any, ...], m: Hashable | None,
                    impl: str) -> tuple[Implementation, bool]:
    if torch.jit.is_tracing():
        # Under torch.jit.trace sizes arrive as traced values, and checking or describing them warns
        # that the trace may not generalise. The checks and the choice are meant to be fixed at
        # trace time (only the data path is recorded, and it keeps its sizes symbolic), so hush them.
        # The traced graph must not depend on the grad mode either (trace's check re-runs the
        # module under no_grad): choose as for inference. (Both ops describe grad flags last.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            implementation, _ = _choose_here(spec, args, None if m is None else (*m[:-1], False), impl)
        return implementation, False  # chosen for another description than the memo's key
    return _choose_here(spec, args, m, impl)


def _choose_here(spec: OpSpec, args: tuple[Any, ...], m: Hashable | None, impl: str) -> tuple[Implementation, bool]:
    spec.validate(*args)
    if m is None:  # validate() accepted what meta() could not describe: a bug, never a silent answer
        raise GroupedOpsError(f"{spec.name}: could not describe the arguments {args!r}")
    sig = spec.signature(m, bucketing_mode() == "pow2")
    exact = spec.signature(m, False)
    recorders = RECORDING.get()
    for rec in recorders:
        rec._add(sig, exact)
    if impl != "auto":
        return checked_impl(spec, exact, impl), True  # (exact: an error names the real batch size)
    # Recording only notes signatures: the batch prewarm after it tunes them all with second
    # opinions, as `python -m grouped_ops prewarm --from FILE` does.
    decision, keep = resolve.decide(spec, sig, args, at=exact, tune_allowed=not recorders)
    assert decision is not None  # guessing is allowed: there is always an answer
    return spec.registry[decision.impl], keep and not recorders


resolve.on_clear.append(_clear_memo)
