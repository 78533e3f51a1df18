"""Which memory multiple keeps the fastest implementation timed, over the CPU sweep's cells.

Which memory multiple keeps the fastest implementation timed: the CPU sweep's cells against the
relative bound of a tuning (tuning/memory.py: a candidate is timed only if its footprint is at
most MULTIPLE x the leanest implementation's, or 16 MiB).

For each cell of the sweep (docs/benchmarks/cpu.csv: every implementation timed, median seconds)
and each multiple, it finds the fastest implementation the bound admits and reports how many cells
lose their fastest, and by how much (the admitted best's time over the best's).

    python3 scripts/memory_multiple.py [docs/benchmarks/cpu.csv] [--multiples 1.25,1.5,2,3,4]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict

import torch

from grouped_ops.ops import SPECS
from grouped_ops.signature import Signature, parse_dtype
from grouped_ops.tuning import memory


def signature(row: dict[str, str]) -> Signature:
    grad = row["pass"] == "fwdbwd"
    dtype = parse_dtype(row["dtype"])
    if row["op"] == "grouped_linear":
        dims = (("batch", int(row["batch"])), ("n", int(row["n"])), ("in", int(row["in"])), ("out", int(row["out"])))
        layout = (("input", "contiguous"), ("weight", "contiguous"), ("bias", "yes"))
        names: tuple[str, ...] = ("input", "weight", "bias") if grad else ()
    else:
        features = math.prod(int(v) for v in row["features"].split("x"))
        dims = (("batch", int(row["batch"])), ("k", int(row["k"])), ("features", features))
        layout = (("inputs", row["inputs"]), ("contiguous", "yes"))
        names = ("inputs", "weights") if grad else ()
    return Signature(row["op"], dims, dtype, torch.device("cpu"), layout, names)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default="docs/benchmarks/cpu.csv")
    p.add_argument("--multiples", default="1,1.25,1.5,2,3,4,8")
    args = p.parse_args()
    with open(args.csv) as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#"))]
    cells: dict[tuple[str, ...], dict[str, float]] = defaultdict(dict)
    for r in rows:
        # (implementations removed since the sweep ran are not today's candidates: left out)
        if r["kind"] == "impl" and r["status"] == "ok" and r["median_s"] and r["op"] in SPECS and \
                r["variant"] in SPECS[r["op"]].registry:
            key = tuple(r[k] for k in ("op", "dtype", "pass", "batch", "n", "in", "out", "k", "features", "inputs"))
            cells[key][r["variant"]] = float(r["median_s"])
    multiples = [float(m) for m in args.multiples.split(",")]
    print(f"{len(cells)} cells from {args.csv}")
    print("| multiple | cells whose fastest is not timed | geometric mean, admitted best / best | worst | "
          "masked_dense timed in its winning cells |")
    print("|---:|---:|---:|---:|---:|")
    detail: list[str] = []
    for m in multiples:
        lost, logs, worst, md_wins, md_kept = 0, [], 1.0, 0, 0
        for key, times in cells.items():
            row = dict(zip(("op", "dtype", "pass", "batch", "n", "in", "out", "k", "features", "inputs"), key,
                           strict=True))
            sig = signature(row)
            spec = SPECS[row["op"]]
            names = [n for n in times if n in spec.registry and spec.registry[n].supports(sig)]
            lean = memory.footprint(spec, sig, memory.leanest(spec, sig, names))
            bound = max(m * lean, memory.FLOOR_BYTES)
            admitted = {n: t for n, t in times.items() if n in names and memory.footprint(spec, sig, n) <= bound}
            best = min(times.values())
            fastest = min(times, key=times.__getitem__)
            got = min(admitted.values())
            if fastest == "masked_dense":
                md_wins += 1
                md_kept += "masked_dense" in admitted
            if got > best:
                lost += 1
                worst = max(worst, got / best)
                if m == 2:
                    detail.append(f"  {' '.join(k for k in key if k)}: fastest {fastest} "
                                  f"({memory.footprint(spec, sig, fastest) / 2**20:.1f} MiB, lean {lean / 2**20:.1f} MiB), "
                                  f"admitted best x{got / best:.3f}")
            logs.append(math.log(got / best))
        print(f"| {m:g} | {lost} | {math.exp(sum(logs) / len(logs)):.4f} | {worst:.3f} | {md_kept} of {md_wins} |")
    if detail:
        print("\nat 2x, the cells whose fastest is not timed:")
        print("\n".join(detail))
    return 0


if __name__ == "__main__":
    sys.exit(main())
