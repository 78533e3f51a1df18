"""Is `auto` within 5% of the fastest implementation? Pairwise, interleaved, per cell.

A crowded benchmark cell (every implementation round-robin) carries each variant's after-effects into
the next (masked_dense's large allocations slow whatever follows), which biases single columns by
10-60% on a 2-core VM. This check isolates the question. Every cell of a bench --json run is
prewarmed first (into an empty cache, as a job prewarms before it trains); then, in each of
``--passes`` passes over all cells, `auto` is timed against each implementation that was within 1.3x
of that cell's fastest, two at a time, alternating, and the median of the paired ratios is taken. A
cell's ratio is its median pass: the machine's busy spells last seconds, so passes a minute apart
measure the same fixed decision independently.

    python3 scripts/auto_check.py docs/benchmarks/auto-check.json [--threads 1] [--passes 3] [--fresh-process]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

import grouped_ops
from grouped_ops import recording

os.environ.setdefault("GROUPED_OPS_CACHE_DIR", tempfile.mkdtemp())
os.environ.setdefault("GROUPED_OPS_SHIPPED_DIR", tempfile.mkdtemp())  # tune everything: no shipped table


def inputs(cell: dict, gen: torch.Generator) -> tuple:
    dt, d = getattr(torch, cell["dtype"]), cell["dims"]
    grad = cell["pass"] == "fwdbwd"
    if cell["op"] == "grouped_linear":
        shapes = [(d["batch"], d["n"], d["in"]), (d["n"], d["out"], d["in"]), (d["n"], d["out"])]
        return tuple(torch.randn(s, dtype=dt, generator=gen).requires_grad_(grad) for s in shapes)
    f = d["features"]
    if d["layout"] == "stacked":
        x = torch.randn(d["batch"], d["k"], *f, dtype=dt, generator=gen).requires_grad_(grad)
    else:
        x = [torch.randn(d["batch"], *f, dtype=dt, generator=gen).requires_grad_(grad) for _ in range(d["k"])]
    return (x, torch.randn(d["batch"], d["k"], dtype=dt, generator=gen).softmax(-1).requires_grad_(grad))


def runner(op: Callable, args: tuple, impl: str, grad: bool) -> Callable[[], None]:
    if not grad:
        def fwd() -> None:
            with torch.no_grad():
                op(*args, impl=impl)
        return fwd

    # A dense incoming gradient, as a layer inside a network receives (not .sum()'s stride-0 one).
    grad_out: list[torch.Tensor] = []

    leaves = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]

    def fwdbwd() -> None:
        for t in leaves:  # optimizer.zero_grad()'s default (set_to_none): each step starts clean
            t.grad = None
        out = op(*args, impl=impl)
        if not grad_out:
            grad_out.append(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)))
        out.backward(grad_out[0])
    return fwdbwd


def timed(fn: Callable[[], None], number: int) -> float:
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def _name(cell: dict) -> str:
    return f"{cell['op']} {cell['dtype']} {cell['pass']} {cell['label']}"


def prewarm_cells(cells: list[dict], second_opinion: bool) -> tuple[list[dict], float]:
    """Record every cell's signature (one forced call each, nothing tuned), then prewarm them all
    at once into the empty cache, as a job does before it trains: ``Recorder.prewarm``, which tunes
    close calls again after the others. Returns each cell's state and the prewarm's seconds."""
    states = [{"cell": c, "args": inputs(c, torch.Generator().manual_seed(0))} for c in cells]
    with grouped_ops.record() as rec:
        for st in states:
            with torch.set_grad_enabled(st["cell"]["pass"] == "fwdbwd"):
                getattr(grouped_ops, st["cell"]["op"])(*st["args"], impl="loop")
    assert len(rec.signatures) == len(states), "two cells share a signature"
    first_pass: list[float] = []

    def progress(done: int, total: int, sig: object, what: str) -> None:
        if what == "decided" and done == len(states):  # every signature tuned once
            first_pass.append(time.perf_counter() - start)

    start = time.perf_counter()
    decisions = recording.prewarm_signatures(rec.requests(), second_opinion=second_opinion, progress=progress)
    seconds = time.perf_counter() - start
    for st, decision in zip(states, decisions, strict=True):
        st["decision"] = decision
    return states, seconds, first_pass[0]


def measure(state: dict, samples: int) -> dict:
    """Time auto against each implementation that was within 1.3x of the cell's fastest, pairwise;
    the fastest of them, its time, auto's time and the median of their paired ratios."""
    cell, args = state["cell"], state["args"]
    op = getattr(grouped_ops, cell["op"])
    grad = cell["pass"] == "fwdbwd"
    times = {n: r["median_s"] for n, r in cell["results"].items()
             if r.get("kind") == "impl" and r.get("status") == "ok"}
    best = min(times.values())
    rivals = [n for n, t in times.items() if t <= 1.3 * best]
    auto = runner(op, args, "auto", grad)
    per_rival = {}
    first_pick = state["decision"].opinions[0] if state["decision"].opinions else None
    if first_pick is not None and first_pick not in rivals and first_pick in times:
        rivals.append(first_pick)  # so the report can say what the first tuning alone would have cost
    for name in rivals:
        forced = runner(op, args, name, grad)
        for f in (auto, forced, auto, forced):
            f()
        number = max(1, int(2e-3 / max(timed(forced, 1), 1e-7)))
        sa, sf = [], []
        for i in range(samples):
            pair = ((auto, sa), (forced, sf)) if i % 2 else ((forced, sf), (auto, sa))
            for fn, out in pair:
                out.append(timed(fn, number))
        # the median of the paired ratios: each pair ran back to back, so slow drifts cancel
        per_rival[name] = (statistics.median(sf), statistics.median(sa),
                           statistics.median(x / y for x, y in zip(sa, sf, strict=True)))
    fastest = min(per_rival, key=lambda n: per_rival[n][0])
    t_forced, t_auto, ratio = per_rival[fastest]
    forced = {n: v[0] for n, v in per_rival.items()}
    return {"fastest": fastest, "t_auto": t_auto, "t_forced": t_forced, "ratio": ratio, "forced": forced}


def check_cells(cells: list[dict], samples: int, passes: int, second_opinion: bool = True) -> list[dict]:
    """Prewarm every cell first (as a job prewarms before it trains), then measure every cell
    ``passes`` times, one pass over all cells after another, and keep each cell's median pass:
    the machine's slow spells last seconds, so passes minutes apart are independent measurements
    of the same, fixed decision."""
    states, prewarm_s, first_pass_s = prewarm_cells(cells, second_opinion)
    rounds = [[measure(st, samples) for st in states] for _ in range(passes)]
    results = []
    for i, st in enumerate(states):
        per_pass = sorted((r[i] for r in rounds), key=lambda m: m["ratio"])
        median = per_pass[len(per_pass) // 2]
        cell, decision = st["cell"], st["decision"]
        results.append({"name": _name(cell), "op": cell["op"], "pass": cell["pass"], "picked": decision.impl,
                        **median, "pass_ratios": [m["ratio"] for m in per_pass],
                        "tuned": dict(decision.timings), "opinions": list(decision.opinions),
                        "prewarm_s": prewarm_s / len(states), "first_tuning_s": first_pass_s / len(states),
                        "first_ratio": _first_ratio(median, decision)})
    return results


def _first_ratio(m: dict, decision: object) -> float:
    """What the first tuning's pick alone would have cost against the fastest: auto's paired ratio,
    scaled by the first pick's forced time over the final pick's (1 where they are the same)."""
    first = decision.opinions[0] if decision.opinions else decision.impl
    forced = m["forced"]
    if first == decision.impl or first not in forced or decision.impl not in forced:
        return m["ratio"]
    return m["ratio"] * forced[first] / forced[decision.impl]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=31)
    p.add_argument("--passes", type=int, default=3, help="measure every cell this many times; keep the median")
    p.add_argument("--single-opinion", action="store_true",
                   help="prewarm tunes each signature once (no second opinion on close calls)")
    p.add_argument("--only", default="", help="only cells whose 'op dtype pass label' contains this")
    p.add_argument("--fresh-process", action="store_true",
                   help="check each cell in a new Python process (no history from the other cells)")
    p.add_argument("--cell-index", type=int, help=argparse.SUPPRESS)  # one cell, as a JSON line (internal)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with open(a.json, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c.get("auto_over_best") and a.only in _name(c)]
    if a.cell_index is not None:
        print(json.dumps(check_cells([cells[a.cell_index]], a.samples, a.passes, not a.single_opinion)[0]))
        return
    if a.fresh_process:
        results = []
        for i in range(len(cells)):
            cmd = [sys.executable, __file__, a.json, "--threads", str(a.threads), "--samples", str(a.samples),
                   "--passes", str(a.passes), "--only", a.only, "--cell-index", str(i),
                   *(["--single-opinion"] if a.single_opinion else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    else:
        results = check_cells(cells, a.samples, a.passes, not a.single_opinion)
    report(results, f"torch {torch.__version__}, {a.threads} thread(s), {len(cells)} cells from {a.json}, "
                    f"median of {a.passes} passes" + (", each cell in a fresh process" if a.fresh_process
                                                     else ", all in one process")
           + (", one tuning per signature" if a.single_opinion else ""))


def report(results: list[dict], header: str) -> None:
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in results:
        ratios.setdefault((r["op"], r["pass"]), []).append(r["ratio"])
    wrong = [r["ratio"] for r in results if r["picked"] != r["fastest"]]
    print(header)
    print("| op | pass | cells | auto / fastest, geometric mean | worst |")
    print("|---|---|---:|---:|---:|")
    for (op, pass_), rs in ratios.items():
        print(f"| {op} | {pass_} | {len(rs)} | {statistics.geometric_mean(rs):.3f} | {max(rs):.3f} |")
    every = [r["ratio"] for r in results]
    print(f"| all | | {len(every)} | {statistics.geometric_mean(every):.3f} | {max(every):.3f} |")
    print(f"\nauto picked the fastest implementation in {len(every) - len(wrong)} of {len(every)} cells; "
          f"where it picked another, the worst ratio was {max(wrong, default=1.0):.3f}. Where it picked the "
          "fastest, a ratio other than 1 is this machine's noise between two runs of one function.")
    firsts = [r["first_ratio"] for r in results]
    print(f"\nfirst tuning alone (what a first call decides): geometric mean {statistics.geometric_mean(firsts):.3f}, "
          f"worst {max(firsts):.3f}; {sum(r['first_tuning_s'] for r in results) / len(results):.3f} s per signature")
    total = sum(r["prewarm_s"] for r in results)
    again = [r for r in results if r["opinions"]]
    changed = [r for r in again if r["opinions"][0] != r["picked"]]
    print(f"\nprewarm: {total:.1f} s for {len(results)} signatures ({total / len(results):.2f} s each); "
          f"{len(again)} close calls tuned again ({sum(len(r['opinions']) == 3 for r in again)} a third time), "
          f"{len(changed)} picks changed by the vote")
    for r in changed:
        first, forced = r["opinions"][0], r["forced"]
        alone = f"{forced[first] / r['t_forced']:.3f}" if first in forced else "not measured"
        print(f"  {r['name']}: picks {', '.join(r['opinions'])} -> {r['picked']} ({r['ratio']:.3f}); "
              f"the first pick alone: {alone}")
    print("\nworst cells:")
    for r in sorted(results, key=lambda r: r["ratio"], reverse=True)[:5]:
        tuned = ", ".join(f"{n} {t * 1e6:.0f}" for n, t in sorted(r["tuned"].items(), key=lambda i: i[1])[:3])
        passes = ", ".join(f"{x:.3f}" for x in r["pass_ratios"])
        print(f"  {r['ratio']:.3f}  {r['name']}: auto ({r['picked']}) {r['t_auto'] * 1e6:.1f}us vs {r['fastest']} "
              f"{r['t_forced'] * 1e6:.1f}us (passes: {passes}; prewarm's medians, us: {tuned})")


if __name__ == "__main__":
    main()
