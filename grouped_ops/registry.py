"""What an implementation is, the output contracts an op's implementations keep, and the tolerance
table.

An implementation is a plain function plus data saying what it supports. The dispatcher and the
tuner only ever see :class:`Implementation` objects; op modules own their registries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import GroupedOpsError

FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Tolerance:
    """How close two results of one dtype must be.

    Attributes:
        agree: normwise relative error ``‖a − b‖ / ‖a‖`` allowed between two implementations'
            outputs: the tuner's one-off check of every candidate against the first, the benchmark's
            check of every column, the demo's "results match".
        rtol: against a float64 reference, relative to the norm of ``|a|·|b|``, for a sum of up to 16
            terms (``grouped_ops.testing.tolerance`` scales it by √(terms / 16) beyond that).
        atol: the absolute floor per element in that comparison.
    """

    agree: float
    rtol: float
    atol: float


#: The one tolerance table, per dtype; :func:`tolerance` answers for dtypes not in it.
TOLERANCE: Mapping[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(agree=1e-7, rtol=1e-10, atol=1e-12),
    torch.float32: Tolerance(agree=5e-3, rtol=1e-4, atol=1e-6),
    torch.float16: Tolerance(agree=2e-2, rtol=1e-2, atol=1e-4),
    torch.bfloat16: Tolerance(agree=6e-2, rtol=2e-2, atol=1e-3),
}
_OTHER_DTYPE = Tolerance(agree=1e-2, rtol=2e-2, atol=1e-3)


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The :data:`TOLERANCE` entry of ``dtype`` (a loose default for other dtypes)."""
    return TOLERANCE.get(dtype, _OTHER_DTYPE)


def fresh_contiguous(y: torch.Tensor) -> torch.Tensor:
    """The default output contract (``Registry(output=...)``): a fresh, contiguous tensor.

    Code written against the ``torch.stack([...])`` an op replaces may ``.view()`` the result or
    modify it in place (``nn.ReLU(inplace=True)``, which under FSDP2 fails on a view of an
    intermediate), so the layout must not depend on which implementation ``auto`` picked. A result
    that is contiguous but a view (of a reshaped matmul, say) is re-labelled as a tensor of its own
    without a copy (``aten._unsafe_view``, as ``torch.matmul`` does); anything else is copied.
    """
    if torch.jit.is_tracing():  # recorded once, for every size: a copy, since a view at one size may not be at another
        return y.clone(memory_format=torch.contiguous_format)
    if not y.is_contiguous():
        return y.contiguous()
    return _own(y)


def group_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a ``[..., n, out]`` tensor stored ``[n, ..., out]``: those of
    ``y.movedim(0, -2)`` of a contiguous ``[n, ..., out]`` (for ``[b, n, out]``: ``(out, b * out, 1)``).
    Shapes of fewer than 3 dims are contiguous."""
    if len(shape) < 3:
        return contiguous_strides(shape)
    n_first = contiguous_strides((shape[-2], *shape[:-2], shape[-1]))  # [n, ..., out]
    return (*n_first[1:-1], n_first[0], 1)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        # (sym_max for a symbolic size, in a fake kernel; max otherwise: sym_max is a torch function)
        step = step * (torch.sym_max(size, 1) if isinstance(size, torch.SymInt) else max(size, 1))
    return tuple(reversed(strides))


def group_major(y: torch.Tensor) -> torch.Tensor:
    """grouped_linear's output contract: a fresh tensor ``[..., n, out]`` stored group-major,
    ``[n, ..., out]`` in memory (:func:`group_major_strides`), whatever implementation ran.

    That is the layout ``torch.einsum`` and TabM's layer return, and the one a bmm over the groups
    writes without a reordering pass. Dropout draws its mask in memory order, so a model re-routed
    through grouped_linear draws the masks it drew before. A result already in the layout is kept,
    and re-labelled as a tensor of its own if it is a view (``aten._unsafe_view``, no copy: an
    in-place op on the result then works in autograd, checkpointing and FSDP2); anything else is
    copied into the layout. ``.view()`` across the group dim of the result raises torch's error:
    use ``reshape`` or ``y.contiguous()``.
    """
    if y.dim() < 3:
        return fresh_contiguous(y)
    laid = y if _is_group_major(y) else y.movedim(-2, 0).contiguous().movedim(0, -2)  # the one copy
    if torch.jit.is_tracing():  # a traced _unsafe_view would fix this call's sizes: clone (keeps strides)
        return laid.clone(memory_format=torch.preserve_format)
    return _own(laid)


def _is_group_major(y: torch.Tensor) -> bool:
    """Whether ``y`` is laid out group-major (dims of size 1 may have any stride, as for contiguity)."""
    if y.numel() == 0:
        return True
    return y.movedim(-2, 0).is_contiguous()


def _own(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor of its own (not a view), without a copy."""
    if torch.compiler.is_compiling():  # _is_view() cannot be traced; in a graph the re-label is free
        return torch.ops.aten._unsafe_view(y, y.shape)
    if y._is_view():
        return torch.ops.aten._unsafe_view(y, y.shape)
    return y


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
        forward_ad: whether it supports forward-mode AD (``torch.func.jvp``, dual tensors).
        prepare: optional ``prepare(m, implementation)``: for a decided call's description ``m``
            (the op's ``meta``), a function that computes what ``implementation`` computes for every
            call with that description, with less Python per call; or None. The dispatcher
            memoises it in place of the implementation for eager calls outside torch.func
            transforms, forward-mode AD and tracing (those are in the memo key); anything else it
            relies on (tensor types, autocast) it checks per call, handing over to
            ``implementation`` where that fails. Its result keeps the output contract itself.
        runs_as: for a signature, the name of the implementation whose code this one runs there,
            or None. The tuner does not time it where that one is timed; forcing it still works.
        output: the op's output contract, applied to every result (see :class:`Registry`, which
            sets it; :func:`fresh_contiguous` by default).
        syncs: whether, for a signature, it reads tensor values on the host (a device sync, and
            values a CUDA graph would bake in): while a CUDA graph is being captured, ``auto``
            does not consider it and forcing it is refused.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = FLOATING
    extra_memory: Callable[[Any], int] = field(default=lambda sig: 0)
    work_factor: Callable[[Any], float] = field(default=lambda sig: 1.0)
    check: Callable[[Any], list[str]] = field(default=lambda sig: [])
    forward_ad: bool = True
    prepare: Callable[[Any, Implementation], Callable[..., torch.Tensor] | None] | None = None
    runs_as: Callable[[Any], str | None] = field(default=lambda sig: None)
    output: Callable[[torch.Tensor], torch.Tensor] = fresh_contiguous
    syncs: Callable[[Any], bool] = field(default=lambda sig: False)

    def __call__(self, *args: Any) -> torch.Tensor:
        """Run the implementation; the result keeps the op's output contract (``output``)."""
        return self.output(self.fn(*args))

    def prepared(self, m: Any) -> Callable[..., torch.Tensor]:
        """What the dispatcher memoises for calls described by ``m`` (see ``prepare``)."""
        run = None if self.prepare is None else self.prepare(m, self)
        return self if run is None else run

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
    """The ordered implementations of one op. Order is the tie-break preference of the tuner.

    ``output`` is the op's output contract: every implementation's result goes through it (a
    prepared function keeps it itself), in eager mode, under torch.compile and in the custom op. By
    default :func:`fresh_contiguous`; grouped_linear's is :func:`group_major`. ``removed`` maps the
    names of implementations that existed to why they went.
    """

    def __init__(self, op: str, impls: list[Implementation], version: int,
                 output: Callable[[torch.Tensor], torch.Tensor] = fresh_contiguous,
                 removed: Mapping[str, str] | None = None) -> None:
        self.op = op
        self.version = version  # bump when an implementation's numerics or speed change materially
        self.output = output
        # name -> why, for implementations that existed: named in the environment, an exclusion or
        # a cache entry, each gets one warning and is ignored (jobs configured for them keep running)
        self.removed: Mapping[str, str] = dict(removed or {})
        self._impls = {i.name: i if i.output is output else dataclasses.replace(i, output=output) for i in impls}

    def __getitem__(self, name: str) -> Implementation:
        try:
            return self._impls[name]
        except KeyError:
            raise GroupedOpsError(
                f"{self.op}: unknown impl {name!r}{self.removal(name)}; valid options are {['auto', *self._impls]}"
            ) from None

    def removal(self, name: str) -> str:
        """``" (removed in ...: why)"`` where ``name`` is an implementation this op removed, else ``""``:
        for the refusals of a name passed in code (the environment's is warned about and ignored)."""
        why = self.removed.get(name)
        return f" ({why})" if why else ""

    def __contains__(self, name: object) -> bool:
        # Mapping's default asks __getitem__ and expects KeyError; ours raises GroupedOpsError,
        # which would turn every `name in registry` for an unknown name into an error.
        return name in self._impls

    def __iter__(self) -> Iterator[str]:
        return iter(self._impls)

    def __len__(self) -> int:
        return len(self._impls)
