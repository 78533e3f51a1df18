"""One training step of GroupedLinear and of the nn.ModuleList loop it replaces, at a cell whose
stacked weight gradient is 32 MB (batch 1, 8 groups of 1024->1024, float32, 2 threads): the size
from which glibc's malloc hands out a fresh mmap per allocation (see docs/adoption.md, "CPU
training with large weights: the allocator"). Run it as is, then with the threshold raised:

    python3 scripts/allocator_check.py
    MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 python3 scripts/allocator_check.py
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch

from grouped_ops.nn import GroupedLinear
from grouped_ops.peers import LoopLinears, step_fn


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows, n, inn, out = 1, 8, 1024, 1024
    linears = torch.nn.ModuleList(torch.nn.Linear(inn, out) for _ in range(n))
    modules = {"GroupedLinear": GroupedLinear.from_linears(linears), "nn.ModuleList loop": LoopLinears(linears)}
    grad = torch.randn(rows, n, out)
    steps = {name: step_fn(m, torch.randn(rows, n, inn), "train", grad) for name, m in modules.items()}
    for step in steps.values():  # warm up (and tune GroupedLinear's first call)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(7):  # interleaved rounds in a shuffled order, 5 steps each
        for name in random.sample(list(steps), len(steps)):
            start = time.perf_counter()
            for _ in range(5):
                steps[name]()
            times[name].append((time.perf_counter() - start) / 5 * 1e3)
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc's default")
    print(f"training step, batch {rows}, {n} groups of {inn}->{out}, float32, 2 threads; "
          f"MALLOC_MMAP_THRESHOLD_={threshold}")
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.2f} ms (median of 7 rounds)")


if __name__ == "__main__":
    main()
