"""The benchmark and table-tuning steps of scripts/gpu_check.py (see gpu_check_steps.py)."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import Ctx, _err, _gl_inputs, _median_time
from torch import nn


def bench(ctx: Ctx) -> None:
    """Headline (batch 256, n 32, 64->64) and a slice of the grid: auto, each implementation,
    nn.ModuleList, torch.func vmap ensemble, torch's grouped_mm; bf16 and float32; fwd and training."""
    deadline = ctx.deadline(40 if ctx.dry else 100)
    shapes = [(8, 4, 16, 16)] if ctx.dry else [(256, 32, 64, 64), (32, 8, 256, 256), (1024, 64, 64, 64),
                                                 (4096, 16, 128, 128)]
    table = ctx.data.setdefault("rows", [])
    for batch, n, inn, out in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for train in (False, True):
                row = _bench_cell(ctx, (batch, n, inn, out), dtype, train, deadline)
                table.append(row)
                ctx.note(_bench_line(row))


def _bench_cell(ctx: Ctx, shape: tuple[int, int, int, int], dtype: torch.dtype, train: bool,
                deadline: float) -> dict[str, Any]:
    import grouped_ops
    from grouped_ops.ops import grouped_linear as gl

    batch, n, inn, out = shape
    x, w, b = _gl_inputs(ctx, batch, n, inn, out, dtype, grad=train)
    layers = nn.ModuleList(nn.Linear(inn, out, device=ctx.dev, dtype=dtype) for _ in range(n))
    params = torch.func.stack_module_state(list(layers))
    base = nn.Linear(inn, out, device="meta", dtype=dtype)

    def ensemble() -> torch.Tensor:  # the torch.func model-ensembling recipe
        call = lambda p, b_, xi: torch.func.functional_call(base, (p, b_), (xi,))  # noqa: E731
        return torch.func.vmap(call, in_dims=(0, 0, 1), out_dims=1)(*params, x)

    def forced(impl: str) -> Any:
        return lambda: grouped_ops.grouped_linear(x, w, b, impl=impl)

    variants = {"auto": lambda: grouped_ops.grouped_linear(x, w, b),
                **{i: forced(i) for i in grouped_ops.implementations("grouped_linear")},
                "ModuleList": lambda: torch.stack([m(x[:, i]) for i, m in enumerate(layers)], 1),
                "vmap": ensemble,
                "torch.grouped_mm": lambda: gl._grouped_mm_op()(
                    x.transpose(0, 1).contiguous(), w.transpose(1, 2)) + b.unsqueeze(1)}
    row: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype)[6:], "train": train}
    grads: dict[str, torch.Tensor] = {}

    def step(fn: Any, name: str) -> None:
        y = fn()  # a dense upstream gradient, as a real loss gives (not .sum()'s stride 0)
        y.backward(grads.setdefault(name, torch.randn_like(y)))

    for name, fn in variants.items():
        if time.monotonic() > deadline:
            row[name] = "out of time"
            continue
        run = (lambda fn=fn, name=name: step(fn, name)) if train else fn
        try:
            with torch.set_grad_enabled(train):
                row[name] = _median_time(ctx, run, 15, deadline)
        except Exception as e:  # noqa: BLE001
            row[name] = _err(e)
    return row


def _bench_line(row: dict[str, Any]) -> str:
    cells = [f"{k}={v * 1e6:.1f}us" if isinstance(v, float) else f"{k}={v}"
             for k, v in row.items() if k not in ("shape", "dtype", "train")]
    return f"{row['shape']} {row['dtype']} {'train' if row['train'] else 'fwd'}: " + " ".join(cells)


def tune_table(ctx: Ctx) -> None:
    """Tune a small grid with prewarm into a private cache; export it as OUTDIR/<device>-table.json."""
    cache, shipped = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.environ.update(GROUPED_OPS_CACHE_DIR=cache, GROUPED_OPS_SHIPPED_DIR=shipped,
                      GROUPED_OPS_TUNE_BUDGET_S="0.05" if ctx.dry else "0.3")
    import grouped_ops

    deadline = ctx.deadline(40 if ctx.dry else 100)
    grid = [(b, n, d) for b in ((1, 16) if ctx.dry else (1, 16, 128, 512, 2048))
            for n in ((4,) if ctx.dry else (8, 32)) for d in ((16,) if ctx.dry else (32, 128))]
    done = 0
    for dtype in (torch.bfloat16, torch.float32):
        for train in (False, True):
            for batch, n, d in grid:
                if time.monotonic() > deadline:
                    break
                x, w, b = _gl_inputs(ctx, batch, n, d, d, dtype, grad=train)
                with torch.set_grad_enabled(train):
                    grouped_ops.prewarm("grouped_linear", x, w, b)
                done += 1
                if done % 8 == 0:  # exported as it grows: a step killed at its box keeps its table
                    _export(ctx, done, len(grid) * 4)
    _export(ctx, done, len(grid) * 4)
    ctx.note(f"tuned {done} of {len(grid) * 4} signatures; {ctx.data['entries']} entries in "
             f"{Path(ctx.data['table']).name}")


def _export(ctx: Ctx, done: int, planned: int) -> None:
    from grouped_ops.signature import device_name
    from grouped_ops.tuning import store

    name = re.sub(r"[^a-z0-9.]+", "-", device_name(ctx.dev).lower()).strip("-")
    dest = ctx.out / f"{name}-table.json"
    count = store.write_table(dest, store.DiskStore().entries())
    ctx.data.update(tuned=done, planned=planned, table=str(dest), entries=count)
    ctx.save()
