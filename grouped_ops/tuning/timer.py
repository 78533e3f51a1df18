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


def cuda_timer(name: str, fn: Callable[[], Any], number: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / number


def timer_for(device: torch.device) -> Timer:
    return cuda_timer if device.type == "cuda" else cpu_timer
