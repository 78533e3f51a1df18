"""The benchmark sweep behind ``python -m grouped_ops bench``.

Times every implementation of each op (forced with ``impl=``), ``auto`` after
:func:`grouped_ops.prewarm`, and the code a user would otherwise write (the peers), over a grid of
shapes, dtypes and passes (forward, forward + backward). Variants of one cell are timed round-robin
(rep 1 of every variant, then rep 2, ...) so machine noise hits them alike; each sample repeats a
call until it lasts ``--min-sample-ms``; the median sample is reported. ``perf_counter`` on CPU,
CUDA events on GPU; fixed seeds. Cells that would not fit in memory or would be absurdly slow are
estimated first and skipped with the reason in the table.

The CLI (``grouped_ops/__main__.py``) wires :func:`configure_parser` and :func:`run` as the
``bench`` subcommand; ``docs/benchmarks/README.md`` explains the columns and how to reproduce.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, dispatch
from .api import prewarm
from .functional import grouped_linear, weighted_combine
from .ops import SPECS
from .signature import _cpu_model, device_name
from .tuning.settings import settings as tuning_settings
from .tuning.timer import timer_for

__all__ = ["configure_parser", "run"]

GL, WC, SEED = "grouped_linear", "weighted_combine", "seed"
PASSES = ("fwd", "fwdbwd")
PASS_TITLE = {"fwd": "forward", "fwdbwd": "forward + backward"}
# the code users write today, that auto is compared against
BASELINE = {GL: "nn.ModuleList", WC: "stack_mul_sum"}
PEERS = {GL: ("nn.ModuleList", "func.vmap", "F.grouped_mm"), WC: ("stack_mul_sum", "python_loop")}
# relative-error tolerance of the one-off agreement check (the tuner's, see dispatch._TOLERANCE)
TOLERANCE = {torch.float64: 1e-7, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


# ---- grids ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    batch: tuple[int, ...]
    n: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # per-group (in, out)
    k: tuple[int, ...]
    wc_shapes: tuple[tuple[int, ...], ...]  # (batch, *features): 3 features = conv-like, 1 = MLP-like
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    # per device type: seconds of timing per cell, and the GFLOP per call above which a cell (or a
    # variant, e.g. masked_dense doing n x the arithmetic) is skipped. A FLOP cap, not a time
    # estimate, so that which cells run does not depend on how busy the machine was.
    cell_time: dict[str, float]
    max_gflop: dict[str, float]
    max_workspace_gb: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "cuda": math.inf})


def _square(*sizes: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, s) for s in sizes)


GRIDS: dict[str, Grid] = {
    "quick": Grid(
        batch=(16, 256), n=(8, 32), sizes=_square(32), k=(4,),
        wc_shapes=((16, 32, 16, 16), (64, 256)), dtypes=("float32",), ops=(GL, WC),
        cell_time={"cpu": 0.15, "cuda": 0.2}, max_gflop={"cpu": 1.0, "cuda": 50.0},
    ),
    "default": Grid(
        batch=(1, 128, 2048), n=(4, 32), sizes=_square(32, 1024), k=(2, 8),
        wc_shapes=((16, 64, 32, 32), (256, 1024)), dtypes=("float32",), ops=(GL, WC),
        cell_time={"cpu": 1.0, "cuda": 0.5}, max_gflop={"cpu": 8.0, "cuda": 20000.0},
    ),
    "full": Grid(
        batch=(1, 16, 128, 512, 2048), n=(4, 8, 32, 64), sizes=_square(8, 32, 128, 1024), k=(2, 4, 8, 16),
        wc_shapes=((16, 64, 32, 32), (64, 256, 8, 8), (16, 256), (256, 1024), (2048, 1024)),
        dtypes=("float32", "bfloat16"), ops=(GL, WC, SEED),
        cell_time={"cpu": 0.6, "cuda": 0.5}, max_gflop={"cpu": 8.0, "cuda": 20000.0},
    ),
}
CUDA_EXTRA_DTYPES = ("float16",)  # the full grid adds these on CUDA
SEED_CAP_FACTOR = 4  # the seed check's cells may do this many times --max-gflop


# ---- command line --------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        shapes = tuple(tuple(int(d) for d in item.lower().split("x")) for item in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shapes like 16x64x32x32,256x1024, got {text!r}") from None
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"each shape is BATCHxF1[xF2...], got {text!r}")
    return shapes


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (the ``python -m grouped_ops bench`` subcommand)."""
    parser.description = ("Benchmark every implementation, auto (after prewarm) and the peers users write "
                          "today, over a grid of shapes; see docs/benchmarks/README.md.")
    g = parser.add_argument_group("grid")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="grid", const="quick",
                      help="a small grid (well under 30 s on a 2-core CPU)")
    size.add_argument("--full", action="store_const", dest="grid", const="full",
                      help="the whole grid: batch 1..2048, n 4..64, per-group 8..1024, float32 and bfloat16 "
                           "(float16 too on CUDA), both ops, and the seed-000 check")
    parser.set_defaults(grid="default")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    g.add_argument("--dtypes", type=_names, help="comma-separated, e.g. float32,bfloat16,float16")
    g.add_argument("--ops", type=_names,
                   help=f"comma-separated among {GL},{WC},{SEED} ({SEED} = the seed-000 check)")
    g.add_argument("--passes", type=_names, help="fwd, fwdbwd or fwd,fwdbwd (default both)")
    g.add_argument("--batch", type=_ints, help="grouped_linear batch sizes, e.g. 1,16,128")
    g.add_argument("--n", type=_ints, help="grouped_linear group counts, e.g. 4,32")
    g.add_argument("--in", dest="in_", type=_ints, metavar="IN",
                   help="per-group input sizes; alone: square in=out")
    g.add_argument("--out", type=_ints, help="per-group output sizes (with --in: every in x out pair)")
    g.add_argument("--k", type=_ints, help="weighted_combine branch counts, e.g. 2,4,8,16")
    g.add_argument("--wc-shapes", type=_shapes, metavar="SHAPES",
                   help="weighted_combine [batch x features] shapes, e.g. 16x64x32x32,256x1024")
    g.add_argument("--variants", type=_names,
                   help="only these columns (implementation names, auto, peer names)")
    g.add_argument("--check-seed", action="store_true",
                   help=f"run only the seed-000 claims check (same as --ops {SEED})")
    t = parser.add_argument_group("timing")
    t.add_argument("--cell-time", type=float, help="seconds of timing per cell (cap); default per grid")
    t.add_argument("--max-gflop", type=float,
                   help="skip a cell or variant doing more GFLOP per call than this (default per grid and device)")
    t.add_argument("--max-workspace-gb", type=float,
                   help="skip a variant needing more extra memory than this, e.g. masked_dense's "
                        "block-diagonal weight (default 1 on CPU: a 4 GiB one takes ~10 s a call)")
    t.add_argument("--max-mem-gb", type=float,
                   help="skip what needs more memory (default: half the free memory)")
    t.add_argument("--reps", type=int, default=15, help="samples per variant at most (default 15)")
    t.add_argument("--min-sample-ms", type=float, default=1.0,
                   help="a sample repeats a call until it lasts this long (default 1 ms)")
    t.add_argument("--seed", type=int, default=0, help="RNG seed of the inputs (default 0)")
    t.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU)")
    t.add_argument("--tune-budget", type=float,
                   help="GROUPED_OPS_TUNE_BUDGET_S for auto's prewarm (default: the library's)")
    t.add_argument("--cache", choices=("temp", "user"), default="temp",
                   help="auto tunes into a fresh temporary cache (default) or your user cache")
    o = parser.add_argument_group("output")
    o.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    o.add_argument("--csv", metavar="FILE", help="write one row per cell and variant")
    o.add_argument("--json", metavar="FILE", help="write everything, machine info included")
    o.add_argument("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    o.add_argument("--dry-run", action="store_true", help="list the cells and what would be skipped, time nothing")
    o.add_argument("--from-json", type=_names, metavar="FILES",
                   help="measure nothing: re-render (and merge) earlier --json outputs into the chosen outputs")
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop starting new cells after this long; what was measured is still written")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- results -------------------------------------------------------------------------------------

@dataclass
class Result:
    status: str = "ok"  # ok, or "n/a: why", "skipped: why", "error: why", "mismatch: why"
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    reps: int = 0
    number: int = 0  # calls per sample; 0: taken from the tuner's timing (too slow to run again)

    @property
    def ok(self) -> bool:
        return self.median_s is not None and self.status == "ok"


@dataclass
class Cell:
    op: str  # grouped_linear, weighted_combine, or seed (grouped_linear shapes of the seed check)
    dtype: torch.dtype
    pass_: str
    dims: dict[str, Any]
    claim: str = ""  # seed check: which claim this cell tests
    skipped: str | None = None
    results: dict[str, Result] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # variant -> impl | auto | peer
    auto_impl: str | None = None
    auto_source: str | None = None
    tune_s: float | None = None
    elapsed_s: float | None = None  # wall time of the whole cell: inputs, prewarm, warm-ups, samples
    flops: float = 0.0
    bytes_moved: float = 0.0
    mem_bytes: float = 0.0
    floor_s: float | None = None
    bound: str = ""

    @property
    def label(self) -> str:
        d = self.dims
        if self.op in (GL, SEED):
            return f"batch={d['batch']} n={d['n']} {d['in']}->{d['out']}"
        shape = "x".join(str(v) for v in (d["batch"], d["k"], *d["features"]))
        return f"[{shape}] {d['layout']}"

    def time(self, name: str) -> float | None:
        r = self.results.get(name)
        return r.median_s if r is not None and r.ok else None

    def best_impl(self) -> tuple[str, float] | None:
        ok = [(t, n) for n, k in self.kinds.items() if k == "impl" and (t := self.time(n)) is not None]
        return (min(ok)[1], min(ok)[0]) if ok else None

    def fastest(self) -> str | None:
        """The fastest implementation or peer (auto is one of the implementations, timed again)."""
        ok = [(t, n) for n in self.results if n != "auto" and (t := self.time(n)) is not None]
        return min(ok)[1] if ok else None

    def auto_vs_baseline(self) -> float | None:
        base, auto = self.time(BASELINE.get(self.op if self.op != SEED else GL, "")), self.time("auto")
        return base / auto if base and auto else None

    def auto_over_best(self) -> float | None:
        best, auto = self.best_impl(), self.time("auto")
        return auto / best[1] if best and auto else None

    def floor_fraction(self) -> float | None:
        auto = self.time("auto")
        return self.floor_s / auto if self.floor_s and auto else None

    def to_json(self) -> dict[str, Any]:
        best = self.best_impl()
        return {
            "op": self.op, "dtype": _dname(self.dtype), "pass": self.pass_, "dims": self.dims,
            "label": self.label, "claim": self.claim or None, "skipped": self.skipped,
            "auto_impl": self.auto_impl, "auto_source": self.auto_source, "tune_s": self.tune_s,
            "elapsed_s": self.elapsed_s,
            "best_impl": best[0] if best else None, "fastest": self.fastest(),
            "auto_vs_baseline": self.auto_vs_baseline(), "auto_over_best": self.auto_over_best(),
            "flops": self.flops, "bytes_moved": self.bytes_moved, "mem_bytes_est": self.mem_bytes,
            "floor_s": self.floor_s, "bound": self.bound, "auto_floor_fraction": self.floor_fraction(),
            "results": {n: {"kind": self.kinds.get(n), **r.__dict__} for n, r in self.results.items()},
        }


@dataclass
class Variant:
    name: str
    kind: str  # impl | auto | peer
    fn: Callable[[], Tensor] | None = None  # one call: forward (+ backward); returns the forward output
    status: str = "ok"
    known: float | None = None  # seconds a call, as the tuner just measured it: too slow to time again
    check: bool = True  # compare its output with the first column's (not for a different function)


@dataclass
class Env:
    device: torch.device
    cell_time: float
    max_gflop: float
    mem_cap: float
    max_workspace: float
    reps: int
    min_sample: float
    seed: int
    bandwidth: float  # bytes/s of a large copy
    matmul: dict[torch.dtype, float]  # FLOP/s of a large matmul
    wanted: tuple[str, ...] | None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def too_big(self, flops: float, cell: Cell, why: str = "") -> str | None:
        """Why a call of ``flops`` is not timed, or None. The seed check's few cells get 4x the cap:
        its per-group-size claim needs the 256-per-group point."""
        cap = self.max_gflop * (SEED_CAP_FACTOR if cell.op == SEED else 1)
        if flops <= cap * 1e9:
            return None
        est = self.floor(cell.dtype, flops, cell.bytes_moved)[0]
        return (f"{flops / 1e9:.3g} GFLOP per call{why}, over the --max-gflop cap of {cap:g} "
                f"(>= {_fmt_t(est)} a call here)")

    def floor(self, dtype: torch.dtype, flops: float, nbytes: float) -> tuple[float, str]:
        t_mem, t_flop = nbytes / self.bandwidth, flops / self.matmul.get(dtype, self.matmul[torch.float32])
        return max(t_mem, t_flop), ("compute" if t_flop >= t_mem else "memory")


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
                if not err <= TOLERANCE.get(dtype, 1e-2):
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


# ---- grouped_linear ------------------------------------------------------------------------------

def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
           scale: float = 1.0) -> Tensor:
    return (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _generator(env: Env, *salt: Any) -> torch.Generator:
    gen = torch.Generator(device=env.device)
    gen.manual_seed(env.seed * 1_000_003 + zlib.crc32(repr(salt).encode()) % 1_000_003)  # stable across runs
    return gen


def _gl_estimate(batch: int, n: int, inn: int, out: int, itemsize: int, pass_: str) -> tuple[float, float, float]:
    """(FLOPs, bytes that must move, bytes of memory the cell needs) for one call."""
    x, w, y = batch * n * inn, n * out * inn, batch * n * out
    factor = 1 if pass_ == "fwd" else 3  # backward: two more GEMMs of the same size (dX and dW)
    flops = 2.0 * batch * n * inn * out * factor
    moved = (x + w + y + n * out) * itemsize * factor
    # inputs, three weight copies (ours, ModuleList's, vmap's), outputs in flight; backward adds grads
    mem = (2 * x + 4 * w + 3 * y) * itemsize if pass_ == "fwd" else (4 * x + 6 * w + 5 * y) * itemsize
    return flops, moved, mem


def _pass_fn(pass_: str, forward: Callable[[], Tensor], targets: list[Tensor],
             gen: torch.Generator) -> Callable[[], Tensor]:
    if pass_ == "fwd":
        return forward
    grad_out: list[Tensor] = []

    def fwd_bwd() -> Tensor:
        y = forward()
        if not grad_out:  # one fixed upstream gradient, made on the first call
            grad_out.append(_randn(y.shape, y.dtype, y.device, gen))
        torch.autograd.grad(y, targets, grad_out[0])
        return y.detach()
    return fwd_bwd


def _grouped_mm_peer() -> Callable[..., Tensor] | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _impl_variants(op: str, args: tuple[Any, ...], call: Callable[..., Tensor], targets: list[Tensor],
                   cell: Cell, env: Env, gen: torch.Generator) -> list[Variant]:
    """One variant per registered implementation (forced via impl=), plus auto after prewarm."""
    spec = SPECS[op]
    with _grad_mode(cell.pass_)():
        sig = spec.signature(spec.meta(*args), False)
    variants = []
    for name, implementation in spec.registry.items():
        reasons = implementation.not_supported_reasons(sig)
        if reasons:
            variants.append(Variant(name, "impl", status="n/a: " + "; ".join(reasons)))
            continue
        extra = implementation.extra_memory(sig)
        factor = implementation.work_factor(sig)
        if extra + cell.mem_bytes > env.mem_cap or extra > env.max_workspace:
            cap = min(env.mem_cap - cell.mem_bytes, env.max_workspace)
            variants.append(Variant(name, "impl", status=f"skipped: needs ~{_gib(extra)} of workspace, "
                                    f"over the {_gib(max(cap, 0))} cap (--max-workspace-gb/--max-mem-gb)"))
        elif (why := env.too_big(cell.flops * factor, cell, f" ({factor:.0f}x the arithmetic)")) is not None:
            variants.append(Variant(name, "impl", status=f"skipped: {why}"))
        else:
            def fwd(name: str = name) -> Tensor:
                return call(*args, impl=name)
            variants.append(Variant(name, "impl", _pass_fn(cell.pass_, fwd, targets, gen)))
    try:
        t0 = time.perf_counter()
        with _grad_mode(cell.pass_)():
            decision = prewarm(op, *args)
        cell.tune_s = time.perf_counter() - t0
        cell.auto_impl, cell.auto_source = decision.impl, decision.source
        variants.append(Variant("auto", "auto", _pass_fn(cell.pass_, lambda: call(*args), targets, gen)))
        # A candidate the tuner found slower than this cell's whole time cap (seconds a call) is
        # reported from the tuner's timing instead of being run again.
        for v in variants:
            t = decision.timings.get(decision.impl if v.kind == "auto" else v.name)
            if v.fn is not None and t is not None and t > env.cell_time:
                v.known = t
    except Exception as e:
        variants.append(Variant("auto", "auto", status=f"error: prewarm raised {_short(e)}"))
    return variants


def _gl_variants(cell: Cell, env: Env, with_dense: bool = False) -> list[Variant]:
    d, dtype, dev = cell.dims, cell.dtype, env.device
    batch, n, inn, out = d["batch"], d["n"], d["in"], d["out"]
    gen = _generator(env, cell.op, d, _dname(dtype), cell.pass_)
    grad = cell.pass_ == "fwdbwd"
    x = _randn((batch, n, inn), dtype, dev, gen).requires_grad_(grad)
    w = _randn((n, out, inn), dtype, dev, gen, 1 / math.sqrt(inn)).requires_grad_(grad)
    b = _randn((n, out), dtype, dev, gen, 0.1).requires_grad_(grad)
    variants = _impl_variants(GL, (x, w, b), grouped_linear, [x, w, b], cell, env, gen)

    # peers: what a user writes without this library
    linears = nn.ModuleList(nn.Linear(inn, out, device=dev, dtype=dtype) for _ in range(n))
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(w[i])
            lin.bias.copy_(b[i])
            lin.requires_grad_(grad)

    def module_list() -> Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(linears)], dim=1)

    params, _ = torch.func.stack_module_state(list(linears))
    sw, sb = (params["weight"].detach().requires_grad_(grad), params["bias"].detach().requires_grad_(grad))
    vmapped = torch.vmap(F.linear, in_dims=(1, 0, 0), out_dims=1)

    def func_vmap() -> Tensor:
        return vmapped(x, sw, sb)

    peers = [
        Variant("nn.ModuleList", "peer", _pass_fn(cell.pass_, module_list, [x, *linears.parameters()], gen)),
        Variant("func.vmap", "peer", _pass_fn(cell.pass_, func_vmap, [x, sw, sb], gen)),
    ]
    gmm = _grouped_mm_peer()
    if gmm is None:
        peers.append(Variant("F.grouped_mm", "peer", status=f"n/a: torch {torch.__version__} has no grouped_mm"))
    elif (inn * dtype.itemsize) % 16 or (out * dtype.itemsize) % 16:
        peers.append(Variant("F.grouped_mm", "peer", status="n/a: in/out rows not 16-byte aligned"))
    else:
        def grouped_mm() -> Tensor:
            y = gmm(x.transpose(0, 1).contiguous(), w.transpose(1, 2))  # [n, batch, out]
            return (y + b.unsqueeze(1)).transpose(0, 1)
        peers.append(Variant("F.grouped_mm", "peer", _pass_fn(cell.pass_, grouped_mm, [x, w, b], gen)))
    if with_dense:  # seed 000's "case A": one dense nn.Linear(n*in, n*out), not the same function
        dense = nn.Linear(n * inn, n * out, device=dev, dtype=dtype).requires_grad_(grad)
        flat = x.detach().reshape(batch, n * inn).requires_grad_(grad)
        if (why := env.too_big(cell.flops * n, cell, f" ({n}x the arithmetic)")) is not None:
            peers.append(Variant("dense", "peer", status=f"skipped: {why}"))
        else:
            peers.append(Variant("dense", "peer", _pass_fn(cell.pass_, lambda: dense(flat),
                                                           [flat, *dense.parameters()], gen), check=False))
    return variants + peers


# ---- weighted_combine ----------------------------------------------------------------------------

def _wc_estimate(batch: int, k: int, feat: int, itemsize: int, pass_: str) -> tuple[float, float, float]:
    x, y = batch * k * feat, batch * feat
    if pass_ == "fwd":
        flops, moved, mem = 2.0 * x, (x + y + batch * k) * itemsize, 4 * x + 2 * y
    else:  # backward reads dY and X again, writes dX and dW
        flops, moved, mem = 6.0 * x, (3 * x + 2 * y + 3 * batch * k) * itemsize, 7 * x + 3 * y
    return flops, moved, mem * itemsize


def _wc_variants(cell: Cell, env: Env) -> list[Variant]:
    d, dtype, dev = cell.dims, cell.dtype, env.device
    batch, k, feats, layout = d["batch"], d["k"], tuple(d["features"]), d["layout"]
    gen = _generator(env, cell.op, d, _dname(dtype), cell.pass_)
    grad = cell.pass_ == "fwdbwd"
    inputs: Tensor | tuple[Tensor, ...]
    if layout == "stacked":
        inputs = _randn((batch, k, *feats), dtype, dev, gen).requires_grad_(grad)
        leaves = [inputs]
    else:
        inputs = tuple(_randn((batch, *feats), dtype, dev, gen).requires_grad_(grad) for _ in range(k))
        leaves = list(inputs)
    weights = torch.softmax(_randn((batch, k), torch.float32, dev, gen), -1).to(dtype).requires_grad_(grad)
    targets = [*leaves, weights]
    variants = _impl_variants(WC, (inputs, weights), weighted_combine, targets, cell, env, gen)
    ones = (1,) * len(feats)

    def stack_mul_sum() -> Tensor:  # seed 003's answer
        stacked = inputs if isinstance(inputs, Tensor) else torch.stack(inputs, 1)
        return (weights.view(batch, k, *ones) * stacked).sum(1)

    def python_loop() -> Tensor:
        parts = inputs if isinstance(inputs, tuple) else [inputs[:, i] for i in range(k)]
        return sum(weights[:, i].view(batch, *ones) * parts[i] for i in range(k))  # type: ignore[return-value]

    return variants + [
        Variant("stack_mul_sum", "peer", _pass_fn(cell.pass_, stack_mul_sum, targets, gen)),
        Variant("python_loop", "peer", _pass_fn(cell.pass_, python_loop, targets, gen)),
    ]


# ---- the sweep -----------------------------------------------------------------------------------

def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


def _fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.3g}us"
    if s < 1.0:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.3g}s"


def _plan(op: str, grid: Grid, args: argparse.Namespace, dtypes: list[torch.dtype],
          passes: list[str]) -> list[Cell]:
    cells = []
    if op == GL:
        if args.in_ and args.out:
            sizes = tuple((i, o) for i in args.in_ for o in args.out)
        elif args.in_ or args.out:
            sizes = _square(*(args.in_ or args.out))
        else:
            sizes = grid.sizes
        for dtype in dtypes:
            for pass_ in passes:
                for n in args.n or grid.n:
                    for inn, out in sizes:
                        for batch in args.batch or grid.batch:
                            cells.append(Cell(GL, dtype, pass_, {"batch": batch, "n": n, "in": inn, "out": out}))
    elif op == WC:
        for dtype in dtypes:
            for pass_ in passes:
                for shape in args.wc_shapes or grid.wc_shapes:
                    for layout in ("stacked", "list"):
                        for k in args.k or grid.k:
                            cells.append(Cell(WC, dtype, pass_, {"batch": shape[0], "k": k,
                                                                 "features": list(shape[1:]), "layout": layout}))
    else:
        for dtype in dtypes:
            for pass_ in passes:
                for claim, batch, n, size in _SEED_CELLS:
                    cells.append(Cell(SEED, dtype, pass_, {"batch": batch, "n": n, "in": size, "out": size},
                                      claim=claim))
    return cells


def _estimate(cell: Cell, env: Env) -> None:
    d, itemsize = cell.dims, cell.dtype.itemsize
    if cell.op in (GL, SEED):
        est = _gl_estimate(d["batch"], d["n"], d["in"], d["out"], itemsize, cell.pass_)
    else:
        est = _wc_estimate(d["batch"], d["k"], math.prod(d["features"]), itemsize, cell.pass_)
    cell.flops, cell.bytes_moved, cell.mem_bytes = est
    cell.floor_s, cell.bound = env.floor(cell.dtype, cell.flops, cell.bytes_moved)
    if cell.op in (GL, SEED) and cell.bound == "memory" and d["n"] * d["in"] * d["out"] >= (d["batch"] * d["n"]
                                                                                           * (d["in"] + d["out"])):
        cell.bound = "weights"
    if cell.mem_bytes > env.mem_cap:
        cell.skipped = f"needs ~{_gib(cell.mem_bytes)}, over the {_gib(env.mem_cap)} memory cap"
    else:
        cell.skipped = env.too_big(cell.flops, cell)


def _run_cell(cell: Cell, env: Env) -> None:
    torch.manual_seed(env.seed)  # nn.Linear's init in the peers draws from the global RNG
    t0 = time.perf_counter()
    try:
        if cell.op == WC:
            variants = _wc_variants(cell, env)
        else:
            variants = _gl_variants(cell, env, with_dense=cell.op == SEED)
        if env.wanted is not None:
            variants = [v for v in variants if v.name in env.wanted]
        cell.kinds = {v.name: v.kind for v in variants}
        cell.results = _measure(variants, env, cell.pass_, cell.dtype)
    except Exception as e:  # e.g. OOM while making inputs: the cell is reported, the sweep goes on
        cell.skipped = f"error: {_short(e)}"
    finally:
        cell.elapsed_s = time.perf_counter() - t0
        if env.device.type == "cuda":
            torch.cuda.empty_cache()


def _measure_rates(device: torch.device, dtypes: list[torch.dtype], light: bool) -> tuple[float, dict[torch.dtype, float]]:
    """Bytes/s of a large copy and FLOP/s of a large matmul per dtype, measured on ``device``."""
    cuda = device.type == "cuda"

    def best_of(fn: Callable[[], Any], reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

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


def _machine(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grouped_ops": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "grid": args.grid,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _command_line() -> str:
    argv = list(sys.argv)
    first = Path(argv[0]) if argv else Path("")
    if first.name == "__main__.py" and first.parent.name == "grouped_ops":
        return shlex.join(["python", "-m", "grouped_ops", *argv[1:]])
    if first.name == "grouped-ops":
        return shlex.join(["grouped-ops", *argv[1:]])
    return shlex.join(["python", *argv])


def _free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float(4 << 30)


@contextlib.contextmanager
def _bench_environment(args: argparse.Namespace) -> Iterator[None]:
    """A private tuning cache (unless --cache user), the tuning budget and threads; all restored."""
    saved = {k: os.environ.get(k) for k in ("GROUPED_OPS_CACHE_DIR", "GROUPED_OPS_TUNE_BUDGET_S")}
    threads = torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory(prefix="grouped_ops_bench_") if args.cache == "temp" else None
    try:
        if tmp is not None:
            os.environ["GROUPED_OPS_CACHE_DIR"] = tmp.name
            dispatch.clear_memory()
        if args.tune_budget is not None:
            os.environ["GROUPED_OPS_TUNE_BUDGET_S"] = str(args.tune_budget)
        if args.threads:
            torch.set_num_threads(args.threads)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)
        if tmp is not None:
            dispatch.clear_memory()  # decisions made against the temporary cache go with it
            tmp.cleanup()


def run(args: argparse.Namespace) -> int:
    """Run the sweep ``args`` describes (see :func:`configure_parser`); returns the exit status."""
    err = sys.stderr
    grid = GRIDS[args.grid]
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"bench: bad --device {args.device!r}: {e}", file=err)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"bench: --device must be cpu or cuda, got {args.device!r}", file=err)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False (a CPU-only torch build, or no GPU)",
              file=err)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench: --plot needs matplotlib; install it with: pip install 'grouped_ops[bench]' "
                  "(or pip install matplotlib)", file=err)
            return 2
    ops = list(args.ops or ([SEED] if args.check_seed else grid.ops))
    bad = [o for o in ops if o not in (GL, WC, SEED)]
    passes = list(args.passes or PASSES)
    bad += [p for p in passes if p not in PASSES]
    names = list(args.dtypes or (grid.dtypes + (CUDA_EXTRA_DTYPES if args.grid == "full" and device.type == "cuda" else ())))
    dtypes = []
    for name in names:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            dtypes.append(dtype)
        else:
            bad.append(name)
    if bad:
        print(f"bench: unknown op, pass or dtype {bad}; ops are {[GL, WC, SEED]}, passes {list(PASSES)}, "
              "dtypes e.g. float32,bfloat16,float16", file=err)
        return 2

    if args.from_json:
        try:
            cells, machine, settings = _load(args.from_json)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"bench: cannot read --from-json {args.from_json}: {_short(e)}", file=err)
            return 2
        order = list(dict.fromkeys((c.op, c.dtype, c.pass_) for c in cells))
        report = _Report(cells, machine, settings, list(dict.fromkeys(o for o, _, _ in order)),
                         list(dict.fromkeys(d for _, d, _ in order)), list(dict.fromkeys(p for _, _, p in order)))
        return _emit(report, args)

    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with _bench_environment(args), torch.random.fork_rng(devices=rng_devices):  # the caller's RNG is untouched
        return _sweep(args, grid, device, ops, dtypes, passes)


def _sweep(args: argparse.Namespace, grid: Grid, device: torch.device, ops: list[str],
           dtypes: list[torch.dtype], passes: list[str]) -> int:
    err = sys.stderr
    machine = _machine(device, args)
    busy = machine.get("loadavg_start", [0.0])[0]
    if device.type == "cpu" and busy > 0.5:
        print(f"bench: warning: the machine is busy (load average {busy:.2f} on {os.cpu_count()} logical cores); "
              f"CPU timings will be noisy, and with torch's {torch.get_num_threads()} threads competing for cores "
              "small calls can read 10-100x slow. Prefer a quiet machine (or --threads 1).", file=err)
    t_start = time.perf_counter()
    light = args.grid == "quick" or args.dry_run
    bandwidth, rates = _measure_rates(device, dtypes, light)
    env = Env(
        device=device,
        cell_time=args.cell_time if args.cell_time is not None else grid.cell_time[device.type],
        max_gflop=args.max_gflop if args.max_gflop is not None else grid.max_gflop[device.type],
        mem_cap=args.max_mem_gb * 2**30 if args.max_mem_gb else 0.5 * _free_memory(device),
        max_workspace=(args.max_workspace_gb if args.max_workspace_gb is not None
                       else grid.max_workspace_gb[device.type]) * 2**30,
        reps=max(1, args.reps), min_sample=args.min_sample_ms / 1e3, seed=args.seed,
        bandwidth=bandwidth, matmul=rates, wanted=tuple(args.variants) if args.variants else None,
    )
    machine["copy_GBps"] = round(bandwidth / 1e9, 2)
    machine["matmul_GFLOPs"] = {_dname(d): round(r / 1e9, 1) for d, r in rates.items()}
    settings = {"cell_time_s": env.cell_time, "max_gflop": env.max_gflop, "mem_cap_gib": round(env.mem_cap / 2**30, 2),
                "max_workspace_gib": None if math.isinf(env.max_workspace) else env.max_workspace / 2**30,
                "reps": env.reps, "min_sample_ms": args.min_sample_ms, "seed": env.seed, "cache": args.cache,
                "tune_budget_s": tuning_settings().budget_s}

    cells = [c for op in ops for c in _plan(op, grid, args, dtypes, passes)]
    for cell in cells:
        _estimate(cell, env)
    if args.dry_run:
        _print_plan(cells, env)
        return 0

    from tqdm import tqdm

    interrupted = False
    bar = tqdm(cells, desc="bench", unit="cell", file=err, disable=args.no_progress, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(f"{cell.op} {_dname(cell.dtype)} {cell.pass_} {cell.label}", refresh=False)
            if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                cell.skipped = cell.skipped or f"not reached within --time-limit {args.time_limit:g}s"
                continue
            if cell.skipped is None:
                _run_cell(cell, env)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; writing what was measured", file=err)
    finally:
        bar.close()
    machine["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    with contextlib.suppress(OSError, AttributeError):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    not_reached = sum(bool(c.skipped and c.skipped.startswith("not reached")) for c in cells)
    if not_reached:
        print(f"bench: --time-limit reached; {not_reached} cells were not run", file=err)
    report = _Report(cells, machine, settings, ops, dtypes, passes)
    status = _emit(report, args)
    return 130 if interrupted else status


def _emit(report: _Report, args: argparse.Namespace) -> int:
    """Print the tables and write every output asked for."""
    err, cells, machine = sys.stderr, report.cells, report.machine
    print(report.text())
    mismatches = [f"{c.op} {c.label} {n}: {r.status}" for c in cells for n, r in c.results.items()
                  if r.status.startswith("mismatch")]
    for line in mismatches:
        print(f"bench: WARNING {line}", file=err)
    plots: dict[tuple[str, str, str], Path] = {}
    if args.plot:
        plots = _plot(cells, Path(args.plot), machine)
    if args.markdown:
        _write(args.markdown, report.markdown(plots, Path(args.markdown).parent))
    if args.csv:
        _write(args.csv, report.csv())
    if args.json:
        _write(args.json, json.dumps(report.json(), indent=1, default=str) + "\n")
    for path in filter(None, (args.markdown, args.csv, args.json)):
        print(f"bench: wrote {path}", file=err)
    for path in plots.values():
        print(f"bench: wrote {path}", file=err)
    return 0


def _load(paths: Sequence[str]) -> tuple[list[Cell], dict[str, Any], dict[str, Any]]:
    """Cells, machine and settings of earlier --json outputs (several files are merged, in order)."""
    cells: list[Cell] = []
    machines, settings = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        machines.append(data["machine"])
        settings = settings or data.get("settings", {})
        for c in data["cells"]:
            results = {n: Result(**{k: r.get(k) for k in ("status", "median_s", "q1_s", "q3_s")},
                                 reps=r.get("reps", 0), number=r.get("number", 0))
                       for n, r in c["results"].items()}
            cells.append(Cell(
                c["op"], getattr(torch, c["dtype"]), c["pass"], c["dims"], claim=c.get("claim") or "",
                skipped=c.get("skipped"), results=results, kinds={n: r.get("kind") for n, r in c["results"].items()},
                auto_impl=c.get("auto_impl"), auto_source=c.get("auto_source"), tune_s=c.get("tune_s"),
                elapsed_s=c.get("elapsed_s"),
                flops=c.get("flops", 0.0), bytes_moved=c.get("bytes_moved", 0.0), mem_bytes=c.get("mem_bytes_est", 0.0),
                floor_s=c.get("floor_s"), bound=c.get("bound", "")))
    machine = dict(machines[0])
    if len(machines) > 1:
        machine["command"] = " ; ".join(dict.fromkeys(m["command"] for m in machines))
        machine["date"] = " .. ".join(dict.fromkeys(m["date"] for m in machines))
        machine["elapsed_s"] = round(sum(m.get("elapsed_s") or 0 for m in machines), 1)
        machine["merged_from"] = list(paths)
    return cells, machine, settings


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def _print_plan(cells: list[Cell], env: Env) -> None:
    run_n = sum(c.skipped is None for c in cells)
    print(f"{len(cells)} cells, {run_n} to run, {len(cells) - run_n} skipped; cap {env.cell_time:g}s of timing "
          f"per cell, at most {env.max_gflop:g} GFLOP per call, memory cap {_gib(env.mem_cap)}")
    for c in cells:
        print(f"  {c.op:<16} {_dname(c.dtype):<9} {c.pass_:<6} {c.label:<34} floor {_fmt_t(c.floor_s):>8} "
              f"{c.bound:<8} {'skipped: ' + c.skipped if c.skipped else ''}")


# ---- seed 000's claims ---------------------------------------------------------------------------

# (claim, batch, n, per-group size): grouped_linear shapes that test what seed 000 measured on its GPU
_SEED_CELLS: list[tuple[str, int, int, int]] = [
    *(("batch", b, 32, 32) for b in (1, 16, 128, 512, 2048)),
    *(("n", 128, n, 32) for n in (2, 4, 8)),
    *(("n", 128, n, 1024 // n) for n in (4, 8)),  # the seed's reading: n*in fixed at 1024
    *(("size", 128, 32, s) for s in (8, 128, 256)),
]


def _seed_ratio(cell: Cell, fast: str) -> float | None:
    loop, other = cell.time("nn.ModuleList"), cell.time(fast)
    return loop / other if loop and other else None


def _seed_verdicts(cells: list[Cell]) -> list[tuple[str, str, str, str]]:
    """(claim, what the seed says, what we measured, verdict), from the seed cells of one dtype and pass.

    Ratios are loop time / other time (> 1: the other is faster), the loop being the seed's own
    ``nn.ModuleList`` + ``torch.stack``; C is ``masked_dense``, A one dense ``nn.Linear(n*in, n*out)``.
    """
    def pick(claim: str, **dims: int) -> list[Cell]:
        return [c for c in cells if c.claim == claim and all(c.dims[k] == v for k, v in dims.items())]

    def fmt(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f}x"

    def span(rs: list[float]) -> str:
        return fmt(rs[0]) if len(rs) == 1 else f"{fmt(min(rs))} to {fmt(max(rs))}"

    out = []
    small = [c for c in pick("batch") if c.dims["batch"] <= 128]
    pairs = [(c.dims["batch"], r) for c in small if (r := _seed_ratio(c, "masked_dense")) is not None]
    got = ", ".join(f"batch {c.dims['batch']}: C {fmt(_seed_ratio(c, 'masked_dense'))} / "
                    f"A {fmt(_seed_ratio(c, 'dense'))}" for c in small)
    rs = [r for _, r in pairs]
    if not rs:
        verdict = "not measured"
    elif min(rs) >= 8:
        verdict = f"holds: masked_dense is {span(rs)} faster"
    elif min(rs) > 1:
        verdict = f"partly: masked_dense is faster ({span(rs)}), but not ~10x"
    elif max(rs) <= 1:
        verdict = f"does not hold: masked_dense is slower than the loop here ({span(rs)})"
    else:
        verdict = "does not hold: masked_dense is faster only at batch " + ", ".join(str(b) for b, r in pairs if r > 1)
    out.append(("masked_dense ~10x faster than the loop", "batch <= 128, n=32, 32->32", got, verdict))

    ns = pick("n")
    pairs = [(f"n={c.dims['n']} {c.dims['in']}->{c.dims['out']}", r) for c in ns
             if (r := _seed_ratio(c, "masked_dense")) is not None]
    got = ", ".join(f"{k}: {fmt(r)}" for k, r in pairs)
    rs = [r for _, r in pairs]
    if not rs:
        verdict = "not measured"
    elif max(rs) < 1:
        verdict = "holds: the loop wins at every n <= 8 measured"
    elif min(rs) >= 1:
        verdict = "does not hold: masked_dense wins at every n <= 8 measured"
    else:
        verdict = "partly: the loop wins at " + ", ".join(k for k, r in pairs if r < 1) + " only"
    out.append(("masked_dense slower than the loop for n <= 8", "batch 128; 32 per group, and n*in = 1024",
                got, verdict))

    for claim, key, what in (("batch", "batch", "batch grows"), ("size", "in", "per-group size grows")):
        cs = pick(claim, n=32) + (pick("batch", batch=128) if claim == "size" else [])
        cs.sort(key=lambda c: c.dims[key])
        got = ", ".join(f"{key} {c.dims[key]}: C {fmt(_seed_ratio(c, 'masked_dense'))} / "
                        f"A {fmt(_seed_ratio(c, 'dense'))}" for c in cs)
        pairs = [(c.dims[key], r) for c in cs if (r := _seed_ratio(c, "masked_dense")) is not None]
        if len(pairs) < 2:
            verdict = "not measured"
        else:
            first, last = pairs[0][1], pairs[-1][1]
            monotone = all(b <= a * 1.1 for (_, a), (_, b) in zip(pairs, pairs[1:], strict=False))
            trend = f"loop/masked_dense goes {fmt(first)} -> {fmt(last)}"
            flips = [v for v, r in pairs if r < 1]
            if flips and first >= 1:
                trend += f", masked_dense slower than the loop from {key} {flips[0]} on"
            elif flips:
                trend += ", masked_dense slower than the loop throughout"
            if max(r for _, r in pairs) < 1:
                verdict = (f"does not apply: masked_dense never beats the loop here, so there is no gap to "
                           f"shrink ({trend})")
            elif last < first and monotone:
                verdict = f"holds: {trend}"
            elif last < first:
                verdict = f"partly (not monotone): {trend}"
            else:
                verdict = f"does not hold: {trend}"
        seed = ("batch 2048: A only ~1.5x faster than the loop" if claim == "batch"
                else "8 per group ~18x; ~253 per group ~2.5x (A), ~1.5x (C)")
        out.append((f"the gap shrinks as {what}", seed, got, verdict))
    return out


# ---- reporting -----------------------------------------------------------------------------------

def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


class _Report:
    def __init__(self, cells: list[Cell], machine: dict[str, Any], settings: dict[str, Any],
                 ops: list[str], dtypes: list[torch.dtype], passes: list[str]) -> None:
        self.cells, self.machine, self.settings = cells, machine, settings
        self.groups: list[tuple[str, torch.dtype, str, list[Cell]]] = []
        for op in ops:
            for dtype in dtypes:
                for pass_ in passes:
                    cs = [c for c in cells if c.op == op and c.dtype == dtype and c.pass_ == pass_]
                    if cs:
                        self.groups.append((op, dtype, pass_, cs))

    # -- tables as rows of strings
    def _columns(self, cells: list[Cell]) -> list[str]:
        names: dict[str, None] = {}
        for kind in ("impl", "auto", "peer"):
            for c in cells:
                names.update({n: None for n, k in c.kinds.items() if k == kind})
        if not names:  # every cell skipped: still show what would have been timed
            op = cells[0].op
            base = GL if op == SEED else op
            names = dict.fromkeys([*SPECS[base].registry, "auto", *PEERS[base], *(["dense"] if op == SEED else [])])
        return list(names)

    def _table(self, cells: list[Cell], md: bool) -> tuple[list[str], list[list[str]], list[str]]:
        op = cells[0].op
        cols = self._columns(cells)
        base = BASELINE[GL if op == SEED else op]
        keys = (["batch", "n", "in->out"] if op in (GL, SEED) else ["shape [b x k x f]", "inputs"])
        extra = ["auto picks", f"auto vs {base}", "auto/best", "fastest", "floor", "bound", "auto % of floor"]
        if op == SEED:
            extra = ["loop/masked_dense", "loop/dense", "auto picks"]
        header = keys + cols + extra
        rows, notes = [], {}
        for c in cells:
            d = c.dims
            lead = ([str(d["batch"]), str(d["n"]), f"{d['in']}->{d['out']}"] if op in (GL, SEED)
                    else ["x".join(str(v) for v in (d["batch"], d["k"], *d["features"])), d["layout"]])
            if c.skipped:
                rows.append(lead + [f"skipped: {c.skipped}"] + [""] * (len(header) - len(lead) - 1))
                continue
            fastest = c.fastest()
            times = []
            for name in cols:
                r = c.results.get(name)
                if r is None:
                    times.append("")
                elif r.ok:
                    text = (("\\~" if md else "~") if r.reps == 1 else "") + _fmt_t(r.median_s)
                    times.append(f"**{text}**" if md and name == fastest else text)
                else:
                    short = r.status.split(":", 1)[0]
                    times.append(short)
                    notes.setdefault(f"{name}: {r.status}", None)
            if op == SEED:
                tail = [_ratio(_seed_ratio(c, "masked_dense")), _ratio(_seed_ratio(c, "dense")), c.auto_impl or "-"]
            else:
                frac = c.floor_fraction()
                tail = [c.auto_impl or "-", _ratio(c.auto_vs_baseline()), _ratio(c.auto_over_best()),
                        fastest or "-", _fmt_t(c.floor_s), c.bound, "-" if frac is None else f"{100 * frac:.1f}%"]
            rows.append(lead + times + tail)
        return header, rows, list(notes)

    def _summary(self, cells: list[Cell]) -> list[str]:
        done = [c for c in cells if not c.skipped and c.time("auto")]
        if not done or cells[0].op == SEED:
            return []
        over = [(c.auto_over_best(), c) for c in done if c.auto_over_best()]
        base = [r for c in done if (r := c.auto_vs_baseline())]
        lines = [f"{len(done)} of {len(cells)} cells measured"]
        if over:
            worst = max(over, key=lambda p: p[0])
            lines.append(f"auto / fastest implementation: geometric mean {_geomean([o for o, _ in over]):.3f}, "
                         f"worst {worst[0]:.2f}x at {worst[1].label}")
        if base:
            lines.append(f"auto speed-up over {BASELINE[cells[0].op]}: geometric mean {_geomean(base):.2f}x, "
                         f"range {min(base):.2f}x .. {max(base):.2f}x")
        for bound in ("compute", "weights", "memory"):
            big = [f for c in done if c.bound == bound and (c.floor_s or 0) >= 50e-6 and (f := c.floor_fraction())]
            if big:
                lines.append(f"auto's fraction of the floor, {bound}-bound cells with floor >= 50us: geometric mean "
                             f"{100 * _geomean(big):.1f}% over {len(big)} cells (best {100 * max(big):.1f}%)")
        return lines

    def _header_lines(self) -> list[str]:
        m = self.machine
        return [
            f"device: {m['device']} | CPU: {m['cpu']} ({m['cpu_count']} logical cores, torch threads "
            f"{m['torch_threads']}) | torch {m['torch']} (CUDA {m['cuda']}) | grouped_ops {m['grouped_ops']} "
            f"| python {m['python']}",
            f"date: {m['date']} | load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')} "
            f"| elapsed {m.get('elapsed_s')} s",
            f"command: {m['command']}",
            f"measured here: copy {m['copy_GBps']} GB/s; matmul "
            + ", ".join(f"{k} {v} GFLOP/s" for k, v in m["matmul_GFLOPs"].items()),
            "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
        ]

    @staticmethod
    def _title(op: str, dtype: torch.dtype, pass_: str) -> str:
        name = "seed 000 check (grouped_linear)" if op == SEED else op
        return f"{name}, {_dname(dtype)}, {PASS_TITLE[pass_]}"

    def _verdict_groups(self) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
        return [(self._title(op, dt, p), _seed_verdicts(cs)) for op, dt, p, cs in self.groups if op == SEED]

    def text(self) -> str:
        out = ["grouped_ops bench", *self._header_lines(), ""]
        for op, dtype, pass_, cells in self.groups:
            header, rows, notes = self._table(cells, md=False)
            out.append(f"== {self._title(op, dtype, pass_)} (median time per call; lower is better)")
            nlead = 3 if op in (GL, SEED) else 2
            live = [r for r in rows if not r[nlead].startswith("skipped: ")]
            skipped = [r for r in rows if r[nlead].startswith("skipped: ")]
            widths = [max(len(h), *(len(r[i]) for r in live)) if live else len(h) for i, h in enumerate(header)]
            out.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
            out.extend("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in live)
            out.extend("  " + " ".join(r[:nlead]) + "  " + r[nlead] for r in skipped)
            out.extend(f"  note: {n}" for n in notes)
            out.extend(f"  {line}" for line in self._summary(cells))
            out.append("")
        for title, verdicts in self._verdict_groups():
            out.append(f"== seed 000 verdicts: {title.split(', ', 1)[1]} (loop = nn.ModuleList, C = masked_dense, "
                       "A = one dense Linear(n*in, n*out))")
            for claim, seed, got, verdict in verdicts:
                out.append(f"  {claim} [{seed}]\n      measured: {got}\n      verdict: {verdict}")
            out.append("")
        return "\n".join(out)

    def markdown(self, plots: dict[tuple[str, str, str], Path], folder: Path) -> str:
        m = self.machine
        out = [f"# grouped_ops benchmarks: {m['device']}", ""]
        out += [f"- {line}" for line in self._header_lines()]
        out += ["", "Times are medians per call; **bold** is the fastest column of the row; \\~ marks a single "
                "sample (a column slow next to the cell's time cap). "
                "See docs/benchmarks/README.md for what each column means.", ""]
        for op, dtype, pass_, cells in self.groups:
            header, rows, notes = self._table(cells, md=True)
            out += [f"## {self._title(op, dtype, pass_)}", ""]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---:" if i >= (3 if op in (GL, SEED) else 2) else "---"
                                      for i in range(len(header))) + "|")
            out += ["| " + " | ".join(v.replace("|", "/") for v in r) + " |" for r in rows]
            out.append("")
            out += [f"- {n}" for n in notes]
            out += [f"- {line}" for line in self._summary(cells)]
            key = (op, _dname(dtype), pass_)
            if key in plots:
                rel = os.path.relpath(plots[key], folder)
                out += ["", f"![{self._title(op, dtype, pass_)}]({Path(rel).as_posix()})"]
            out.append("")
        for title, verdicts in self._verdict_groups():
            out += [f"## Seed 000 verdicts: {title.split(', ', 1)[1]}", "",
                    "loop = `nn.ModuleList` + `torch.stack` (the seed's case B), C = `masked_dense`, "
                    "A = one dense `nn.Linear(n*in, n*out)`; ratios are loop time / other time.", "",
                    "| claim | seed says | measured | verdict |", "|---|---|---|---|"]
            out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in verdicts]
            out.append("")
        return "\n".join(out)

    def csv(self) -> str:
        import io

        buf = io.StringIO()
        for k, v in self.machine.items():
            buf.write(f"# {k}: {v}\n")
        buf.write("# settings: " + json.dumps(self.settings) + "\n")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["op", "dtype", "pass", "batch", "n", "in", "out", "k", "features", "inputs", "claim",
                    "variant", "kind", "status", "median_s", "q1_s", "q3_s", "reps", "calls_per_rep",
                    "auto_impl", "auto_source", "best_impl", "auto_vs_baseline", "auto_over_best",
                    "floor_s", "bound", "auto_floor_fraction"])
        for c in self.cells:
            d = c.dims
            lead = [c.op, _dname(c.dtype), c.pass_, d.get("batch"), d.get("n", ""), d.get("in", ""),
                    d.get("out", ""), d.get("k", ""), "x".join(map(str, d.get("features", []))),
                    d.get("layout", ""), c.claim]
            best = c.best_impl()
            tail = [c.auto_impl or "", c.auto_source or "", best[0] if best else "",
                    _num(c.auto_vs_baseline()), _num(c.auto_over_best()), _num(c.floor_s), c.bound,
                    _num(c.floor_fraction())]
            if c.skipped:
                w.writerow(lead + ["", "", f"skipped: {c.skipped}", "", "", "", 0, 0] + tail)
            for name, r in c.results.items():
                w.writerow(lead + [name, c.kinds.get(name, ""), r.status, _num(r.median_s), _num(r.q1_s),
                                   _num(r.q3_s), r.reps, r.number] + tail)
        return buf.getvalue()

    def json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "machine": self.machine,
            "settings": self.settings,
            "cells": [c.to_json() for c in self.cells],
            "summaries": {self._title(op, dt, p): self._summary(cs) for op, dt, p, cs in self.groups},
            "seed_verdicts": {title: [dict(zip(("claim", "seed", "measured", "verdict"), v, strict=True))
                                      for v in verdicts] for title, verdicts in self._verdict_groups()},
        }


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


# ---- plots ---------------------------------------------------------------------------------------

def _plot(cells: list[Cell], folder: Path, machine: dict[str, Any]) -> dict[tuple[str, str, str], Path]:
    """One PNG per op, dtype and pass: speed-up of every column over the baseline, small multiples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[tuple[str, str, str], Path] = {}
    keys = dict.fromkeys((c.op, c.dtype, c.pass_) for c in cells if c.op in (GL, WC))
    for op, dtype, pass_ in keys:
        cs = [c for c in cells if (c.op, c.dtype, c.pass_) == (op, dtype, pass_) and not c.skipped and c.results]
        if not cs:
            continue
        base = BASELINE[op]
        if op == GL:
            rows = sorted({c.dims["n"] for c in cs})
            cols = sorted({(c.dims["in"], c.dims["out"]) for c in cs})
            panel = {(r, col): [c for c in cs if c.dims["n"] == r and (c.dims["in"], c.dims["out"]) == col]
                     for r in rows for col in cols}
            row_name, col_name, x_key, x_label = "n={}", "{0[0]}->{0[1]} per group", "batch", "batch"
        else:
            rows = ["stacked", "list"]
            cols = sorted({(c.dims["batch"], *c.dims["features"]) for c in cs})
            panel = {(r, col): [c for c in cs if c.dims["layout"] == r
                                and (c.dims["batch"], *c.dims["features"]) == col] for r in rows for col in cols}
            row_name, col_name, x_key, x_label = "{} inputs", "b x f = {}", "k", "k (branches)"
            rows = [r for r in rows if any(panel[(r, col)] for col in cols)]
        names = list(dict.fromkeys(n for c in cs for n in c.kinds))
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols) + 1.0, 2.6 * len(rows) + 1.3),
                                 squeeze=False, sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                ax = axes[i][j]
                group = sorted(panel.get((r, col), []), key=lambda c: c.dims[x_key])
                for ci, name in enumerate(names):
                    pts = [(c.dims[x_key], c.time(base) / c.time(name)) for c in group
                           if c.time(name) and c.time(base)]
                    if not pts:
                        continue
                    kind = cs[0].kinds.get(name) or next((c.kinds[name] for c in cs if name in c.kinds), "impl")
                    style = ({"color": "black", "linewidth": 2.2, "zorder": 5} if name == "auto" else
                             {"color": colors[ci % len(colors)], "linestyle": "--" if kind == "peer" else "-",
                              "linewidth": 1.2})
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name, **style)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.axhline(1.0, color="grey", linewidth=0.6)
                ax.grid(True, which="major", linewidth=0.3)
                col_text = col_name.format("x".join(map(str, col)) if op == WC else col)
                ax.set_title(f"{row_name.format(r)}, {col_text}", fontsize=8)
                if i == len(rows) - 1:
                    ax.set_xlabel(x_label, fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"speed-up over {base}", fontsize=8)
                ax.tick_params(labelsize=7)
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        width, height = fig.get_figwidth(), fig.get_figheight()
        ncol = max(1, min(len(labels), int(width / 1.3)))
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", fontsize=7, ncol=ncol,
                   frameon=False)
        bottom = (0.15 + 0.17 * math.ceil(len(labels) / ncol)) / height
        fig.suptitle(f"{op}, {_dname(dtype)}, {PASS_TITLE[pass_]}: speed-up over {base} (higher is better)\n"
                     f"{machine['device']}, torch {machine['torch']}, {machine['date'][:10]}", fontsize=9)
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / height))
        path = folder / f"{op}-{_dname(dtype)}-{pass_}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[(op, _dname(dtype), pass_)] = path
    return written
