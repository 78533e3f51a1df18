"""Time the "grouped_ops" transformers experts backend against transformers' own backends.

Time the "grouped_ops" transformers experts backend against transformers' own (eager, batched_mm,
grouped_mm) on three experts blocks built from config objects (nothing downloaded).

    python scripts/moe_bench.py --markdown docs/benchmarks/moe.md --json docs/benchmarks/moe.json --plot docs/benchmarks/moe.png

Blocks (hidden, intermediate, experts, top-k): Mixtral-like (512, 1024, 8, 2), Qwen3-MoE-like
(256, 128, 64, 8), GPT-OSS-like (256, 256, 32, 4; transposed weights with biases and its own gate).
Tokens T = 1, 16, 128, 1024; forward and training step (forward + backward with a fixed upstream
gradient, to the input, the routing weights and every expert parameter); float32 and bfloat16. One
thread, every backend warmed up (grouped_ops tunes then, into a temporary cache unless
GROUPED_OPS_CACHE_DIR is set), then rounds in which each backend runs
once in turn (interleaved, so a load change hits all alike); the median per backend. The clock is
the thread's CPU time (``time.thread_time``): on a shared machine the wall clock mostly measures
the scheduler (other jobs preempt this one), while one thread's CPU time does not count the time it
waits; the wall-clock medians are kept beside it in the JSON.

The floor is docs/benchmarks/cpu.md's: max(bytes / copy bandwidth, FLOPs / matmul rate), both
measured at the start of the run. FLOPs = 2 * T*k * (H*I*(2 if gated) + I*H) forward, 3x that for a
training step; bytes = the weights (and biases) of the experts the routing touches + input + output
forward; a training step reads those weights twice and activations three times, and writes every
expert's weight gradient (a dense gradient has zeros for the experts no token chose).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

from grouped_ops.integrations import transformers as gt

BACKENDS = ("eager", "batched_mm", "grouped_mm", "grouped_ops")
BUILTIN = BACKENDS[:3]
TOKENS = (1, 16, 128, 1024)
GATHER_CAP = 1 << 30  # batched_mm gathers T*k weight matrices: not run past 1 GiB of them


def _blocks() -> dict:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts

    return {
        "mixtral-like": (lambda: MixtralExperts(MixtralConfig(hidden_size=512, intermediate_size=1024,
                                                              num_local_experts=8, num_experts_per_tok=2)), 2),
        "qwen3-moe-like": (lambda: Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128,
                                                                  num_experts=64, num_experts_per_tok=8)), 8),
        "gpt-oss-like": (lambda: GptOssExperts(GptOssConfig(hidden_size=256, intermediate_size=256,
                                                            num_local_experts=32, num_experts_per_tok=4)), 4),
    }


def _rates(dtypes: list) -> tuple[float, dict]:
    """Copy bandwidth and matmul rate per dtype as docs/benchmarks/cpu.md measures them (a 128 MiB
    copy, a 1536 square matmul, the best of a few), on this thread's CPU-time clock like the cells."""
    def best(fn, reps):
        fn()
        out = []
        for _ in range(reps):
            start = time.thread_time()
            fn()
            out.append(time.thread_time() - start)
        return min(out)
    src = torch.ones(128 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / best(lambda: dst.copy_(src), 5)
    rates = {}
    for dtype in dict.fromkeys([torch.float32, *dtypes]):
        a, b = torch.randn(1536, 1536).to(dtype), torch.randn(1536, 1536).to(dtype)
        rates[dtype] = 2 * 1536 ** 3 / best(lambda a=a, b=b: a @ b, 3)
    return bandwidth, rates


def _cell_inputs(block, k: int, t: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    e = block.num_experts
    h = block.down_proj.shape[2] if block.is_transposed else block.down_proj.shape[1]
    x = torch.randn(t, h, generator=g).to(dtype)
    w, idx = torch.topk(torch.randn(t, e, generator=g).softmax(-1), k)  # float32 routing weights
    return x, idx, w


def _work(block, idx: torch.Tensor, dtype: torch.dtype, train: bool) -> tuple[float, float]:
    touched = torch.unique(idx).numel()
    every = sum(p.numel() for p in block.parameters())
    params = every / block.num_experts * touched
    t, k = idx.shape
    up = block.gate_up_proj if block.has_gate else block.up_proj
    h, i_up = (up.shape[1], up.shape[2]) if block.is_transposed else (up.shape[2], up.shape[1])
    flops = 2 * t * k * (h * i_up + h * i_up // (2 if block.has_gate else 1))
    acts = 2 * t * h * dtype.itemsize
    if train:
        return 3 * flops, (2 * params + every) * dtype.itemsize + 3 * acts
    return flops, params * dtype.itemsize + acts


def _step(block, name: str, x, idx, w, train: bool, grad):
    """One call with backend ``name`` (chosen inside the call: the blocks share their config)."""
    config = block.config
    if not train:
        def forward():
            config._experts_implementation = name
            return block(x, idx, w)
        return forward

    def run():
        config._experts_implementation = name
        for p in block.parameters():
            p.grad = None
        xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = block(xx, idx, ww)
        y.backward(grad)  # a full upstream gradient: grouped_mm's backward refuses a stride-0 one
        return y
    return run


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _time(fns: dict, rounds: int, min_s: float) -> tuple[dict, dict]:
    """Median CPU time and median wall time per call of each function, interleaved."""
    numbers = {}
    for name, fn in fns.items():  # warm-up (grouped_ops tunes in the first calls); calls per sample from it
        for _ in range(3):
            fn()
        start = time.thread_time()
        fn()
        once = time.thread_time() - start
        numbers[name] = max(1, math.ceil(min_s / max(once, 1e-6)))
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    wall: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, start_wall = time.thread_time(), time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            cpu[name].append((time.thread_time() - start) / numbers[name])
            wall[name].append((time.perf_counter() - start_wall) / numbers[name])
    return ({n: statistics.median(s) for n, s in cpu.items()}, {n: statistics.median(s) for n, s in wall.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    ap.add_argument("--blocks", nargs="*", default=None)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--passes", nargs="*", default=["forward", "train"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-sample-ms", type=float, default=20.0)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    ap.add_argument("--pyg", help="instead: time the PyG HeteroLinear re-route, write this markdown file")
    ap.add_argument("--pyg-unsorted", help="instead: the same with rows in no order (is_sorted=False)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # tuning starts from an empty cache, as on a user's first run, and leaves the user's own alone
    os.environ.setdefault("GROUPED_OPS_CACHE_DIR", tempfile.mkdtemp(prefix="moe-bench-"))
    if args.pyg:
        return _pyg(args)
    if args.pyg_unsorted:
        return _pyg_unsorted(args)
    gt.register()
    blocks = _blocks()
    names = args.blocks or list(blocks)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    bandwidth, rates = _rates(dtypes)
    import transformers

    meta = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(), "copy_GBps": bandwidth / 1e9,
            "matmul_GFLOPs": {str(d).removeprefix("torch."): r / 1e9 for d, r in rates.items()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    cells = []
    for bname in names:
        make, k = blocks[bname]
        for dtype in dtypes:
            torch.manual_seed(0)
            block = make().to(dtype)
            with torch.no_grad():
                for p in block.parameters():
                    p.normal_(0, 0.02)
            for t in args.tokens:
                x, idx, w = _cell_inputs(block, k, t, dtype, seed=t)
                for pass_ in args.passes:
                    train = pass_ == "train"
                    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
                    fns, skipped = {}, {}
                    for name in BACKENDS:
                        gathered = t * k * sum(p[0].numel() for p in block.parameters()) * dtype.itemsize
                        if name == "batched_mm" and gathered * (2 if train else 1) > GATHER_CAP:
                            skipped[name] = f"gathers {gathered / 2**30:.1f} GiB of weights"
                            continue
                        step = _step(block, name, x, idx, w, train, grad)
                        fns[name] = _no_grad(step) if not train else step
                    times, walls = _time(fns, args.rounds, args.min_sample_ms / 1e3)
                    flops, nbytes = _work(block, idx, dtype, train)
                    t_mem, t_flop = nbytes / bandwidth, flops / rates[dtype]
                    floor = max(t_mem, t_flop)
                    best_builtin = min((n for n in BUILTIN if n in times), key=times.__getitem__)
                    cell = {"block": bname, "dtype": str(dtype).removeprefix("torch."), "tokens": t, "pass": pass_,
                            "times_s": times, "wall_s": walls, "skipped": skipped, "fastest_builtin": best_builtin,
                            "speedup": times[best_builtin] / times["grouped_ops"],
                            "flops": flops, "bytes": nbytes, "floor_s": floor, "bound": "compute" if t_flop >= t_mem else "memory",
                            "floor_share": floor / times["grouped_ops"], "loadavg": os.getloadavg()[0]}
                    cells.append(cell)
                    print(f"{bname:15} {cell['dtype']:8} T={t:<5} {pass_:7} " +
                          " ".join(f"{n}={v * 1e3:.3f}ms" for n, v in times.items()) +
                          f" | x{cell['speedup']:.2f} vs {best_builtin}, floor share {cell['floor_share']:.1%}"
                          f" | load {cell['loadavg']:.2f}", flush=True)
    meta["loadavg_end"] = os.getloadavg()
    speedups = [c["speedup"] for c in cells]
    meta["geomean_speedup"] = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    meta["worst_speedup"] = min(speedups)
    print(f"geomean x{meta['geomean_speedup']:.2f} over {len(cells)} cells, worst x{meta['worst_speedup']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(meta, cells))
    if args.plot:
        _plot(cells, args.plot)
    return 0


def _pyg_command(args) -> str:
    return (f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`; one thread, CPU time per "
            f"call, medians of {args.rounds} interleaved rounds; load average at start "
            f"{tuple(round(v, 2) for v in os.getloadavg())}")


def _pyg_table(args, path: str, lines: list, cell) -> int:
    """The PyG grid (8 and 32 types, N = 256 and 4096, each pass) as rows of ``cell``, into ``path``."""
    for types in (8, 32):
        for n in (256, 4096):
            for pass_ in args.passes:
                lines.append(cell(types, n, pass_ == "train", args) + f" | {os.getloadavg()[0]:.1f} |")
                print(lines[-1], flush=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


def _pyg_row(types: int, n: int, train: bool, times: dict, ratios: tuple) -> str:
    """A table row: the cell, every column's time in ms, then the speed-ups (without the load column)."""
    return (f"| {types} | {n} | {'train' if train else 'forward'} | " + " | ".join(_ms(t) for t in times.values()) +
            "".join(f" | x{r:.2f}" for r in ratios))


def _pyg_twins(types: int, is_sorted: bool):
    """HeteroLinear(64, 64, types) and a re-routed copy with the same parameters."""
    from torch_geometric.nn import HeteroLinear

    from grouped_ops.integrations import pyg

    torch.manual_seed(0)
    lin, routed = HeteroLinear(64, 64, types, is_sorted=is_sorted), HeteroLinear(64, 64, types, is_sorted=is_sorted)
    routed.load_state_dict(lin.state_dict())
    return lin, pyg.reroute(routed)


def _pyg_times(calls: dict, modules: tuple, x, grad, train: bool, args) -> dict:
    """Median CPU time per call of each of ``calls`` (``fn(x)``), forward or training step
    (gradients to x and every parameter of ``modules``, set to None before each step)."""
    def step(call):
        if not train:
            return _no_grad(lambda: call(x))

        def run():
            for m in modules:
                for p in m.parameters():
                    p.grad = None
            call(x.detach().requires_grad_()).backward(grad)
        return run
    return _time({name: step(c) for name, c in calls.items()}, args.rounds, args.min_sample_ms / 1e3)[0]


def _pyg(args) -> int:
    """HeteroLinear (in = out = 64, sorted rows) against F.grouped_mm on the sorted rows and the
    re-route, forward and training step (gradients to x, weight and bias)."""
    lines = [_pyg_command(args), "",
             "`F.grouped_mm` is given the offsets, made before the clock starts; `F.grouped_mm from type_vec` "
             "makes them from `type_vec` in each call, as a `forward(x, type_vec)` written on it must (one "
             "`searchsorted`). The re-routed module makes them at its first call with a `type_vec` and keeps "
             "them for a `type_vec` of the same values (the full-graph case); `re-routed, new type_vec` "
             "passes two `type_vec`s of other values in turn (the mini-batch case), so it makes them every "
             "time, as `F.grouped_mm from type_vec` does.", "",
             "| types | N | pass | HeteroLinear ms | F.grouped_mm ms | F.grouped_mm from type_vec ms | "
             "re-routed HeteroLinear ms | re-routed, new type_vec ms | hetero_linear ms | "
             "re-routed vs fastest other | re-routed, new type_vec, vs the fastest taking type_vec | load |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return _pyg_table(args, args.pyg, lines, _pyg_cell)


def _pyg_cell(types: int, n: int, train: bool, args) -> str:
    import torch.nn.functional as F

    from grouped_ops.integrations import pyg

    lin, routed = _pyg_twins(types, is_sorted=True)
    type_vec = torch.randint(0, types, (n,)).sort().values
    offsets = torch.searchsorted(type_vec, torch.arange(types), right=True, out_int32=True)
    x, grad = torch.randn(n, 64), torch.randn(n, 64)
    types_ = torch.arange(types)
    # two type_vecs of other values in turn: the re-routed module, which keeps the last one's offsets,
    # makes them on every call (as a mini-batch loader's new batches make it)
    alternate = itertools.cycle([type_vec, torch.randint(0, types, (n,)).sort().values])

    def from_type_vec(xx):  # what a forward(x, type_vec) written on F.grouped_mm runs: offsets made from type_vec
        offs = torch.searchsorted(type_vec, types_, right=True, out_int32=True)
        return F.grouped_mm(xx, lin.weight, offs=offs) + lin.bias[type_vec]

    calls = {"HeteroLinear": lambda xx: lin(xx, type_vec),
             "F.grouped_mm": lambda xx: F.grouped_mm(xx, lin.weight, offs=offsets) + lin.bias[type_vec],
             "F.grouped_mm from type_vec": from_type_vec,
             "re-routed": lambda xx: routed(xx, type_vec),
             "re-routed, new type_vec": lambda xx: routed(xx, next(alternate)),  # its kept offsets never reused
             "hetero_linear": lambda xx: pyg.hetero_linear(xx, lin.weight, lin.bias, offsets)}

    times = _pyg_times(calls, (lin, routed), x, grad, train, args)
    other = min(times["HeteroLinear"], times["F.grouped_mm"])
    same_inputs = min(times["HeteroLinear"], times["F.grouped_mm from type_vec"])
    return _pyg_row(types, n, train, times, (other / times["re-routed"], same_inputs / times["re-routed, new type_vec"]))


def _pyg_unsorted(args) -> int:
    """HeteroLinear(is_sorted=False) (in = out = 64, rows in no order) against F.grouped_mm written
    for such rows and the re-route, forward and training step: each with one type_vec on every call,
    and with two of other values in turn."""
    lines = [_pyg_command(args), "",
             "Rows in random type order, `is_sorted=False`. `F.grouped_mm, sorting` sorts `type_vec` (stable), "
             "gathers the rows (`index_select`), makes the offsets, adds the bias (`index_select`) and puts the "
             "rows back (`index_copy_`) in each call: the fastest such code measured here (indexing, `x[perm]`, "
             "was slower). Each runs with the same `type_vec` on every call (the full-graph case: the re-routed "
             "module keeps its sort for a `type_vec` of the same values) and, `new type_vec`, with two of other "
             "values in turn (the mini-batch case: everything is made every call).", "",
             "| types | N | pass | HeteroLinear ms | F.grouped_mm, sorting ms | re-routed HeteroLinear ms | "
             "HeteroLinear, new type_vec ms | F.grouped_mm, sorting, new type_vec ms | re-routed, new type_vec ms | "
             "re-routed vs fastest other | re-routed vs fastest other, new type_vec | load |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return _pyg_table(args, args.pyg_unsorted, lines, _pyg_unsorted_cell)


def _pyg_unsorted_cell(types: int, n: int, train: bool, args) -> str:
    import torch.nn.functional as F

    lin, routed = _pyg_twins(types, is_sorted=False)
    type_vec, other_vec = torch.randint(0, types, (n,)), torch.randint(0, types, (n,))
    x, grad = torch.randn(n, 64), torch.randn(n, 64)
    types_ = torch.arange(types)

    def sorting(xx, tv):  # what a forward(x, type_vec) written on F.grouped_mm runs for rows in no order
        sorted_types, perm = torch.sort(tv, stable=True)
        offs = torch.searchsorted(sorted_types, types_, right=True, out_int32=True)
        out = F.grouped_mm(xx.index_select(0, perm), lin.weight, offs=offs) + lin.bias.index_select(0, sorted_types)
        return torch.empty_like(out).index_copy_(0, perm, out)

    def turns(call):  # two type_vecs of other values in turn
        vecs = itertools.cycle([type_vec, other_vec])
        return lambda xx: call(xx, next(vecs))
    calls = {"HeteroLinear": lambda xx: lin(xx, type_vec), "F.grouped_mm, sorting": lambda xx: sorting(xx, type_vec),
             "re-routed": lambda xx: routed(xx, type_vec), "HeteroLinear, new": turns(lin),
             "F.grouped_mm, sorting, new": turns(sorting), "re-routed, new": turns(routed)}

    times = _pyg_times(calls, (lin, routed), x, grad, train, args)
    same = min(times["HeteroLinear"], times["F.grouped_mm, sorting"])
    new = min(times["HeteroLinear, new"], times["F.grouped_mm, sorting, new"])
    return _pyg_row(types, n, train, times, (same / times["re-routed"], new / times["re-routed, new"]))


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def _markdown(meta: dict, cells: list) -> str:
    lines = [f"- command: `{meta['command']}`",
             f"- date {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"{meta['threads']} thread; copy {meta['copy_GBps']:.1f} GB/s, matmul "
             + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in meta["matmul_GFLOPs"].items()),
             f"- load average at start {tuple(round(v, 2) for v in meta['loadavg_start'])}, at end "
             f"{tuple(round(v, 2) for v in meta['loadavg_end'])}",
             f"- grouped_ops over the fastest built-in: geometric mean x{meta['geomean_speedup']:.2f} over "
             f"{len(cells)} cells, worst x{meta['worst_speedup']:.2f}", "",
             "CPU time of the one thread per call, medians of interleaved rounds (wall-clock medians in "
             "the JSON).", "",
             "| block | dtype | pass | T | eager ms | batched_mm ms | grouped_mm ms | grouped_ops ms | "
             "vs fastest built-in | floor ms | bound | grouped_ops % of floor | load |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for c in cells:
        t = c["times_s"]
        cols = [_ms(t[n]) if n in t else "skipped" for n in BACKENDS]
        lines.append(f"| {c['block']} | {c['dtype']} | {c['pass']} | {c['tokens']} | " + " | ".join(cols) +
                     f" | x{c['speedup']:.2f} ({c['fastest_builtin']}) | {_ms(c['floor_s'])} | {c['bound']} | "
                     f"{100 * c['floor_share']:.1f}% | {c['loadavg']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(cells: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c["block"], c["dtype"], c["pass"]) for c in cells})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for g in groups:
        cs = sorted((c for c in cells if (c["block"], c["dtype"], c["pass"]) == g), key=lambda c: c["tokens"])
        ax.plot([c["tokens"] for c in cs], [c["speedup"] for c in cs], marker="o",
                linestyle="-" if g[2] == "forward" else "--", label=" ".join(g))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.2, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("tokens T")
    ax.set_ylabel("fastest built-in time / grouped_ops time")
    ax.set_title("grouped_ops experts backend vs transformers' fastest built-in (CPU, 1 thread)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
