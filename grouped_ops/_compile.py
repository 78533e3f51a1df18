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

This module loads ``torch._dynamo`` (``assume_constant_result``), so it is imported only while
torch.compile traces (see :mod:`grouped_ops.functional`); the custom ops themselves are registered
at import time by :mod:`grouped_ops._custom_ops`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental import symbolic_shapes
from torch.utils._python_dispatch import _disable_current_modes

from . import dispatch
from ._custom_ops import call_auto
from ._errors import GroupedOpsError
from .dispatch import overrides
from .ops import SPECS
from .signature import Signature, bucketing_mode
from .tuning.harness import no_function_modes

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
        forced = overrides.forced_name(op) if impl == "auto" else None
        name = impl if impl != "auto" else (forced[0] if forced else "")
        if name:
            if not dynamic:
                dispatch.checked_impl(spec, sig, name)
            return f"inline:{name}" if _traceable(op, sig, name) else f"op:{name}"
        if dynamic:
            return "op:"
        known = dispatch.known_decision(spec, sig)
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
        # Outside whatever is tracing: under torch.export (non-strict) the probe's ops and an
        # autocast block would otherwise be recorded into the exported program.
        with _disable_current_modes(), no_function_modes(), torch.enable_grad():
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
    """What an op's public function does while dynamo traces it."""
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
        return spec.registry[name](*args)
    return call_auto(op, args, m[-1], name)
