"""What the group-major result costs or saves the layer that reads it next.

    python3 scripts/layout_next_layer.py [--threads 1 2] [--rounds 9]

For each shape, a grouped_linear result ``y [batch, n, out]`` in the two layouts (group-major, the
contract since issue 22; contiguous, the contract before it), and the next layer on it: ReLU,
dropout (p=0.1, train mode), the next GroupedLinear (out -> out; auto, decided first), and a mean
over the groups. Forward only, no grad; interleaved rounds in a shuffled order, the fastest round
of each (the least disturbed by other jobs on a shared machine), us per call. ``group-major / contiguous`` below 1 means the new layout is faster for that next layer.
"""

from __future__ import annotations

import argparse
import os
import random

import torch

from grouped_ops import GroupedLinear
from grouped_ops.peers import seconds_per_call

SHAPES = [(1, 32, 64), (32, 8, 64), (256, 32, 16), (512, 4, 256), (16, 64, 256), (128, 32, 32)]


def timed(fn, calls: int) -> float:
    return seconds_per_call(fn, calls) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; load {[round(v, 2) for v in os.getloadavg()]}")
    print("| batch, n, out | threads | next | group-major (us) | contiguous (us) | group-major / contiguous |")
    print("|---|---:|---|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, n, out in SHAPES:
            g = torch.Generator().manual_seed(0)
            y_gm = torch.randn(n, batch, out, generator=g).transpose(0, 1)  # the contract's layout
            y_c = y_gm.contiguous()
            nxt = GroupedLinear(n, out, out)
            drop = torch.nn.Dropout(0.1).train()
            nexts = {"relu": torch.relu, "dropout": drop, "GroupedLinear": nxt, "mean over groups":
                     lambda t: t.mean(-2)}
            calls = max(5, min(2000, 2_000_000 // (batch * n * out)))
            with torch.no_grad():
                for name, f in nexts.items():
                    fns = {"gm": lambda f=f, y=y_gm: f(y), "c": lambda f=f, y=y_c: f(y)}
                    for fn in fns.values():
                        timed(fn, 3)
                    times: dict[str, list[float]] = {k: [] for k in fns}
                    for _ in range(args.rounds):
                        order = list(fns)
                        random.shuffle(order)
                        for k in order:
                            times[k].append(timed(fns[k], calls))
                    gm, c = min(times["gm"]), min(times["c"])
                    print(f"| {batch}, {n}, {out} | {threads} | {name} | {gm:.1f} | {c:.1f} | {gm / c:.2f} |")
    print(f"load after: {[round(v, 2) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
