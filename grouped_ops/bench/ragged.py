"""The ragged-groups sweep: ``python -m grouped_ops bench --ragged``.

``grouped_linear(x [T, in], w [E, out, in], offsets=...)`` (the op grouped_linear_ragged) over tokens
T, experts E, widths, the skew of the split (the largest group's share of the rows), dtype and pass.
Columns: every implementation (forced), ``auto`` (prewarmed on the library's own balanced offsets,
then called on the cell's), and what users call today: a Python loop of ``F.linear`` per expert and
``F.grouped_mm`` called directly (the baseline is the faster of the two, per cell). Timing is the
sweep's (:func:`.measurement._measure`: round-robin, medians); the floor is the sweep's too
(docs/benchmarks/README.md, "The floor"). Outputs: a text table, ``--markdown``, ``--json``,
``--plot DIR`` (one PNG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..functional import grouped_linear, implementations
from ..ops import SPECS
from ..ops.grouped_linear_ragged import OP, balanced_offsets
from ..recording import lookup, prewarm
from ..registry import tolerance
from ..tuning.timer import timer_for
from .cells import Env, Result, Variant, _dname
from .measurement import _measure_rates, _rel_err, _short
from .sweep import _bench_environment, _machine, _progress, _write, busy_warning
from .variants import _pass_fn

SKEWS = ("balanced", "half", "all")  # the largest group's share: about 1/E, one half, every row
PEERS = ("python loop", "F.grouped_mm")


@dataclass(frozen=True)
class RaggedGrid:
    tokens: tuple[int, ...]
    experts: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...]
    cell_time: float


GRIDS = {
    "quick": RaggedGrid((32, 256), (4,), ((16, 16),), ("float32",), 0.1),
    "default": RaggedGrid((16, 256, 4096), (8, 64), ((64, 64), (512, 256)), ("float32", "bfloat16"), 0.4),
}
GRIDS["full"] = GRIDS["default"]


@dataclass
class RaggedCell:
    dtype: torch.dtype
    pass_: str
    tokens: int
    experts: int
    inn: int
    out: int
    skew: str
    results: dict[str, Result] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    auto_impl: str | None = None
    floor_s: float | None = None
    skipped: str | None = None
    medians: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"T={self.tokens} E={self.experts} {self.inn}->{self.out} {self.skew}"

    def time(self, name: str) -> float | None:
        r = self.results.get(name)
        return r.median_s if r is not None and r.ok else None

    def ratios(self) -> dict[str, float | None]:
        auto = self.time("auto")
        impls = [t for n, k in self.kinds.items() if k == "impl" and (t := self.time(n)) is not None]
        base = [t for n in PEERS if (t := self.time(n)) is not None]
        return {"auto_over_fastest": auto / min(impls) if auto and impls else None,
                "auto_vs_baseline": min(base) / auto if auto and base else None,
                "floor_share": self.floor_s / auto if auto and self.floor_s else None}

    def fastest(self) -> str | None:
        ok = [(t, n) for n in self.results if n != "auto" and (t := self.time(n)) is not None]
        return min(ok)[1] if ok else None


def _measure_min(variants: list[Variant], env: Env, pass_: str,
                 dtype: torch.dtype) -> tuple[dict[str, Result], dict[str, float]]:
    """Each variant's time as the minimum over interleaved samples (and the median, kept beside it).

    The sweep's own measure reports medians; this one reports minima because this sweep was run on a
    machine shared with other jobs, whose load only ever adds time: of repeated samples, the
    minimum is the one least disturbed. Rounds run every live variant once, in a fresh seeded
    order, until ``env.reps`` rounds or the cell's time (``env.cell_time`` per variant) is spent."""
    mode = torch.no_grad if pass_ == "fwd" else torch.enable_grad
    timer = timer_for(env.device)
    results = {v.name: Result(v.status) for v in variants}
    live: dict[str, tuple[Any, int]] = {}
    reference: torch.Tensor | None = None
    for v in variants:
        if v.fn is None:
            continue
        try:
            with mode():
                out = v.fn()
                if reference is None:
                    reference = out.detach()
                elif (err := _rel_err(reference, out)) > tolerance(dtype).agree:
                    results[v.name] = Result(f"mismatch: relative error {err:.2e} against the first column")
                    continue
                first = timer("", v.fn, 1)
            live[v.name] = (v.fn, max(1, min(10_000, math.ceil(env.min_sample / max(first, 1e-9)))))
        except Exception as e:  # reported in the table
            results[v.name] = Result(f"error: {_short(e)}")
    samples: dict[str, list[float]] = {n: [] for n in live}
    order = random.Random(env.seed)
    end = time.perf_counter() + env.cell_time * max(len(live), 1)
    for round_ in range(env.reps):
        names = list(live)
        order.shuffle(names)
        for name in names:
            fn, number = live[name]
            with mode():
                samples[name].append(timer("", fn, number))
        if round_ >= 2 and time.perf_counter() > end:
            break
    medians = {}
    for name, s in samples.items():
        results[name] = Result("ok", min(s), min(s), statistics.median(s), len(s), live[name][1])
        medians[name] = statistics.median(s)
    return results, medians


def skewed_offsets(tokens: int, experts: int, skew: str) -> torch.Tensor:
    """int32 offsets for a skew class: ``balanced`` (the tuner's own fixed-seed split), ``half``
    (group 0 takes half the rows, the rest split as balanced), ``all`` (one group takes every row)."""
    if skew == "balanced" or experts == 1:
        return balanced_offsets(tokens, experts)
    if skew == "all":
        sizes = torch.zeros(experts, dtype=torch.int64)
        sizes[experts // 2] = tokens
        return sizes.cumsum(0).to(torch.int32)
    big = tokens // 2
    return torch.cat([torch.tensor([big]), balanced_offsets(tokens - big, experts - 1).long() + big]).to(torch.int32)


def _estimate(cell: RaggedCell, env: Env) -> None:
    factor = 1 if cell.pass_ == "fwd" else 3
    flops = 2.0 * cell.tokens * cell.inn * cell.out * factor
    moved = (cell.tokens * (cell.inn + cell.out) + cell.experts * cell.out * cell.inn) * cell.dtype.itemsize * factor
    cell.floor_s = env.floor(cell.dtype, flops, moved)[0]


def _variants(cell: RaggedCell, env: Env) -> list[Variant]:
    gen = torch.Generator().manual_seed(env.seed)
    train = cell.pass_ == "fwdbwd"
    x = torch.randn(cell.tokens, cell.inn, generator=gen).to(cell.dtype).requires_grad_(train)
    w = (torch.randn(cell.experts, cell.out, cell.inn, generator=gen) / math.sqrt(cell.inn)).to(cell.dtype)
    w.requires_grad_(train)
    offsets = skewed_offsets(cell.tokens, cell.experts, cell.skew)
    targets = [x, w] if train else []
    spec = SPECS[OP]
    sig = spec.signature(spec.meta(x, w, None, offsets), False)
    out: list[Variant] = []

    def wrap(fn: Any) -> Any:
        return _pass_fn(cell.pass_, fn, targets, gen)

    for name in implementations(OP):
        implementation = spec.registry[name]
        reasons = implementation.not_supported_reasons(sig)
        if not reasons and implementation.extra_memory(sig) > env.max_workspace:
            reasons = [f"needs {implementation.extra_memory(sig) / 2**30:.2g} GiB of workspace"]
        if reasons:
            out.append(Variant(name, "impl", status="n/a: " + "; ".join(reasons)[:120]))
            continue
        out.append(Variant(name, "impl", wrap(lambda name=name: grouped_linear(x, w, offsets=offsets, impl=name))))
    auto = wrap(lambda: grouped_linear(x, w, offsets=offsets))
    with torch.set_grad_enabled(train):
        prewarm(OP, x, w, None, offsets)
        # a decision timed through a busy spell is provisional: the next call tunes it once more;
        # here, not in the first timed call (which the timing would then report as auto's time)
        auto()
        found = lookup(OP, x, w, None, offsets)
    cell.auto_impl = None if found is None else found.impl
    out.append(Variant("auto", "auto", auto))

    def python_loop() -> torch.Tensor:  # what transformers' "eager" experts do, rows already sorted
        ends, start, pieces = offsets.tolist(), 0, []
        for g, end in enumerate(ends):
            if end > start:
                pieces.append(F.linear(x[start:end], w[g]))
            start = end
        return torch.cat(pieces)

    out.append(Variant("python loop", "peer", wrap(python_loop)))
    mm = getattr(F, "grouped_mm", None)
    if mm is None or cell.dtype == torch.float64:
        out.append(Variant("F.grouped_mm", "peer", status="n/a: not in this torch, or float64"))
    else:
        out.append(Variant("F.grouped_mm", "peer", wrap(lambda: mm(x, w.transpose(1, 2), offs=offsets))))
    return out


def run(args: argparse.Namespace) -> int:
    """The ragged sweep for the ``bench`` options in ``args`` (``--quick``, ``--dtypes``, ``--passes``,
    ``--cell-time``, ``--reps``, ``--threads``, ``--markdown``, ``--json``, ``--plot``, ``--time-limit``)."""
    if args.from_json:  # measure nothing: re-render an earlier run
        data = json.loads(Path(args.from_json[0]).read_text(encoding="utf-8"))
        return _emit(cells_from_json(data), data["machine"], args)
    grid = GRIDS[args.grid]
    device = torch.device(args.device)
    if device.type != "cpu":
        print("bench --ragged: CPU only for now (the GPU steps are in scripts/gpu_check.sh)", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, n) for n in (args.dtypes or grid.dtypes)]
    passes = list(args.passes or ("fwd", "fwdbwd"))
    with _bench_environment(args), torch.random.fork_rng(devices=[]):
        machine = _machine(device, args)
        warning = busy_warning(machine.get("loadavg_start", [0.0])[0], os.cpu_count() or 1, torch.get_num_threads())
        if warning:
            print(f"bench: warning: {warning}", file=sys.stderr)
        bandwidth, rates = _measure_rates(device, dtypes, args.grid == "quick")
        machine["copy_GBps"] = round(bandwidth / 1e9, 2)
        machine["matmul_GFLOPs"] = {_dname(d): round(r / 1e9, 1) for d, r in rates.items()}
        env = Env(device=device, cell_time=args.cell_time or grid.cell_time, max_gflop=math.inf, mem_cap=math.inf,
                  max_workspace=(args.max_workspace_gb or 1.0) * 2**30, reps=max(1, args.reps),
                  min_sample=args.min_sample_ms / 1e3, seed=args.seed, bandwidth=bandwidth, matmul=rates,
                  wanted=None)
        cells = [RaggedCell(d, p, t, e, i, o, s) for d in dtypes for p in passes for (i, o) in grid.sizes
                 for e in grid.experts for t in grid.tokens for s in SKEWS]
        start = time.perf_counter()
        for cell in _progress(cells, args.no_progress):
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                cell.skipped = f"not reached within --time-limit {args.time_limit:g}s"
                continue
            _estimate(cell, env)
            try:
                variants = _variants(cell, env)
                cell.kinds = {v.name: v.kind for v in variants}
                cell.results, cell.medians = _measure_min(variants, env, cell.pass_, cell.dtype)
            except Exception as e:  # reported in the table; the sweep goes on
                cell.skipped = f"error: {_short(e)}"
        machine["elapsed_s"] = round(time.perf_counter() - start, 1)
        with contextlib.suppress(OSError, AttributeError):
            machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return _emit(cells, machine, args)


def cells_from_json(data: dict[str, Any]) -> list[Any]:
    """The cells of an earlier ``--json`` output (``bench --ragged --from-json FILE`` re-renders them)."""
    cells = []
    for c in data["cells"]:
        cell = RaggedCell(getattr(torch, c["dtype"]), c["pass"], c["T"], c["E"], c["in"], c["out"], c["skew"],
                          auto_impl=c["auto_impl"], floor_s=c["floor_s"], skipped=c["skipped"])
        for name, r in c["results"].items():
            cell.results[name] = Result(r["status"], r["min_s"], r["min_s"], r["median_s"], r["samples"] or 0,
                                        r["calls_per_sample"] or 0)
            cell.kinds[name] = r["kind"]
            if r["median_s"] is not None:
                cell.medians[name] = r["median_s"]
        cells.append(cell)
    return cells


def _emit(cells: list[RaggedCell], machine: dict[str, Any], args: argparse.Namespace) -> int:
    from .ragged_report import markdown, plot, summary, to_json

    print(summary(cells))
    if args.plot:
        written = plot(cells, Path(args.plot))
        machine["plot"] = str(written)
    if args.markdown:
        _write(args.markdown, markdown(cells, machine, Path(args.plot) if args.plot else None,
                                       Path(args.markdown).parent))
    if args.json:
        _write(args.json, json.dumps(to_json(cells, machine), indent=1, default=str) + "\n")
    return 0
