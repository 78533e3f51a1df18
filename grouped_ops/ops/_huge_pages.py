"""Huge pages for the large fresh buffers an implementation writes (weight gradients).

glibc serves an allocation of 32 MiB or more (the ceiling of its dynamic mmap threshold on 64-bit
Linux) with a fresh ``mmap`` every time, and hands it back with ``munmap`` when it is freed. A
weight gradient that large (Mixtral-like experts' ``gate_up_proj`` in float32: 8 x 2048 x 512) is
therefore faulted in 4 KiB page by page on every training step, since ``zero_grad()`` frees it:
16 ms for 32 MiB measured on this project's AMD EPYC VM, which was most of a T=1 training step.
Advising transparent huge pages before the first touch (``madvise(MADV_HUGEPAGE)``, for kernels
whose THP mode is ``madvise``, the usual default) faults the same buffer in 2 MiB pages: 4.4 ms.
Smaller buffers are left alone: glibc re-uses freed heap memory for them, with no fault at all.

torch's ``THP_MEM_ALLOC_ENABLE=1`` advises every CPU allocation of 2 MiB or more, process-wide
(read once, at torch's first allocation); it was measured slower for heap-served buffers (a
Qwen3-MoE-like training step, 7 -> 12 ms), which is why this advises only what glibc maps fresh.

``GROUPED_OPS_HUGE_PAGES=0`` turns it off (read at each such allocation): on a host whose THP
``defrag`` setting makes a fault in an advised region compact memory first, a fragmented machine
could stall there instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any

import torch

from ..registry import contiguous_strides

#: glibc's mmap threshold ceiling on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): from this size an
#: allocation is a fresh mapping every time.
FRESH_MAPPING_BYTES = 32 << 20
_PAGE = 4096
_MADV_HUGEPAGE = 14


#: Set to 0 to allocate every buffer as torch does (no advice, and grouped_mm's own backward).
ENV = "GROUPED_OPS_HUGE_PAGES"


def fresh_mapping(like: torch.Tensor) -> bool:
    """Whether a CPU buffer the size of ``like`` is a fresh mapping each time it is allocated, and
    is to be advised huge pages (unless ``GROUPED_OPS_HUGE_PAGES=0``)."""
    return (like.device.type == "cpu" and like.numel() * like.element_size() >= FRESH_MAPPING_BYTES
            and os.environ.get(ENV, "1").strip() != "0")


def empty_strided(shape: Any, stride: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty_strided``, advised huge pages where it is a fresh CPU mapping on Linux."""
    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if fresh_mapping(t):
        advise(t)
    return t


def empty(shape: Any, like: torch.Tensor) -> torch.Tensor:
    """A contiguous :func:`empty_strided` in ``like``'s dtype and device."""
    return empty_strided(shape, contiguous_strides(tuple(shape)), like.dtype, like.device)


def advise(t: torch.Tensor) -> None:
    """Advise huge pages for the whole pages of ``t``'s storage (no-op where that is not possible)."""
    madvise = _madvise()
    if madvise is None:
        return
    start = (t.untyped_storage().data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
    end = (t.untyped_storage().data_ptr() + t.untyped_storage().nbytes()) & ~(_PAGE - 1)
    if end > start:
        madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal (EINVAL) changes nothing


@functools.cache
def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn
