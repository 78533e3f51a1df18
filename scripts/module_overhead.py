"""Per-call cost of GroupedLinear's forward against the TabM-style layer, at tiny batches.

Per-call cost of GroupedLinear's forward against the TabM-style layer (``peers.TabMLinear``), both
running the same bmm kernels, at tiny batches where Python dominates.

    python3 scripts/module_overhead.py [--calls 2000] [--rounds 9] [--threads 1]

One thread, no grad, interleaved rounds (each round times every variant once, in a shuffled
order), medians in microseconds per call. 32 groups of 64 -> 64 (the cell the previous sessions
quoted). ``grouped`` is GroupedLinear as constructed by default, its choice decided first (the
decided call is what a model runs); ``grouped_fn`` is the functional ``grouped_linear`` on the same
parameters; ``tabm`` is the TabM layer; ``bmm_only`` is just the kernels bmm runs (the floor).
Prints a markdown table; docs/benchmarks/peers.md quotes it with the load average.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

import torch

import grouped_ops
from grouped_ops import GroupedLinear, grouped_linear
from grouped_ops.peers import TabMLinear, seconds_per_call


def _timed(fn, calls: int) -> float:
    return seconds_per_call(fn, calls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d = 32, 64
    torch.manual_seed(0)
    layer = GroupedLinear(n, d, d)
    w_in_out = layer.weight.detach().transpose(1, 2).contiguous()
    tabm = TabMLinear(w_in_out.clone(), layer.bias.detach().clone())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {n} groups of {d}->{d}, no grad; "
          f"weight stored {tuple(layer.weight.stride())}; load {[round(v, 2) for v in os.getloadavg()]}")
    print("| batch | grouped (us) | grouped_fn (us) | tabm (us) | bmm_only (us) | grouped - tabm (us) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        x = torch.randn(batch, n, d)
        w, b = layer.weight, layer.bias
        wt = w.transpose(1, 2)
        bias3 = b.unsqueeze(1)

        def floor(x=x, wt=wt, bias3=bias3):
            return torch.baddbmm(bias3, x.transpose(0, 1), wt)

        variants = {"grouped": lambda x=x: layer(x), "grouped_fn": lambda x=x, w=w, b=b: grouped_linear(x, w, b),
                    "tabm": lambda x=x: tabm(x), "bmm_only": floor}
        with torch.no_grad():
            for fn in variants.values():  # decide, warm up
                for _ in range(200):
                    fn()
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(args.rounds):
                order = list(variants)
                random.shuffle(order)
                for k in order:
                    times[k].append(_timed(variants[k], args.calls))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {batch} | {med['grouped']:.1f} | {med['grouped_fn']:.1f} | {med['tabm']:.1f} | "
              f"{med['bmm_only']:.1f} | {med['grouped'] - med['tabm']:+.1f} |")
    print(f"load after: {[round(v, 2) for v in os.getloadavg()]}; grouped_ops {grouped_ops.__version__}")


if __name__ == "__main__":
    main()
