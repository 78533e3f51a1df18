"""The benchmark sweep behind ``python -m grouped_ops bench``.

Times every implementation of each op (forced with ``impl=``), ``auto`` after
:func:`grouped_ops.prewarm`, and the code a user would otherwise write (the peers), over a grid of
shapes, dtypes and passes (forward, forward + backward). Variants of one cell are timed round-robin
(rep 1 of every variant, then rep 2, ...) so machine noise hits them alike; each sample repeats a
call until it lasts ``--min-sample-ms``; the median sample is reported. ``perf_counter`` on CPU,
CUDA events on GPU; fixed seeds. Cells that would not fit in memory or would be absurdly slow are
estimated first and skipped with the reason in the table.

The CLI (:mod:`grouped_ops.cli.bench`) wires :func:`configure_parser` and :func:`run` as the
``bench`` subcommand; ``docs/benchmarks/README.md`` explains the columns and how to reproduce.

Modules: ``grids`` (what is swept), ``options`` (the command line), ``cells`` (cells, variants,
results), ``variants`` (the columns: implementations, auto, peers), ``measurement`` (the tuner's
timer, round-robin), ``sweep`` (running it), ``claims`` (the masked_dense claims check), ``reports``
(text, markdown, CSV, JSON) and ``plots``; ``ragged`` and ``ragged_report`` (``--ragged``: the
ragged-groups sweep, docs/benchmarks/ragged.md).
"""

from __future__ import annotations

from typing import Any

from .cells import Cell, Env, Result, Variant
from .grids import GL, GRIDS, SEED, WC, Grid
from .options import configure_parser
from .sweep import run as _run_sweep

__all__ = ["GL", "GRIDS", "SEED", "WC", "Cell", "Env", "Grid", "Result", "Variant", "configure_parser", "run"]


def run(args: Any) -> int:
    """The ``bench`` subcommand: the sweep, or with ``--ragged`` the ragged-groups sweep (:mod:`.ragged`)."""
    if getattr(args, "ragged", False):
        from .ragged import run as run_ragged  # noqa: PLC0415 - only this mode needs it

        return run_ragged(args)
    return _run_sweep(args)
