"""Timing: every variant of a cell round-robin with the tuner's timer; the machine's copy and matmul rates."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..registry import tolerance
from ..tuning.timer import timer_for
from .cells import Env, Result, Variant

# ---- measuring -----------------------------------------------------------------------------------

def _grad_mode(pass_: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    return torch.no_grad if pass_ == "fwd" else torch.enable_grad


def _sampler(env: Env, pass_: str) -> Callable[[Callable[[], Any], int], float]:
    """Seconds per call of ``fn`` over ``number`` calls, with the tuner's own clocks (perf_counter
    on CPU, CUDA events on GPU), under the pass's grad mode."""
    mode, timer = _grad_mode(pass_), timer_for(env.device)

    def sample(fn: Callable[[], Any], number: int) -> float:
        with mode():
            return timer("", fn, number)
    return sample


def _rel_err(ref: Tensor, got: Tensor) -> float:
    if ref.shape != got.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    a, b = ref.detach().double(), got.detach().double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:160]


def _measure(variants: list[Variant], env: Env, pass_: str, dtype: torch.dtype) -> dict[str, Result]:
    """Warm up and check every variant, then time them round-robin within the cell's time cap."""
    results = {v.name: Result(v.status) for v in variants}
    sample = _sampler(env, pass_)
    mode = _grad_mode(pass_)
    live: dict[str, Callable[[], Any]] = {}
    number: dict[str, int] = {}
    samples: dict[str, list[float]] = {}
    reference: Tensor | None = None
    gc.collect()
    for v in variants:
        if v.fn is None:
            continue
        if v.known is not None:
            results[v.name] = Result("ok", v.known, v.known, v.known, 1, 0)
            continue
        try:
            env.sync()
            t0 = time.perf_counter()
            with mode():
                out = v.fn()
            env.sync()
            first = time.perf_counter() - t0
            if not v.check:
                pass
            elif reference is None:
                reference = out.detach()
            else:
                err = _rel_err(reference, out)
                if not err <= tolerance(dtype).agree:  # grouped_ops.registry.TOLERANCE
                    results[v.name] = Result(f"mismatch: relative error {err:.2e} against the first column")
                    continue
            del out
            if first >= env.cell_time:  # too slow to repeat: its one (warm-up) call is all we report
                results[v.name] = Result("ok", first, first, first, 1, 1)
                continue
            # a second warm-up call gives the calibration time, unless the first was already long
            est = sample(v.fn, 1) if first < env.cell_time / 4 else first
        except Exception as e:  # an OOM or an unsupported corner: report it, keep going
            # a peer that raises is a limitation of that peer (e.g. grouped_mm's dtypes), ours is a bug
            results[v.name] = Result(f"{'n/a: raised' if v.kind == 'peer' else 'error:'} {_short(e)}")
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        live[v.name] = v.fn
        number[v.name] = max(1, min(100_000, math.ceil(env.min_sample / max(est, 1e-9))))
        samples[v.name] = []

    # Round-robin: one sample of every live variant per round, in a fresh shuffled order each round
    # (seeded). A rotation is not enough: it keeps the cyclic order, so a variant would always follow
    # the same neighbour (e.g. auto after masked_dense's large allocations) and carry its cache and
    # allocator after-effects in every sample (measured: a 1.6x bias on one cell). Each variant has
    # an equal share of the cell's time cap; one whose next sample would overrun its share sits out
    # (after its first sample), so a slow column cannot starve the fast ones of samples.
    names = list(live)
    share = env.cell_time / max(len(names), 1)
    spent = dict.fromkeys(names, 0.0)
    last = dict.fromkeys(names, 0.0)
    order = random.Random(env.seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(env.reps):
            active = [n for n in names if not samples[n] or spent[n] + last[n] <= share]
            if not active:
                break
            order.shuffle(active)
            for name in active:
                t0 = time.perf_counter()
                try:
                    samples[name].append(sample(live[name], number[name]))
                except Exception as e:
                    results[name] = Result(f"error: {_short(e)}")
                    names.remove(name)
                last[name] = time.perf_counter() - t0
                spent[name] += last[name]
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in names:
        s = samples[name]
        if not s:
            continue
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        results[name] = Result("ok", statistics.median(s), q[0], q[2], len(s), number[name])
    return results


def _measure_rates(device: torch.device, dtypes: list[torch.dtype], light: bool) -> tuple[float, dict[torch.dtype, float]]:
    """Bytes/s of a large copy and FLOP/s of a large matmul per dtype, measured on ``device``."""
    cuda = device.type == "cuda"
    timer = timer_for(device)  # the tuner's clocks: perf_counter on CPU, CUDA events on GPU

    def best_of(fn: Callable[[], Any], reps: int) -> float:
        fn()
        return min(timer("rate", fn, 1) for _ in range(reps))

    nbytes = (1 << 30) if cuda else (32 << 20 if light else 128 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    bandwidth = 2 * nbytes / best_of(lambda src=src, dst=dst: dst.copy_(src), 5)  # read + write
    del src, dst
    rates = {}
    for dtype in dict.fromkeys([torch.float32, *dtypes]):
        size = 8192 if cuda else (512 if light else 1536)
        a = torch.randn(size, size, device=device).to(dtype)
        bm = torch.randn(size, size, device=device).to(dtype)
        rates[dtype] = 2 * size**3 / best_of(lambda a=a, bm=bm: a @ bm, 3)
        del a, bm
    return bandwidth, rates


def _free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float(4 << 30)
