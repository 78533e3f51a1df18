"""Time one group's product ``x @ w^T`` against ``(w @ x^T)^T`` (the ragged loop's column form,
``grouped_ops/ops/_ragged_impls._column_rows``) for a few rows, on the CPU, one thread.

    python scripts/column_form.py [float32|bfloat16]

For each in->out and rows per group r, E groups whose weights total 48 MiB (out of cache, as an MoE
layer's experts are between calls) each get r rows; both forms write the [E*r, out] result. Prints
the column form's time over the row form's (interleaved rounds, medians; < 1: the column form is
faster) and the row form's time per group.
"""

from __future__ import annotations

import sys
import time

import torch


def ratio(w: torch.Tensor, r: int) -> tuple[float, float]:
    """The column form's time over the row form's, and the row form's seconds per group."""
    groups, out, inn = w.shape
    x = torch.randn(groups * r, inn).to(w.dtype)
    y = torch.empty(groups * r, out, dtype=w.dtype)
    column = torch.empty(out, r, dtype=w.dtype)

    def row_form():
        for g in range(groups):
            torch.mm(x[g * r:(g + 1) * r], w[g].t(), out=y[g * r:(g + 1) * r])

    def column_form():
        for g in range(groups):
            torch.mm(w[g], x[g * r:(g + 1) * r].t(), out=column)
            y[g * r:(g + 1) * r].copy_(column.t())
    times = {row_form: [], column_form: []}
    for f in times:
        f()
    for _ in range(9):
        for f in times:
            start = time.thread_time()
            f()
            times[f].append(time.thread_time() - start)
    a, b = sorted(times[row_form])[4], sorted(times[column_form])[4]
    return b / a, a / groups


if __name__ == "__main__":
    torch.set_num_threads(1)
    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
    for inn, out in ((256, 256), (128, 256), (256, 128), (512, 2048), (1024, 512), (64, 64)):
        groups = max(8, (48 << 20) // (inn * out * dtype.itemsize))
        w = (torch.randn(groups, out, inn) * 0.02).to(dtype)
        cells = [(r, *ratio(w, r)) for r in (1, 2, 3, 4, 6, 8, 12)]
        print(f"{str(dtype).removeprefix('torch.')} {inn}->{out} E={groups}",
              " ".join(f"r={r}: {q:.2f} ({t * 1e6:.0f} us)" for r, q, t in cells), flush=True)
