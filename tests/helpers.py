"""Plain helpers shared by the tests: a fake timer, argument makers, and small cache probes.

A fake timer is ``timer(name, fn, number) -> seconds per call``; installing one with
``dispatch.use_timer`` makes the tuner believe whatever the test says about each implementation.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

import grouped_ops
from grouped_ops import use_impl
from grouped_ops.ops import SPECS
from grouped_ops.signature import Signature
from grouped_ops.tuning import store


class FakeTimer:
    """Says each implementation takes ``times[name]`` seconds (a number, or a function of how many
    times that name has been timed), optionally raising, sleeping or really running ``fn``."""

    def __init__(self, times: dict[str, Any] | None = None, *, default: float = 1e-4, run: bool = False,
                 sleep: float = 0.0, fail: dict[str, Callable[[int], BaseException | None]] | None = None):
        self.times, self.default, self.run, self.sleep = dict(times or {}), default, run, sleep
        self.fail = dict(fail or {})
        self.calls: collections.Counter[str] = collections.Counter()
        self.results: dict[str, Any] = {}
        self.compiling: list[bool] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
        with self._lock:
            self.calls[name] += 1
            count = self.calls[name]
        self.compiling.append(torch.compiler.is_compiling())
        if self.run:
            self.results[name] = fn()
        if self.sleep:
            time.sleep(self.sleep)
        if name in self.fail and (exc := self.fail[name](count)) is not None:
            raise exc
        t = self.times.get(name, self.default)
        return t(count) if callable(t) else t


class NoisyTimer:
    """Each implementation's true time ``times[name]`` (else ``default``), off by up to ``jitter``
    (relative, uniform) in every sample, and one sample in ``every`` (at random) ``factor`` times
    slow: a shared machine's preempted thread. Seeded: a test sees the same samples every run."""

    def __init__(self, times: dict[str, float] | None = None, *, default: float = 1e-4, jitter: float = 0.02,
                 every: int = 20, factor: float = 20.0, seed: int = 0):
        self.times, self.default, self.jitter, self.every, self.factor = dict(times or {}), default, jitter, every, factor
        self.rng = random.Random(seed)
        self.calls = 0

    def __call__(self, name: str, fn: Callable[[], Any], number: int) -> float:
        self.calls += 1
        t = self.times.get(name, self.default) * (1 + self.rng.uniform(-self.jitter, self.jitter))
        return t * self.factor if self.rng.random() < 1 / self.every else t


def gl_args(batch: int = 8, n: int = 4, inn: int = 8, out: int = 8, *, grad: bool = False,
            bias: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)  # never the global RNG: some tests watch it
    x = torch.randn(batch, n, inn, generator=g)
    w = torch.randn(n, out, inn, generator=g).requires_grad_(grad)
    b = torch.randn(n, out, generator=g).requires_grad_(grad) if bias else None
    return x, w, b


def wc_args(batch: int = 8, k: int = 4, f: int = 16, *, as_list: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if as_list:
        inputs: Any = [torch.randn(batch, f, generator=g) for _ in range(k)]
    else:
        inputs = torch.randn(batch, k, f, generator=g)
    return inputs, torch.softmax(torch.randn(batch, k, generator=g), -1)


def group_major(y: torch.Tensor) -> bool:
    """Whether ``y [..., n, out]`` keeps grouped_linear's output contract: group-major in memory
    (``[n, ..., out]``, the strides of ``registry.group_major_strides``; dims of size 1 may have any
    stride) and a tensor of its own (``_base is None``: not a view, aliasing nothing)."""
    return y.movedim(-2, 0).is_contiguous() and y._base is None and not y._is_view()


def replace_impl(monkeypatch, op: str, name: str, fn: Callable[..., Any]) -> None:
    """Swap one implementation's function for the rest of the test (Implementation is frozen); its
    ``prepare`` goes too, being a specialisation of the function replaced."""
    registry = SPECS[op].registry
    monkeypatch.setitem(registry._impls, name, dataclasses.replace(registry._impls[name], fn=fn, prepare=None))


def disk_entries() -> list[dict[str, Any]]:
    return list(store.DiskStore().entries())


def lookup_source(*args: Any) -> str | None:
    d = grouped_ops.lookup("grouped_linear", *args)
    return None if d is None else d.source


def make_stale(key: str) -> None:
    path = store.DiskStore().path_for(key)
    entry = json.loads(path.read_text())
    entry["fingerprint"]["torch"] = "0.0.1"
    path.write_text(json.dumps(entry))


def gl_request(batch: int = 8, **kwargs: Any) -> tuple[Signature, Signature]:
    with grouped_ops.record() as rec, use_impl("loop"):
        grouped_ops.grouped_linear(*gl_args(batch, **kwargs))
    return rec.requests()[0]


def gl_sig(**kw: Any) -> Signature:
    dims = {"batch": 8, "n": 4, "in": 16, "out": 16} | {k: v for k, v in kw.items() if k in ("batch", "n", "in", "out")}
    return Signature(
        op="grouped_linear", dims=tuple(dims.items()), dtype=kw.get("dtype", torch.bfloat16),
        device=torch.device(kw.get("device", "cpu")),
        layout=(("input", "contiguous"), ("weight", kw.get("weight", "contiguous")), ("bias", "yes")),
        grad=kw.get("grad", ()))


# ---- pytest-benchmark ------------------------------------------------------------------------------

BENCH_ROUND_S = 5e-3  # a round repeats the call until it lasts about this long
BENCH_TEST_S = 0.3  # rounds per test: about this much measuring, 5..30 rounds


def run_benchmark(benchmark: Any, step: Callable[[], Any], warmups: int = 1) -> None:
    """Benchmark ``step`` with a fixed, load-independent amount of work (pytest-benchmark's own
    calibration sizes its rounds from the fastest warm-up round, so a busy machine multiplies the
    time a test takes). ``warmups`` calls come first (a first call tunes, or compiles)."""
    for _ in range(warmups):
        step()
    t0 = time.perf_counter()
    step()
    once = max(time.perf_counter() - t0, 1e-7)
    iterations = max(1, math.ceil(BENCH_ROUND_S / once))
    rounds = max(5, min(30, math.ceil(BENCH_TEST_S / (once * iterations))))
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
