"""The grids the sweep runs: shapes, dtypes, ops, and the time and size caps per device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ops.grouped_linear import OP as GL
from ..ops.weighted_combine import OP as WC

SEED = "seed"
# the name users give the claims check (--ops claims); "seed" (its key in JSON outputs) is accepted too
CLAIMS = "claims"
PASSES = ("fwd", "fwdbwd")
PASS_TITLE = {"fwd": "forward", "fwdbwd": "forward + backward"}
# the code users write today, that auto is compared against
BASELINE = {GL: "nn.ModuleList", WC: "stack_mul_sum"}
PEERS = {GL: ("nn.ModuleList", "func.vmap", "TabM", "F.grouped_mm"), WC: ("stack_mul_sum", "python_loop")}


# ---- grids ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    batch: tuple[int, ...]
    n: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]  # per-group (in, out)
    k: tuple[int, ...]
    wc_shapes: tuple[tuple[int, ...], ...]  # (batch, *features): 3 features = conv-like, 1 = MLP-like
    dtypes: tuple[str, ...]
    ops: tuple[str, ...]
    # per device type: seconds of timing per cell, and the GFLOP per call above which a cell (or a
    # variant, e.g. masked_dense doing n x the arithmetic) is skipped. A FLOP cap, not a time
    # estimate, so that which cells run does not depend on how busy the machine was.
    cell_time: dict[str, float]
    max_gflop: dict[str, float]
    max_workspace_gb: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "cuda": math.inf})


def _square(*sizes: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, s) for s in sizes)


GRIDS: dict[str, Grid] = {
    "quick": Grid(
        batch=(16, 256), n=(8, 32), sizes=_square(32), k=(4,),
        wc_shapes=((16, 32, 16, 16), (64, 256)), dtypes=("float32",), ops=(GL, WC),
        cell_time={"cpu": 0.15, "cuda": 0.2}, max_gflop={"cpu": 1.0, "cuda": 50.0},
    ),
    "default": Grid(
        batch=(1, 128, 2048), n=(4, 32), sizes=_square(32, 1024), k=(2, 8),
        wc_shapes=((16, 64, 32, 32), (256, 1024)), dtypes=("float32",), ops=(GL, WC),
        cell_time={"cpu": 1.0, "cuda": 0.5}, max_gflop={"cpu": 8.0, "cuda": 20000.0},
    ),
    "full": Grid(
        batch=(1, 16, 128, 512, 2048), n=(4, 8, 32, 64), sizes=_square(8, 32, 128, 1024), k=(2, 4, 8, 16),
        wc_shapes=((16, 64, 32, 32), (64, 256, 8, 8), (16, 256), (256, 1024), (2048, 1024)),
        dtypes=("float32", "bfloat16"), ops=(GL, WC, SEED),
        cell_time={"cpu": 0.6, "cuda": 0.5}, max_gflop={"cpu": 8.0, "cuda": 20000.0},
    ),
}
CUDA_EXTRA_DTYPES = ("float16",)  # the full grid adds these on CUDA
SEED_CAP_FACTOR = 4  # the claims check's cells may do this many times --max-gflop


# ---- the masked_dense claims ---------------------------------------------------------------------------

# (claim, batch, n, per-group size): grouped_linear shapes that test what the block-diagonal (masked_dense) claims say
_SEED_CELLS: list[tuple[str, int, int, int]] = [
    *(("batch", b, 32, 32) for b in (1, 16, 128, 512, 2048)),
    *(("n", 128, n, 32) for n in (2, 4, 8)),
    *(("n", 128, n, 1024 // n) for n in (4, 8)),  # the claims' reading: n*in fixed at 1024
    *(("size", 128, 32, s) for s in (8, 128, 256)),
]
