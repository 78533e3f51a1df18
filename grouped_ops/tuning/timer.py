"""Timers: how long one call of a candidate takes.

A timer is ``timer(name, fn, number) -> seconds per call``, timing ``number`` back-to-back calls of
``fn``. The tuner takes any such callable, so tests pass a fake one and need no GPU and no clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch


class Timer(Protocol):
    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float: ...


def cpu_timer(name: str, fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


class CudaTimer:
    """Times with CUDA events on the current stream *of* ``device``, with ``device`` made current.

    Events record on the current device's current stream. With the tensors on ``cuda:1`` while
    ``cuda:0`` is current, events on ``cuda:0`` would time the launches, not the kernels; so both
    the launches and the events run inside ``torch.cuda.device(device)``, on that device's stream
    (a user's side stream included: ``torch.cuda.stream(s)`` sets the current stream of s's device).

    By default the ``number`` calls run back to back between two events: the operands stay warm in
    L2 and the launch overhead counts where it exceeds the kernels (as it does in eager use). With
    ``flush_l2`` (or ``GROUPED_OPS_TIMER_FLUSH_L2=1`` for :func:`timer_for`), as triton's
    ``do_bench``: before each call a buffer of twice the L2 size is zeroed, each call is timed by
    its own event pair and only the calls are summed: cold operands, and no launch overhead
    (docs/gpu.md says why this is not the default).
    """

    def __init__(self, device: torch.device | int | None = None, flush_l2: bool = False) -> None:
        self.device = _index(device)
        self.flush_l2 = flush_l2

    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if self.flush_l2:
                return self._flushed(fn, number, stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(number):
                fn()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number

    def _flushed(self, fn: Callable[[], Any], number: int, stream: Any) -> float:
        buffer = l2_buffer(self.device)  # freed on return: a tuning keeps no workspace
        pairs = []
        for _ in range(number):
            buffer.zero_()  # evicts the operands (and the previous call's results) from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            pairs.append((start, end))
        pairs[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in pairs) / 1e3 / number

    def __repr__(self) -> str:
        return f"CudaTimer(cuda:{self.device}{', flush_l2' if self.flush_l2 else ''})"


def l2_buffer(index: int) -> torch.Tensor:
    """A buffer whose zeroing evicts the L2 cache of device ``index``: twice its L2 size (tests patch this)."""
    size = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 64 << 20
    return torch.empty(2 * size, dtype=torch.uint8, device=torch.device("cuda", index))


def _index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is None or device.index is None:  # "cuda" means the current device, as torch reads it
        return torch.cuda.current_device()
    return device.index


def cuda_timer(name: str, fn: Callable[[], Any], number: int) -> float:
    """The current device's timer (kept for callers that time on whatever device is current)."""
    return CudaTimer()(name, fn, number)


def timer_for(device: torch.device) -> Timer:
    """A timer bound to ``device``: CUDA events on its current stream (flushing L2 between calls
    with ``GROUPED_OPS_TIMER_FLUSH_L2=1``), else the wall clock."""
    if device.type != "cuda":
        return cpu_timer
    return CudaTimer(device, flush_l2=os.environ.get("GROUPED_OPS_TIMER_FLUSH_L2", "0") not in ("", "0"))
