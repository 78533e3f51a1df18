"""What an implementation is, and the scoped override that forces one.

An implementation is a plain function plus data saying what it supports. The dispatcher and the
tuner only ever see :class:`Implementation` objects; op modules own their registries.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import GroupedOpsError

FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Implementation:
    """One interchangeable way of computing an op.

    Attributes:
        name: stable snake_case name; it is a cache key, never rename it.
        fn: the function, called with the op's validated positional arguments.
        devices: device types it runs on.
        dtypes: dtypes it accepts.
        extra_memory: bytes of workspace beyond the output, given the op's signature.
        work_factor: how many times the arithmetic of a plain batched matmul it does.
        check: extra reasons it cannot run a given signature (beyond devices/dtypes).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = FLOATING
    extra_memory: Callable[[Any], int] = field(default=lambda sig: 0)
    work_factor: Callable[[Any], float] = field(default=lambda sig: 1.0)
    check: Callable[[Any], list[str]] = field(default=lambda sig: [])

    def not_supported_reasons(self, sig: Any) -> list[str]:
        """Why this implementation cannot run ``sig`` (a Signature); empty when it can."""
        reasons = []
        if sig.device_type not in self.devices:
            reasons.append(f"device {sig.device_type!r} not in {sorted(self.devices)}")
        if sig.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(sig.dtype).removeprefix('torch.')} not in {names}")
        return reasons + self.check(sig)

    def supports(self, sig: Any) -> bool:
        return not self.not_supported_reasons(sig)


class Registry(Mapping[str, Implementation]):
    """The ordered implementations of one op. Order is the tie-break preference of the tuner."""

    def __init__(self, op: str, impls: list[Implementation], version: int) -> None:
        self.op = op
        self.version = version  # bump when an implementation's numerics or speed change materially
        self._impls = {i.name: i for i in impls}

    def __getitem__(self, name: str) -> Implementation:
        try:
            return self._impls[name]
        except KeyError:
            raise GroupedOpsError(
                f"{self.op}: unknown impl {name!r}; valid options are {['auto', *self._impls]}"
            ) from None

    def __contains__(self, name: object) -> bool:
        # Mapping's default asks __getitem__ and expects KeyError; ours raises GroupedOpsError,
        # which would turn every `name in registry` for an unknown name into an error.
        return name in self._impls

    def __iter__(self) -> Iterator[str]:
        return iter(self._impls)

    def __len__(self) -> int:
        return len(self._impls)


# op name -> forced implementation name, for the current scope (thread- and task-local).
_forced: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "grouped_ops_forced", default=None
)


def forced_impl(op: str) -> str | None:
    """The implementation a ``use_impl`` scope forces for ``op``, if any."""
    scope = _forced.get()
    return None if scope is None else scope.get(op)


@contextlib.contextmanager
def use_impl(impl: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Force implementations inside a ``with`` block; the previous setting is restored on exit.

    ``use_impl("bmm")`` forces ``bmm`` for every op that has it; ``use_impl(grouped_linear="loop",
    weighted_combine="broadcast")`` forces per op. Names are checked when the block is entered.

    Example:
        >>> with grouped_ops.use_impl(grouped_linear="loop"):
        ...     y = model(x)
    """
    from .ops import REGISTRIES  # the ops import this module, so look them up lazily

    scope: dict[str, str] = {}
    if impl is not None:
        owners = [op for op, reg in REGISTRIES.items() if impl in reg]
        if not owners:
            valid = sorted({n for reg in REGISTRIES.values() for n in reg})
            raise GroupedOpsError(f"use_impl: unknown impl {impl!r}; valid options are {valid}")
        scope.update(dict.fromkeys(owners, impl))
    for op, name in per_op.items():
        if op not in REGISTRIES:
            raise GroupedOpsError(f"use_impl: unknown op {op!r}; valid ops are {sorted(REGISTRIES)}")
        REGISTRIES[op][name]  # raises a GroupedOpsError naming the valid options
        scope[op] = name
    previous = _forced.get()
    token = _forced.set({**(previous or {}), **scope})
    try:
        yield
    finally:
        _forced.reset(token)
