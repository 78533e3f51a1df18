"""The ``bench`` subcommand's options."""

from __future__ import annotations

import argparse

from .grids import CLAIMS, GL, WC

# ---- command line --------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _shapes(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        shapes = tuple(tuple(int(d) for d in item.lower().split("x")) for item in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected shapes like 16x64x32x32,256x1024, got {text!r}") from None
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"each shape is BATCHxF1[xF2...], got {text!r}")
    return shapes


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (the ``python -m grouped_ops bench`` subcommand)."""
    parser.description = ("Benchmark every implementation, auto (after prewarm) and the peers users write "
                          "today, over a grid of shapes; see docs/benchmarks/README.md.")
    g = parser.add_argument_group("grid")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="grid", const="quick",
                      help="a small grid (about 30 s on an idle 2-core CPU)")
    size.add_argument("--full", action="store_const", dest="grid", const="full",
                      help="the whole grid: batch 1..2048, n 4..64, per-group 8..1024, float32 and bfloat16 "
                           "(float16 too on CUDA), both ops, and the masked_dense claims check")
    parser.set_defaults(grid="default")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    g.add_argument("--dtypes", type=_names, help="comma-separated, e.g. float32,bfloat16,float16")
    g.add_argument("--ops", type=_names,
                   help=f"comma-separated among {GL},{WC},{CLAIMS} ({CLAIMS} = the masked_dense claims check)")
    g.add_argument("--passes", type=_names, help="fwd, fwdbwd or fwd,fwdbwd (default both)")
    g.add_argument("--batch", type=_ints, help="grouped_linear batch sizes, e.g. 1,16,128")
    g.add_argument("--n", type=_ints, help="grouped_linear group counts, e.g. 4,32")
    g.add_argument("--in", dest="in_", type=_ints, metavar="IN",
                   help="per-group input sizes; alone: square in=out")
    g.add_argument("--out", type=_ints, help="per-group output sizes (with --in: every in x out pair)")
    g.add_argument("--k", type=_ints, help="weighted_combine branch counts, e.g. 2,4,8,16")
    g.add_argument("--wc-shapes", type=_shapes, metavar="SHAPES",
                   help="weighted_combine [batch x features] shapes, e.g. 16x64x32x32,256x1024")
    g.add_argument("--variants", type=_names,
                   help="only these columns (implementation names, auto, peer names)")
    g.add_argument("--check-claims", dest="check_claims", action="store_true",
                   help=f"run only the masked_dense claims check (same as --ops {CLAIMS}): is a "
                        "block-diagonal dense matmul ~10x faster than the loop at small batch?")
    g.add_argument("--check-seed", dest="check_claims", action="store_true", help=argparse.SUPPRESS)  # old name
    g.add_argument("--peers", action="store_true",
                   help="instead of the sweep: GroupedLinear against the layers users write (TabM-style, vmap, "
                        "loops, compiled), forward and training, CPU (with --quick: a few shapes; --threads N: "
                        "only N; --markdown FILE: also FILE, its .json and .png); the full options: "
                        "python scripts/peers_bench.py --help")
    g.add_argument("--ragged", action="store_true",
                   help="instead of the sweep: grouped_linear with ragged groups (offsets=), over tokens, experts, "
                        "widths and the split's skew; every implementation, auto, a Python loop of F.linear and "
                        "F.grouped_mm (docs/benchmarks/ragged.md; --quick: a few cells)")
    t = parser.add_argument_group("timing")
    t.add_argument("--cell-time", type=float, help="seconds of timing per cell (cap); default per grid")
    t.add_argument("--max-gflop", type=float,
                   help="skip a cell or variant doing more GFLOP per call than this (default per grid and device)")
    t.add_argument("--max-workspace-gb", type=float,
                   help="skip a variant needing more extra memory than this, e.g. masked_dense's "
                        "block-diagonal weight (default 1 on CPU: a 4 GiB one takes ~10 s a call)")
    t.add_argument("--max-mem-gb", type=float,
                   help="skip what needs more memory (default: half the free memory)")
    t.add_argument("--reps", type=int, default=15, help="samples per variant at most (default 15)")
    t.add_argument("--min-sample-ms", type=float, default=1.0,
                   help="a sample repeats a call until it lasts this long (default 1 ms)")
    t.add_argument("--seed", type=int, default=0, help="RNG seed of the inputs (default 0)")
    t.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU)")
    t.add_argument("--tune-budget", type=float,
                   help="GROUPED_OPS_TUNE_BUDGET_S for auto's prewarm (default: the library's)")
    t.add_argument("--cache", choices=("temp", "user"), default="temp",
                   help="auto tunes into a fresh temporary cache (default) or your user cache")
    o = parser.add_argument_group("output")
    o.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    o.add_argument("--csv", metavar="FILE", help="write one row per cell and variant")
    o.add_argument("--json", metavar="FILE", help="write everything, machine info included")
    o.add_argument("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    o.add_argument("--dry-run", action="store_true", help="list the cells and what would be skipped, time nothing")
    o.add_argument("--from-json", type=_names, metavar="FILES",
                   help="measure nothing: re-render (and merge) earlier --json outputs into the chosen outputs")
    t.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop starting new cells after this long; what was measured is still written")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
