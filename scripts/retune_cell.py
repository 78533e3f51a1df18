"""Tune one auto-check cell several times and time its best candidates as the check does.

Tells a busy spell from a bias: if one tuning picked X but repeated tunings and the check-style
timings agree on Y, that tuning was a spell. ``--history`` first prewarms all 120 cells in this
process (one tuning each), as scripts/auto_check.py does, so the cell is tuned in the same state.
Each round tunes with every candidate, then with the first tuning's close contenders only (as a
second opinion does), then times the three best check-style (enough calls for 2 ms, median of 15).

    python3 scripts/retune_cell.py docs/benchmarks/auto-check.json \
        "weighted_combine float32 fwdbwd [24x6x48x16x16] list" [--history] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics

import auto_check as ac  # scripts/ is on sys.path when this file is run
import torch

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.ops import SPECS
from grouped_ops.tuning.settings import settings
from grouped_ops.tuning.tuner import contenders


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("cell", help="the cell's name as auto_check prints it: 'op dtype pass label'")
    p.add_argument("--history", action="store_true", help="prewarm every cell first, in this process")
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    with open(a.json, encoding="utf-8") as f:
        cells = [c for c in json.load(f)["cells"] if c.get("auto_over_best")]
    states, seconds = ac.prewarm_cells(cells if a.history else [c for c in cells if ac._name(c) == a.cell],
                                       second_opinion=False)
    state = next(s for s in states if ac._name(s["cell"]) == a.cell)
    print(f"prewarmed {len(states)} cell(s) in {seconds:.1f} s; first pick {state['decision'].impl}")
    cell, args = state["cell"], state["args"]
    grad = cell["pass"] == "fwdbwd"
    op = getattr(grouped_ops, cell["op"])
    with grouped_ops.record() as rec, grouped_ops.use_impl("loop"), torch.set_grad_enabled(grad):
        op(*args)
    ((sig, at),) = rec.requests()
    close = contenders(state["decision"].timings)
    for _ in range(a.rounds):
        for only in (None, close):
            d, _ = dispatch._measure(SPECS[sig.op], sig, settings(), at, only=only if len(close) > 1 else None)
            best = sorted(d.timings.items(), key=lambda kv: kv[1])[:3]
            print(f"  {'every candidate' if only is None else 'contenders only'}: {d.impl:<10} "
                  + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in best))
        check = {}
        for name, _ in best:
            fn = ac.runner(op, args, name, grad)
            for _ in range(3):
                fn()
            number = max(1, int(2e-3 / max(ac.timed(fn, 1), 1e-7)))
            check[name] = statistics.median(ac.timed(fn, number) for _ in range(15))
        print("  check-style:     " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in sorted(check.items(), key=lambda kv: kv[1])))


if __name__ == "__main__":
    main()
