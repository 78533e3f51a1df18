"""What a tuning may take of memory: the bytes of a call, by arithmetic on its signature; which
candidates a tuning may time; which implementation runs when none can be timed; out-of-memory
errors as every device raises them.

A tuning times each candidate on private operands, so its peak is the private operands, the
reference result it compares the others with (and its gradients), the incoming gradient of a
training signature, and the candidate's own footprint: its result, gradients and workspace
(``Implementation.extra_memory``). Two bounds apply to a candidate's footprint (docs/autotuner.md,
"What it will never do"):

- relative: at most ``GROUPED_OPS_TUNE_MEMORY_MULTIPLE`` times the leanest supported
  implementation's footprint for the same signature (or :data:`FLOOR_BYTES`, whichever is more),
  so that a first call needs about what the call itself needs, not what the hungriest candidate
  needs (masked_dense's block-diagonal weight is n times the weights);
- absolute: with the tuning's private bytes, within the tuning memory budget
  (:func:`~.settings.memory_budget`: a share of the memory free now). A candidate left out by this
  one makes the decision partial (``"out of memory: ..."``): another process may have more room.

Knows no op by name: it receives the op's spec.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
from collections.abc import Collection, Iterable
from typing import Any

import torch

from ..signature import Signature
from .settings import Settings

log = logging.getLogger("grouped_ops")

#: A candidate whose footprint is at most this is never left out by the relative bound: for small
#: calls the tuning's fixed costs (the interpreter, torch's allocator) are larger anyway, and it
#: keeps masked_dense timed where its block-diagonal weight is small (it wins only there).
FLOOR_BYTES = 16 << 20

_WARNED: set[str] = set()  # signatures whose "nothing fits" was logged (once each)


def call_bytes(spec: Any, sig: Signature) -> tuple[int, int, int]:
    """(operands, result, gradients) in bytes for a call of ``sig``: from the op's ``call_bytes``
    (arithmetic), else by sizing ``make_inputs`` and ``fake`` on the meta device."""
    if spec.call_bytes is not None:
        return tuple(spec.call_bytes(sig))  # type: ignore[return-value]
    meta_sig = dataclasses.replace(sig, device=torch.device("meta"))
    with torch.autocast("cpu", enabled=False):
        args = spec.make_inputs(meta_sig, torch.Generator().manual_seed(0))
    flat = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]
    operands = sum(t.untyped_storage().nbytes() for t in flat)
    result = spec.fake(*args).nbytes if spec.fake is not None else operands
    grads = sum(t.numel() * t.element_size() for t in spec.grad_args(meta_sig, args)) if sig.needs_grad else 0
    return operands, result, grads


def footprint(spec: Any, sig: Signature, name: str) -> int:
    """Bytes a call of ``sig`` through implementation ``name`` allocates: its result, the
    gradients (training), and the implementation's workspace."""
    _, result, grads = call_bytes(spec, sig)
    return result + grads + int(spec.registry[name].extra_memory(sig))


def private_bytes(spec: Any, sig: Signature) -> int:
    """Bytes a tuning of ``sig`` holds besides the candidate it runs: its private operands, the
    reference result and gradients the others are checked against, and (training) the incoming
    gradient it back-propagates."""
    operands, result, grads = call_bytes(spec, sig)
    return operands + result + grads + (result if sig.needs_grad else 0)


def leanest(spec: Any, sig: Signature, names: Iterable[str]) -> str | None:
    """The implementation among ``names`` with the smallest footprint (ties: registry order)."""
    order = {n: i for i, n in enumerate(spec.registry)}
    return min(names, key=lambda n: (footprint(spec, sig, n), order[n]), default=None)


def admit(spec: Any, sig: Signature, names: list[str], s: Settings, budget: float
          ) -> tuple[list[str], dict[str, str], list[str]]:
    """Which of the supported ``names`` a tuning of ``sig`` may time: (admitted, skipped with the
    reason, the names left out by the absolute budget alone)."""
    private = private_bytes(spec, sig)
    lean = leanest(spec, sig, names)
    if lean is None:
        return [], {}, []
    bound = max(s.memory_multiple * footprint(spec, sig, lean), FLOOR_BYTES)
    admitted, skipped, over = [], {}, []
    for name in names:
        need = footprint(spec, sig, name)
        if need > bound:
            floor = f", and over the {_size(FLOOR_BYTES)} always allowed" if bound == FLOOR_BYTES else ""
            skipped[name] = (f"needs {_size(need)} for the call (result, gradients, workspace), over "
                             f"{s.memory_multiple:g}x the leanest implementation's {_size(footprint(spec, sig, lean))} "
                             f"({lean}; GROUPED_OPS_TUNE_MEMORY_MULTIPLE){floor}")
        elif need + private > budget:
            skipped[name] = (f"needs {_size(need)} for the call and {_size(private)} for the tuning's private "
                             f"operands, over the tuning memory budget of {_size(budget)} "
                             "(GROUPED_OPS_TUNE_MEMORY_FRACTION/_BYTES)")
            over.append(name)
        else:
            admitted.append(name)
    return admitted, skipped, over


def nothing_fits(spec: Any, sig: Signature, names: Collection[str], budget: float) -> str:
    """The implementation a call runs when no candidate could be timed for memory: the leanest of
    ``names`` (the op's default may need far more). Logged once per signature."""
    lean = leanest(spec, sig, names)
    assert lean is not None
    if sig.key() not in _WARNED:
        _WARNED.add(sig.key())
        log.warning("grouped_ops: %s: no implementation could be timed for %s within the tuning memory "
                    "budget of %s; running the leanest, %s (%s for the call)", spec.name, sig, _size(budget),
                    lean, _size(footprint(spec, sig, lean)))
    return lean


def release_freed(device: torch.device) -> None:
    """On CPU with glibc: hand the heap's free pages back to the kernel (``malloc_trim(0)``).

    glibc serves a large block with a fresh mapping only until the first such block is freed;
    from then on blocks up to 32 MiB come from the heap, and freed ones stay resident. A tuning
    allocates and frees each candidate's buffers in turn, so without this its peak resident set
    grew by the retained blocks (measured: 185 MiB against 80 MiB of live tensors, grouped_linear
    batch 512, 8 groups of 1024->1024). Called between candidates, never inside a timed sample."""
    if device.type != "cpu":
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def guarded(timer: Any, device: torch.device) -> Any:
    """``timer``, handing freed heap pages back (:func:`release_freed`) after any sample that left
    more than :data:`FLOOR_BYTES` more free in glibc's heap than there was at the start or after the
    last release: glibc keeps up to 64 MiB freed at the top of the heap, and more in holes, which
    rounds of candidates of different sizes would add to the tuning's peak. Outside the timed
    sample; on CPU only (with glibc).

    Counted from the last release, not from zero: released pages still count as free
    (``mallinfo2``), so a process whose heap held over the floor free (any process that freed a
    few large tensors) released after every sample, and every sample then faulted its buffers in
    again. That cost the candidates that allocate most (measured: gather_bmm timed at 1.62 ms
    instead of 0.33 ms, 120 releases in one tuning with 100 MiB free in the heap, and grouped_mm
    picked; docs/ragged.md)."""
    if device.type != "cpu" or _malloc_trim() is None or _heap_free() is None:
        return timer
    kept = [_heap_free() or 0]  # free bytes at the start, or after the last release

    def timed(name: str, fn: Any, number: int) -> float:
        t = timer(name, fn, number)
        if (_heap_free() or 0) > kept[0] + FLOOR_BYTES:
            release_freed(device)
            TRIMS[0] += 1
            kept[0] = _heap_free() or 0
        return t
    return timed


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_free() -> int | None:
    """Bytes glibc's heap holds free (``mallinfo2().fordblks``), or None without glibc 2.33+."""
    info = _mallinfo2()
    return None if info is None else int(info().fordblks)


@functools.cache
def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


TRIMS = [0]  # how many times guarded() released pages (for measurements)


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out: CUDA's (``torch.OutOfMemoryError``, or a
    RuntimeError saying "out of memory"), the CPU allocator's ("DefaultCPUAllocator: can't
    allocate memory"), or Python's ``MemoryError``."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def oom_partial(names: Iterable[str]) -> str:
    """The partial state of a decision some of whose candidates did not fit: ``"out of memory: a, b"``."""
    return "out of memory: " + ", ".join(dict.fromkeys(names))


def _size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
