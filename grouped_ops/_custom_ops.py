"""The custom ops ``grouped_ops::<op>_auto``, one per registered op (``grouped_linear_auto``,
``weighted_combine_auto``, and those of ops registered later), built from each op's spec.

Defined when ``grouped_ops`` is imported (a few milliseconds), and for a later op when it is
registered, so ``torch.export.load`` of a program that calls them works in a fresh process. The
trace-time planner that emits them lives in :mod:`grouped_ops._compile`, imported only while
torch.compile traces (it loads ``torch._dynamo``).

The schema comes from the op's arguments (``OpSpec.arguments``): a ``Tensor`` (``Tensor?`` when
optional, ``Tensor[]`` plus a ``bool stacked`` for a tensor-or-sequence one), then ``SymInt grad_mask``
(the traced call's grad flags) and ``str impl`` (forced at trace time, or "" to decide at run time).
When a compiled program runs, the custom op dispatches (and tunes, if allowed) on the concrete
shapes, with the grad mode of the traced call; its fake kernel and backward are the op's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import dispatch
from ._errors import GroupedOpsError
from .ops import SPECS, on_register
from .ops._spec import Arg, OpSpec

# op name -> its custom op; kept when the op is unregistered (torch.library cannot forget it)
_DEFINED: dict[str, Any] = {}


def _grad_mask(grad: Any) -> int:
    return sum(1 << i for i, g in enumerate(grad or ()) if g)


def _flags(mask: int, count: int) -> Any:
    flags = tuple(bool(mask >> i & 1) for i in range(count))
    return flags if any(flags) else False


def schema(arguments: tuple[Arg, ...]) -> str:
    """The custom op's schema for an op with these arguments."""
    many = [a for a in arguments if a.many]
    parts = [f"{'Tensor[]' if a.many else 'Tensor?' if a.optional else 'Tensor'} {a.name}" for a in arguments]
    parts += [f"bool {'stacked' if len(many) == 1 else a.name + '_stacked'}" for a in many]
    return f"({', '.join(parts)}, SymInt grad_mask, str impl) -> Tensor"


def _pack(arguments: tuple[Arg, ...], args: tuple[Any, ...]) -> list[Any]:
    """The op's arguments as the custom op takes them (without grad_mask and impl)."""
    values = [([v] if isinstance(v, Tensor) else list(v)) if a.many else v
              for a, v in zip(arguments, args, strict=True)]
    return values + [isinstance(v, Tensor) for a, v in zip(arguments, args, strict=True) if a.many]


def _unpack(arguments: tuple[Arg, ...], packed: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    stacked = iter(packed[len(arguments):])
    return tuple(((v[0] if next(stacked) else tuple(v)) if a.many else v)
                 for a, v in zip(arguments, packed[:len(arguments)], strict=True))


def define(spec: OpSpec) -> None:
    """Define ``grouped_ops::<spec.name>_auto`` (once per name; it reads the spec registered under
    that name when it runs)."""
    if spec.name in _DEFINED:
        defined = str(_DEFINED[spec.name]._opoverload._schema).partition("(")[2]
        if defined != schema(spec.arguments).partition("(")[2]:  # torch.library keeps the first schema
            raise GroupedOpsError(f"register: grouped_ops::{spec.name}_auto was defined with other arguments "
                                  f"({defined.partition(') ->')[0]}); a spec registered again under that name "
                                  "must keep them (or take another name)")
        return
    name = spec.name

    def run(*packed: Any) -> Tensor:
        now = SPECS[name]
        args = _unpack(now.arguments, packed[:-2])
        return _run_tuned(now, args, packed[-2], packed[-1])  # in the op's output contract (its fake's strides)

    def fake(*packed: Any) -> Tensor:
        now = SPECS[name]
        assert now.fake is not None
        return now.fake(*_unpack(now.arguments, packed[:-2]))

    op = torch.library.custom_op(f"grouped_ops::{name}_auto", run, mutates_args=(), schema=schema(spec.arguments))
    op.register_fake(fake)
    op.register_autograd(_backward(name), setup_context=_setup_context)
    _DEFINED[name] = op


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    # Every tensor argument is saved; where each came from is kept to rebuild the arguments.
    tensors: list[Tensor] = []
    spots: list[Any] = []
    for v in inputs[:-2]:
        if isinstance(v, Tensor):
            spots.append(len(tensors))
            tensors.append(v)
        elif isinstance(v, (list, tuple)):
            spots.append(range(len(tensors), len(tensors) + len(v)))
            tensors.extend(v)
        else:  # None, or a bool
            spots.append((v,))
    ctx.save_for_backward(*tensors)
    ctx.spots, ctx.impl = spots, inputs[-1]


def _backward(name: str) -> Callable[..., tuple[Any, ...]]:
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        spec = SPECS[name]
        saved = ctx.saved_tensors
        packed = [saved[s] if isinstance(s, int) else [saved[i] for i in s] if isinstance(s, range) else s[0]
                  for s in ctx.spots]
        arguments = spec.arguments
        needs = tuple(ctx.needs_input_grad[:len(arguments)])

        def again(*args: Any) -> Tensor:
            return _DEFINED[name](*_pack(arguments, args), 0, ctx.impl)

        assert spec.backward is not None
        grads = spec.backward(_unpack(arguments, packed), needs, grad, again)
        out = [(None if g is None else [g] if isinstance(g, Tensor) else list(g)) if a.many else g
               for a, g in zip(arguments, grads, strict=True)]
        return (*out, *(None,) * (len(ctx.spots) - len(arguments) + 2))

    return backward


def _run_tuned(spec: OpSpec, args: tuple[Any, ...], grad_mask: int, impl: str) -> Tensor:
    """Dispatch on concrete tensors with the traced call's grad mode restored into the signature:
    to ``impl`` when one was forced at trace time, else as ``impl="auto"`` does.

    Decisions are kept in the dispatcher's own tables, so ``dispatch.clear_memory()`` forgets them
    and later calls cost one dict lookup, as in eager mode.
    """
    m = spec.meta(*args)
    assert m is not None
    m = (*m[:-1], _flags(grad_mask, len(spec.arguments)))
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
    return _DEFINED[op](*_pack(SPECS[op].arguments, args), _grad_mask(grad), impl)


for _spec in list(SPECS.values()):
    define(_spec)
on_register.append(define)
