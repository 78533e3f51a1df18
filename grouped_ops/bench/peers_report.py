"""GroupedLinear against the layers users already write, on CPU (the peers benchmark).

Run as ``python -m grouped_ops bench --peers`` (or ``python scripts/peers_bench.py``); writes a
markdown report, its JSON and (with matplotlib) a plot.

Three tables, each measured side by side in one run (interleaved rounds in a shuffled order, the
median round per pass, the median of ``--passes`` passes over the whole grid; 1 and 2 threads):

1. peers: GroupedLinear vs TabM-style bmm layer, torch.func vmap ensemble, compiled ModuleList
   loop and the loop itself, every one built from the same ModuleList; forward (no grad) and a
   training step (zero_grad + forward + backward);
2. compiled: a two-layer model with GroupedLinear vs the same model with the TabM layer, both
   under torch.compile;
3. auto: GroupedLinear(impl="auto") vs each implementation forced, on shapes no table ships.

    python scripts/peers_bench.py                      # the full run (a minute or two on 2 cores)
    python scripts/peers_bench.py --quick --out /tmp/p # a smoke run

Tuning starts from an empty cache (a temporary GROUPED_OPS_CACHE_DIR), as on a user's first run.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import peers
from .. import signature as _signature
from ..ops.grouped_linear import SPEC as _GL

# (batch, n, in, out): none is a shape of the tests; two are the examples
PEER_SHAPES = [(1, 32, 64, 64), (32, 8, 64, 64), (256, 32, 16, 16), (64, 16, 128, 128),
               (256, 8, 256, 64), (16, 64, 256, 256), (512, 4, 64, 256), (128, 32, 32, 32)]
COMPILED_SHAPES = [(32, 8, 64, 64), (256, 32, 16, 16), (64, 16, 128, 128), (16, 64, 256, 256)]
# shapes in no shipped table (n, in, out and batch off the tuned grid)
AUTO_SHAPES = [(48, 12, 48, 80), (200, 6, 96, 40), (8, 24, 160, 160), (1000, 3, 24, 24),
               (96, 40, 20, 60), (24, 16, 320, 96), (300, 10, 64, 128), (3, 48, 64, 64)]
PEER_VARIANTS = ("grouped", "grouped_in_out", "tabm", "tabm_contiguous", "vmap", "loop", "compiled_loop")
# not peers: GroupedLinear's two weight layouts, and the TabM layer made to keep our output contract
OURS = ("grouped", "grouped_in_out", "tabm_contiguous")
COMPILED_VARIANTS = ("compiled_grouped_mlp", "compiled_tabm_mlp")
QUICK = {"peers": [(32, 8, 64, 64), (128, 32, 32, 32)], "compiled": [(32, 8, 64, 64)],
         "auto": [(48, 12, 48, 80)], "heldout": [(32, 8, 64, 64)]}
# The held-out grid: drawn from this seed by this rule, committed before anything was tuned on it
# (issue 22). batch = round(2^U(0, 10)), n = round(2^U(1, 6)), in and out = 8 * round(2^U(0, 5));
# a shape of PEER_SHAPES or AUTO_SHAPES, a repeat, or over 2^25 multiply-adds is drawn again.
HELD_OUT_SEED, HELD_OUT_COUNT = 2222, 8


def held_out_shapes(seed: int = HELD_OUT_SEED, count: int = HELD_OUT_COUNT) -> list[tuple[int, int, int, int]]:
    """The held-out grid's ``(batch, n, in, out)`` shapes (see :data:`HELD_OUT_SEED`)."""
    rng = random.Random(seed)
    shapes: list[tuple[int, int, int, int]] = []
    while len(shapes) < count:
        shape = (round(2 ** rng.uniform(0, 10)), round(2 ** rng.uniform(1, 6)),
                 8 * round(2 ** rng.uniform(0, 5)), 8 * round(2 ** rng.uniform(0, 5)))
        if shape in PEER_SHAPES or shape in AUTO_SHAPES or shape in shapes or math.prod(shape) > 2 ** 25:
            continue
        shapes.append(shape)
    return shapes


def skip_slow_compiles(shape: peers.Shape, mode: str, variant: str) -> bool:
    # compiling the loop's backward unrolls n layers: 16 s at n=32, 93 s at n=64 (2 busy cores)
    return variant == "compiled_loop" and mode == "train" and shape.n > 16


def main(argv: Sequence[str] | None = None, *, program: str = "python scripts/peers_bench.py") -> int:
    """Run the comparison with the script's options (``--help``); returns the exit status."""
    os.environ.setdefault("GROUPED_OPS_CACHE_DIR", tempfile.mkdtemp(prefix="peers-bench-"))
    ap = argparse.ArgumentParser(prog=program, description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per cell and pass")
    ap.add_argument("--quick", action="store_true", help="a few shapes, for a smoke run")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="per cell and pass: the median round, or the fastest (robust on a loaded machine)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["peers", "heldout", "compiled", "auto", "overhead"])
    ap.add_argument("--out", default="docs/benchmarks/peers", help="path stem of the .md/.json/.png")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    command = " ".join([program, *(shlex.quote(a) for a in argv)])
    start = time.time()
    load_before = _load()

    def progress(what: str) -> None:
        print(f"[{time.time() - start:6.0f}s] {what}", file=sys.stderr, flush=True)

    common = {"threads": args.threads, "passes": args.passes, "rounds": args.rounds, "progress": progress,
              "stat": args.stat}
    results: dict[str, list[dict]] = {}
    if "peers" not in args.skip:
        shapes = QUICK["peers"] if args.quick else PEER_SHAPES
        results["peers"] = peers.run_peers(shapes, variants=PEER_VARIANTS, skip=skip_slow_compiles, **common)
    if "heldout" not in args.skip:
        shapes = QUICK["heldout"] if args.quick else held_out_shapes()
        results["heldout"] = peers.run_peers(shapes, variants=PEER_VARIANTS, skip=skip_slow_compiles, **common)
    if "compiled" not in args.skip:
        shapes = QUICK["compiled"] if args.quick else COMPILED_SHAPES
        results["compiled"] = peers.run_peers(shapes, variants=COMPILED_VARIANTS, **common)
    if "auto" not in args.skip:
        shapes = QUICK["auto"] if args.quick else AUTO_SHAPES
        impls = [f"grouped:{name}" for name in _GL.registry]
        results["auto"] = peers.run_peers(shapes, variants=("grouped", *impls), skip=_skip_impl, **common)
    if "overhead" not in args.skip:
        progress("per-call overhead")
        results["overhead"] = peers.module_overhead(rounds=11 if args.quick else 41)
    meta = {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "minutes": round((time.time() - start) / 60, 1), "passes": args.passes, "rounds": args.rounds,
            "load_before": load_before, "load_after": _load(), "stat": args.stat}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    report = render(results, meta)
    out.with_suffix(".md").write_text(report)
    plotted = plot(results, out.with_suffix(".png"))
    print(report)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}"
          + (f", {out.with_suffix('.png')}" if plotted else " (no matplotlib: no plot)"), file=sys.stderr)
    return 0


def cpu_model() -> str:
    """The CPU's model name: the speed-ups move with it (issue 22: AMD EPYC and Intel Xeon differ by
    up to 0.2x in some cells)."""
    return _signature.cpu_model()


def _load() -> str:
    """1-minute load average (other processes' work on these cores shows up as noise)."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"


def _skip_impl(shape: peers.Shape, mode: str, variant: str) -> bool:
    # masked_dense multiplies by an [n*out, n*in] block matrix: n x the work, never close at n > 8
    return variant == "grouped:masked_dense" and shape.n > 8


# ---- the report --------------------------------------------------------------------------------------

def _cells(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((tuple(r["shape"]), r["threads"], r["mode"]), {})[r["variant"]] = r
    return cells


def _pass_geomeans(rows: list[dict], ours: str, versus: list[str] | None = None) -> list[float]:
    """Per pass, the geometric mean over cells of (best other variant / ours)."""
    per_pass: list[list[float]] = []
    for variants in _cells(rows).values():
        others = [v for k, v in variants.items() if k != ours and k not in OURS and (versus is None or k in versus)]
        for p, t in enumerate(variants[ours]["passes_us"]):
            if len(per_pass) <= p:
                per_pass.append([])
            per_pass[p].append(min(o["passes_us"][p] for o in others) / t)
    return [peers.geomean(v) for v in per_pass]


def _table(rows: list[dict], ours: str, order: list[str], label: str) -> tuple[list[str], list[float]]:
    lines = [f"| batch, n, in→out | threads | pass | {' | '.join(order)} | {label} |",
             "|---|---:|---|" + "---:|" * (len(order) + 1)]
    ratios = []
    for (shape, threads, mode), variants in sorted(_cells(rows).items()):
        b, n, i, o = shape
        others = {k: v["us"] for k, v in variants.items() if k != ours and k not in OURS}
        best = min(others, key=others.__getitem__)
        ratio = others[best] / variants[ours]["us"]
        ratios.append(ratio)
        cols = [f"{variants[k]['us']:.0f}" if k in variants else "—" for k in order]
        lines.append(f"| {b}, {n}, {i}→{o} | {threads} | {mode} | {' | '.join(cols)} | "
                     f"{ratio:.2f}x ({best}) |")
    return lines, ratios


def _verdict(ratios: list[float], per_pass: list[float]) -> str:
    return (f"geometric mean **{peers.geomean(ratios):.3f}x**, worst cell **{min(ratios):.2f}x**, "
            f"best cell {max(ratios):.2f}x over {len(ratios)} cells; per-pass geometric means "
            f"{', '.join(f'{g:.3f}' for g in per_pass)} (median {statistics.median(per_pass):.3f})")


def _contract_line(rows: list[dict]) -> str:
    """GroupedLinear against the TabM layer made to return what GroupedLinear returns."""
    ratios = [v["tabm_contiguous"]["us"] / v["grouped"]["us"] for v in _cells(rows).values()
              if "tabm_contiguous" in v and "grouped" in v]
    if not ratios:
        return ""
    contract = [v["tabm"]["us"] / v["tabm_contiguous"]["us"] for v in _cells(rows).values()
                if "tabm_contiguous" in v and "tabm" in v]
    return (f"Against `tabm_contiguous` (the contiguous contract before issue 22), GroupedLinear's geometric "
            f"mean is **{peers.geomean(ratios):.3f}x** (worst cell {min(ratios):.2f}x); that contract would cost "
            f"the TabM layer {peers.geomean(contract):.3f}x in geometric mean (worst cell {min(contract):.2f}x).")


def render(results: dict[str, list[dict]], meta: dict) -> str:
    out = ["# GroupedLinear against the layers users already write (CPU)", "",
           f"Command: `{meta['command']}` ({meta['minutes']} min; torch {meta['torch']}, "
           f"CPU: {meta.get('cpu_model', meta['machine'])}, {meta['cpus']} CPUs, load average {meta['load_before']} before and {meta['load_after']} "
           f"after; {meta['passes']} passes of {meta['rounds']} interleaved rounds, the "
           f"{'fastest' if meta.get('stat') == 'min' else 'median'} round of each; "
           "microseconds per call, the median pass). Reproduce with that command; "
           "`grouped_ops.peers.run_peers` is the function behind it.", "",
           "Speed-up = the fastest other column's time / GroupedLinear's (>= 1: GroupedLinear is "
           "at least as fast). `fwd`: forward under no_grad; `train`: zero_grad + forward + "
           "backward (into the input too).", ""]
    if "peers" in results:
        lines, ratios = _table(results["peers"], "grouped", list(PEER_VARIANTS), "GroupedLinear vs best peer")
        out += ["## 1. GroupedLinear vs its peers", "",
                "`grouped` is GroupedLinear as constructed by default (nn.Linear's contiguous weight "
                "layout); `grouped_in_out` with `weight_layout=\"in_out\"`; `tabm_contiguous` is the "
                "TabM layer with `.contiguous()` on its result (grouped_ops' output contract before "
                "issue 22; since then GroupedLinear returns TabM's own group-major layout). These two "
                "are not peers, shown for comparison. "
                "Peers: `tabm` (weight [n, in, out], `(x.transpose(0, 1) @ W).transpose(0, 1) + b`), "
                "`vmap` (torch.func stack_module_state + functional_call), `loop` (ModuleList + "
                "torch.stack), `compiled_loop` (that loop under torch.compile; its training step is "
                "not compiled for n > 16, where compiling takes minutes). All built from one ModuleList.",
                "", *lines, "", _verdict(ratios, _pass_geomeans(results["peers"], "grouped")), "",
                _contract_line(results["peers"]), ""]
    if "heldout" in results:
        lines, ratios = _table(results["heldout"], "grouped", list(PEER_VARIANTS), "GroupedLinear vs best peer")
        out += ["## 1b. The same, on the held-out grid", "",
                f"Shapes drawn by `held_out_shapes()` (seed {HELD_OUT_SEED}, rule in "
                "`grouped_ops/bench/peers_report.py`), committed before anything was tuned on them; "
                "no test or shipped table uses them.", "", *lines, "",
                _verdict(ratios, _pass_geomeans(results["heldout"], "grouped")), ""]
    if "compiled" in results:
        lines, ratios = _table(results["compiled"], "compiled_grouped_mlp", list(COMPILED_VARIANTS),
                               "GroupedLinear model vs TabM model")
        out += ["## 2. Under torch.compile", "",
                "`layer(in→out), ReLU, layer(out→out)`, built with GroupedLinear or with the TabM "
                "layer, compiled (default mode, static shapes: `dynamic=False`, each model for its "
                "cell's shapes) after GroupedLinear's eager tuning.", "", *lines, "",
                _verdict(ratios, _pass_geomeans(results["compiled"], "compiled_grouped_mlp")), ""]
    if "auto" in results:
        rows = results["auto"]
        impls = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "grouped"]
        lines, ratios = _table(rows, "grouped", ["grouped", *impls], "auto vs fastest impl")
        slow = [1 / r for r in ratios]
        out += ["## 3. `auto` vs the fastest implementation, unseen shapes", "",
                "GroupedLinear(impl=\"auto\") against each implementation forced (`grouped:<impl>`), "
                "on shapes in no shipped table, tuned from an empty cache at the first call. "
                "(masked_dense is left out for n > 8: n times the work.)", "", *lines, "",
                f"auto's time / the fastest's: geometric mean **{peers.geomean(slow):.3f}**, "
                f"worst cell **{max(slow):.2f}** over {len(slow)} cells (goal: <= 1.05 and <= 1.15).", ""]
    if "overhead" in results:
        out += ["## 4. Per-call cost at tiny batches (the module's Python)", "",
                "A decided GroupedLinear forward against the TabM layer on the same weights, 32 groups "
                "of 64→64, one thread, no grad (`grouped_ops.peers.module_overhead`: per variant the "
                "fastest of many ~1 ms interleaved rounds, the median of 3 passes). `grouped_fn` is the "
                "functional `grouped_linear` on the module's parameters; `bmm_only` the one kernel "
                "that both run (the floor). Goal (issue 22): `grouped` − `tabm` ≤ 2 us.", "",
                "| batch | grouped (us) | grouped_fn (us) | tabm (us) | bmm_only (us) | grouped − tabm (us) |",
                "|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['batch']} | {r['grouped']:.1f} | {r['grouped_fn']:.1f} | {r['tabm']:.1f} | "
                f"{r['bmm_only']:.1f} | {r['grouped_minus_tabm']:+.1f} |" for r in results["overhead"]]
        out.append("")
    return "\n".join(out)


def plot(results: dict[str, list[dict]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sections = [(k, ours) for k, ours in (("peers", "grouped"), ("heldout", "grouped"),
                                          ("compiled", "compiled_grouped_mlp"), ("auto", "grouped")) if k in results]
    fig, axes = plt.subplots(len(sections), 1, figsize=(11, 3.2 * len(sections)), squeeze=False)
    for ax, (key, ours) in zip(axes[:, 0], sections, strict=True):
        labels, ratios = [], []
        for (shape, threads, mode), variants in sorted(_cells(results[key]).items()):
            others = [v["us"] for k, v in variants.items() if k != ours and (key == "auto" or k not in OURS)]
            labels.append(f"{shape[0]},{shape[1]},{shape[2]}→{shape[3]} t{threads} {mode}")
            ratios.append(min(others) / variants[ours]["us"])
        ax.bar(range(len(ratios)), ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.95, color="gray", lw=0.6, ls="--")
        ax.set_xticks(range(len(labels)), labels, rotation=75, fontsize=6)
        ax.set_ylabel("best other / ours")
        ax.set_title({"peers": "GroupedLinear vs best peer", "heldout": "held-out grid: GroupedLinear vs best peer",
                      "compiled": "compiled model: GroupedLinear vs TabM",
                      "auto": "auto vs fastest implementation"}[key], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def from_bench(args: argparse.Namespace) -> int:
    """``python -m grouped_ops bench --peers``: the comparison, with the bench options that apply
    (``--quick``, ``--threads``; ``--markdown FILE`` names where the report, its JSON and plot go)."""
    argv = ["--quick"] if args.grid == "quick" else []
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.markdown:
        argv += ["--out", str(Path(args.markdown).with_suffix(""))]
    else:
        argv += ["--out", str(Path(tempfile.mkdtemp(prefix="peers-report-")) / "peers")]
    return main(argv, program="python -m grouped_ops bench --peers")
