"""pytest-benchmark suite: GroupedLinear next to the layers users already write (grouped_ops.peers),
forward (no grad) and a training step (zero_grad + forward + backward), CPU.

Deselected from the default run like the rest of tests/benchmarks; run and compare with

    python -m pytest tests/benchmarks/test_bench_peers.py -m benchmark --benchmark-enable --benchmark-autosave
    python -m pytest tests/benchmarks/test_bench_peers.py -m benchmark --benchmark-enable --benchmark-compare

The side-by-side table with ratios is scripts/peers_bench.py's (docs/benchmarks/peers.md).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import run_benchmark

from grouped_ops import peers

pytestmark = pytest.mark.benchmark


# (id, batch, n, in, out): the two examples and a launch-bound one
SHAPES = [("b128-n32-32x32", 128, 32, 32, 32), ("b16-n64-256x256", 16, 64, 256, 256),
          ("b32-n8-64x64", 32, 8, 64, 64)]
VARIANTS = ["grouped", "tabm", "vmap", "loop", "compiled_loop"]
MODES = ["fwd", "train"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_peers(benchmark: Any, shape: tuple[Any, ...], variant: str, mode: str) -> None:
    name, *dims = shape
    cell = peers.Shape(*dims)
    if variant == "compiled_loop" and mode == "train" and cell.n > 16:
        pytest.skip("compiling the loop's backward takes minutes at n > 16")
    benchmark.group = f"peers {name} {mode}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cell.batch, cell.n, cell.inn, generator=gen)
    grad = torch.randn(cell.batch, cell.n, cell.out, generator=gen)
    module = peers.build(variant, peers.make_linears(cell))
    run_benchmark(benchmark, peers.step_fn(module, x, mode, grad), warmups=3)  # tunes or compiles
