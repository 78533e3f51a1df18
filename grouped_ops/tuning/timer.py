"""Timers: how long one call of a candidate takes.

A timer is ``timer(name, fn, number) -> seconds per call``, timing ``number`` back-to-back calls of
``fn``. The tuner takes any such callable, so tests pass a fake one and need no GPU and no clock.
"""

from __future__ import annotations

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
    """

    def __init__(self, device: torch.device | int | None = None) -> None:
        self.device = _index(device)

    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(number):
                fn()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number

    def __repr__(self) -> str:
        return f"CudaTimer(cuda:{self.device})"


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
    """A timer bound to ``device``: CUDA events on its current stream, else the wall clock."""
    return CudaTimer(device) if device.type == "cuda" else cpu_timer
