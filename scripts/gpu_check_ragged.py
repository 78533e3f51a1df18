"""The ragged-groups step of scripts/gpu_check.py (see gpu_check_steps.py): grouped_linear with offsets.

Four parts, each with its own deadline inside the step's box:
1. the bf16 grouped_mm fast path against the loop (and every other implementation, auto and
   F.grouped_mm called directly), forward and training, with the error against float32;
2. empty groups and rows past the last offset: every implementation's weight and bias gradients
   of the empty groups exactly zero, the rows' output and gradient zero (torch's grouped_mm
   backward has returned non-zero gradients, or hung, there: pytorch#152668, #172439);
3. CUDA-graph capture of each sync-free implementation, replayed after new offsets are copied into
   the captured offsets tensor (the graph must read them on the device), and auto under capture;
4. the few-token crossover of gather_bmm against grouped_mm (decode-like T = 1..128, E = 64).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from gpu_check_common import Ctx, _err, _median_time


def _inputs(ctx: Ctx, sizes: list[int], inn: int, out: int, dtype: torch.dtype, tail: int = 0,
            grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=ctx.dev).manual_seed(0)
    rows = sum(sizes) + tail
    x = torch.randn(rows, inn, device=ctx.dev, dtype=dtype, generator=g).requires_grad_(grad)
    w = (torch.randn(len(sizes), out, inn, device=ctx.dev, dtype=dtype, generator=g) / inn**0.5).requires_grad_(grad)
    b = torch.randn(len(sizes), out, device=ctx.dev, dtype=dtype, generator=g).requires_grad_(grad)
    offsets = torch.tensor(sizes, device=ctx.dev).cumsum(0).to(torch.int32)
    return x, w, b, offsets


def _balanced(tokens: int, experts: int) -> list[int]:
    return [tokens // experts + (e < tokens % experts) for e in range(experts)]


def ragged(ctx: Ctx) -> None:
    _fast_path(ctx)
    _empty_groups(ctx)
    _graph_capture(ctx)
    _few_tokens(ctx)


def _fast_path(ctx: Ctx) -> None:
    deadline = ctx.deadline(8 if ctx.dry else 16)
    shapes = [(64, 4, 16, 16)] if ctx.dry else [(8192, 8, 1024, 1024), (4096, 64, 512, 512), (512, 64, 1024, 1024)]
    for shape in shapes:
        for train in (False, True):
            row = _fast_cell(ctx, shape, train, deadline)
            ctx.data.setdefault("fast_path", []).append(row)
            tokens, experts, inn, out = shape
            ctx.note(f"{tokens}x{inn}->{out}, E={experts} {'train' if train else 'fwd'}: " + ", ".join(
                f"{k} {v['us']:.0f}us" if isinstance(v, dict) else f"{k} {v}" for k, v in row.items()
                if k not in ("shape", "train")))


def _fast_cell(ctx: Ctx, shape: tuple[int, int, int, int], train: bool, deadline: float) -> dict[str, Any]:
    import torch.nn.functional as F

    import grouped_ops
    from grouped_ops.ops import SPECS
    from grouped_ops.ops.grouped_linear_ragged import OP, reference

    tokens, experts, inn, out = shape
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    x, w, b, offsets = _inputs(ctx, _balanced(tokens, experts), inn, out, dtype, grad=train)
    sig = SPECS[OP].signature(SPECS[OP].meta(x, w, b, offsets), False)
    gy = torch.randn(tokens, out, device=ctx.dev, dtype=dtype)
    ref = reference(x.detach().float(), w.detach().float(), b.detach().float(), offsets)
    calls = {name: (lambda n=name: grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=n))
             for name, i in SPECS[OP].registry.items() if i.supports(sig)}
    calls["auto"] = lambda: grouped_ops.grouped_linear(x, w, b, offsets=offsets)
    mm = getattr(F, "grouped_mm", None)
    if mm is not None:
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
        calls["F.grouped_mm"] = lambda: mm(x, w.transpose(1, 2), offs=offsets) + b.repeat_interleave(
            sizes, 0, output_size=tokens)
    row: dict[str, Any] = {"shape": list(shape), "train": train}
    for name, call in calls.items():
        if time.monotonic() > deadline:
            row[name] = "out of time"
            continue
        try:
            with torch.set_grad_enabled(train):
                err = float((call().float() - ref).norm() / ref.norm())
                run = (lambda c=call: torch.autograd.grad(c(), (x, w), gy)) if train else call
                row[name] = {"us": (_median_time(ctx, run, 7, deadline) or 0) * 1e6, "rel_err": err}
            if err > 3e-2:
                ctx.problem(f"ragged {name} {row['shape']}: relative error {err:.3g} against float32")
        except Exception as e:  # noqa: BLE001
            row[name] = _err(e)
    return row


def _empty_groups(ctx: Ctx) -> None:
    import grouped_ops
    from grouped_ops.ops import SPECS
    from grouped_ops.ops.grouped_linear_ragged import OP

    sizes = [0, 40, 0, 0, 24, 8, 0, 16] if ctx.dry else [0, 400, 0, 0, 240, 96, 0, 160, 0, 0, 64, 0, 0, 32, 0, 0]
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    bad = []
    for name in SPECS[OP].registry:
        x, w, b, offsets = _inputs(ctx, sizes, 64, 64, dtype, tail=16, grad=True)
        sig = SPECS[OP].signature(SPECS[OP].meta(x, w, b, offsets), False)
        if not SPECS[OP].registry[name].supports(sig):
            ctx.data[f"empty/{name}"] = "unsupported: " + "; ".join(SPECS[OP].registry[name].not_supported_reasons(sig))
            continue
        try:
            y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=name)
            y.backward(torch.randn_like(y))
            ctx.sync()
            empty = [g for g, n in enumerate(sizes) if n == 0]
            nonzero = [g for g in empty if w.grad[g].abs().max() != 0 or b.grad[g].abs().max() != 0]
            tail = sum(sizes)
            got = {"nonzero_empty_groups": nonzero, "tail_output_zero": bool((y[tail:] == 0).all()),
                   "tail_grad_zero": bool((x.grad[tail:] == 0).all())}
        except Exception as e:  # noqa: BLE001
            got = {"error": _err(e)}
        ctx.data[f"empty/{name}"] = got
        if got.get("error") or got["nonzero_empty_groups"] or not (got["tail_output_zero"] and got["tail_grad_zero"]):
            bad.append(f"{name}: {got}")
    for line in bad:
        ctx.problem(f"empty groups / rows past the last offset: {line}")
    ctx.note(f"empty-group gradients and rows past the last offset: {len(bad)} implementations wrong")


def _graph_capture(ctx: Ctx) -> None:
    import grouped_ops
    from grouped_ops.ops import SPECS
    from grouped_ops.ops.grouped_linear_ragged import OP, reference

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    first, second = [30, 0, 50, 20], [5, 60, 0, 25]
    for impl in ("auto", *(n for n, i in SPECS[OP].registry.items() if not ctx.dry or n in ("gather_bmm",))):
        x, w, b, offsets = _inputs(ctx, first, 64, 64, dtype, tail=28)
        sig = SPECS[OP].signature(SPECS[OP].meta(x, w, b, offsets), False)
        # not registry.get: a Registry raises GroupedOpsError for an unknown name, which Mapping.get lets through
        implementation = SPECS[OP].registry[impl] if impl in SPECS[OP].registry else None  # noqa: SIM401
        if implementation is not None and (not implementation.supports(sig) or implementation.syncs(sig)):
            continue  # capture is for the sync-free ones; a forced syncing one is refused (tested on CPU)
        try:
            with torch.no_grad():
                if ctx.dry:
                    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
                    offsets.copy_(torch.tensor(second).cumsum(0))
                    y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
                else:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up outside capture (decided, memoised, cuBLAS ready)
                        grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        y = grouped_ops.grouped_linear(x, w, b, offsets=offsets, impl=impl)
                    offsets.copy_(torch.tensor(second, device=ctx.dev).cumsum(0))  # new routing, same graph
                    graph.replay()
                    torch.cuda.synchronize()
            ref = reference(x.float(), w.float(), b.float(), offsets)
            err = float((y.float() - ref).norm() / ref.norm())
            d = grouped_ops.lookup(OP, x, w, b, offsets)
            ctx.data[f"graph/{impl}"] = {"rel_err": err, "decision": None if d is None else d.impl}
            if err > 3e-2:
                ctx.problem(f"captured {impl} replayed with new offsets: relative error {err:.3g}")
        except Exception as e:  # noqa: BLE001
            ctx.data[f"graph/{impl}"] = {"error": _err(e)}
            ctx.problem(f"graph capture of {impl}: {_err(e)}")
    ctx.note("CUDA-graph capture (replayed with new offsets): " + ", ".join(
        f"{k.split('/')[1]} {v.get('rel_err', v.get('error'))}" for k, v in ctx.data.items() if k.startswith("graph/")))


def _few_tokens(ctx: Ctx) -> None:
    deadline = ctx.deadline(6 if ctx.dry else 10)
    rows = [_few_tokens_row(ctx, tokens, deadline) for tokens in ((1, 4, 16) if ctx.dry else (1, 2, 4, 8, 16, 32, 64, 128))]
    ctx.data["few_tokens"] = rows
    ctx.note("few tokens (us; gather_bmm / grouped_mm / loop / auto): " + "; ".join(
        f"T={r['T']}: " + "/".join(str(r.get(k, "-")) for k in ("gather_bmm", "grouped_mm", "loop", "auto"))
        for r in rows))


def _few_tokens_row(ctx: Ctx, tokens: int, deadline: float) -> dict[str, Any]:
    import grouped_ops
    from grouped_ops.ops import SPECS
    from grouped_ops.ops.grouped_linear_ragged import OP

    experts, inn, out = (8, 16, 16) if ctx.dry else (64, 2048, 1024)
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    # decode: each token routed to its own expert where it can be (the spread a top-k router gives)
    sizes = [1 if e < tokens else 0 for e in range(experts)] if tokens <= experts else _balanced(tokens, experts)
    x, w, _, offsets = _inputs(ctx, sizes, inn, out, dtype)
    sig = SPECS[OP].signature(SPECS[OP].meta(x, w, None, offsets), False)
    row: dict[str, Any] = {"T": tokens}
    for impl in ("gather_bmm", "grouped_mm", "loop", "auto"):
        if time.monotonic() > deadline:
            break
        if impl != "auto" and not SPECS[OP].registry[impl].supports(sig):
            row[impl] = "unsupported"
            continue
        with torch.no_grad(), contextlib.suppress(Exception):
            t = _median_time(ctx, lambda i=impl: grouped_ops.grouped_linear(x, w, offsets=offsets, impl=i), 7, deadline)
            row[impl] = None if t is None else round(t * 1e6, 1)
    return row
