"""Decision 3 of issue 22: which storage of GroupedLinear's weight is faster on this CPU.

    python3 scripts/weight_layout_check.py [--threads 1] [--rounds 200]

For each shape of the peers grid and the held-out grid, GroupedLinear with ``weight_layout="out_in"``
(nn.Linear's contiguous [n, out, in]) and ``"in_out"`` ([n, in, out] storage behind the same
weight), a forward under no_grad and a training step (zero_grad + forward + backward), each decided
first. Interleaved short rounds in a shuffled order; per variant the fastest round (the least
disturbed by other work on a shared machine). Prints in_out's time / out_in's (< 1: in_out faster).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from grouped_ops import GroupedLinear
from grouped_ops.bench.peers_report import PEER_SHAPES, held_out_shapes
from grouped_ops.peers import Shape, make_linears, step_fn


def best_round(fns, rounds: int, budget_s: float = 2e-3) -> dict[str, float]:
    reps = {}
    for k, f in fns.items():
        start = time.perf_counter()
        f()
        reps[k] = max(1, min(1000, int(budget_s / max(time.perf_counter() - start, 1e-7))))
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for _ in range(rounds):
        random.shuffle(names)
        for k in names:
            start = time.perf_counter()
            for _ in range(reps[k]):
                fns[k]()
            best[k] = min(best[k], (time.perf_counter() - start) / reps[k] * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {[round(v, 2) for v in os.getloadavg()]}")
    print("| batch, n, in→out | mode | out_in (us) | in_out (us) | in_out / out_in |")
    print("|---|---|---:|---:|---:|")
    ratios = {"fwd": [], "train": []}
    for shape in [Shape(*s) for s in [*PEER_SHAPES, *held_out_shapes()]]:
        linears = make_linears(shape)
        for mode in ("fwd", "train"):
            fns = {}
            for layout in ("out_in", "in_out"):
                layer = GroupedLinear.from_linears(linears, weight_layout=layout)
                x = torch.randn(shape.batch, shape.n, shape.inn, generator=torch.Generator().manual_seed(1))
                grad = torch.randn(shape.batch, shape.n, shape.out, generator=torch.Generator().manual_seed(2))
                fns[layout] = step_fn(layer, x, mode, grad)
                for _ in range(3):
                    fns[layout]()
            best = best_round(fns, args.rounds if shape.batch * shape.n * shape.inn * shape.out < 2**22 else 30)
            r = best["in_out"] / best["out_in"]
            ratios[mode].append(r)
            print(f"| {shape.batch}, {shape.n}, {shape.inn}→{shape.out} | {mode} | {best['out_in']:.1f} | "
                  f"{best['in_out']:.1f} | {r:.2f} |")
    for mode, rs in ratios.items():
        geo = torch.tensor(rs).log().mean().exp().item()
        print(f"{mode}: in_out / out_in geometric mean {geo:.3f}, range {min(rs):.2f}-{max(rs):.2f}")
    print(f"load after {[round(v, 2) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
