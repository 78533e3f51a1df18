"""The columns of a cell: every implementation forced with ``impl=``, ``auto`` after prewarm, and the peers (the code users write without this library)."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import grouped_linear, weighted_combine
from ..ops import SPECS
from ..recording import prewarm
from ..tuning.harness import as_accumulated
from .cells import Cell, Env, Variant, _dname, _gib
from .grids import GL, WC
from .measurement import _grad_mode, _short

# ---- grouped_linear ------------------------------------------------------------------------------

def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
           scale: float = 1.0) -> Tensor:
    return (torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _generator(env: Env, *salt: Any) -> torch.Generator:
    gen = torch.Generator(device=env.device)
    gen.manual_seed(env.seed * 1_000_003 + zlib.crc32(repr(salt).encode()) % 1_000_003)  # stable across runs
    return gen


def _gl_estimate(batch: int, n: int, inn: int, out: int, itemsize: int, pass_: str) -> tuple[float, float, float]:
    """(FLOPs, bytes that must move, bytes of memory the cell needs) for one call."""
    x, w, y = batch * n * inn, n * out * inn, batch * n * out
    factor = 1 if pass_ == "fwd" else 3  # backward: two more GEMMs of the same size (dX and dW)
    flops = 2.0 * batch * n * inn * out * factor
    moved = (x + w + y + n * out) * itemsize * factor
    # inputs, three weight copies (ours, ModuleList's, vmap's), outputs in flight; backward adds grads
    mem = (2 * x + 4 * w + 3 * y) * itemsize if pass_ == "fwd" else (4 * x + 6 * w + 5 * y) * itemsize
    return flops, moved, mem


def _pass_fn(pass_: str, forward: Callable[[], Tensor], targets: list[Tensor],
             gen: torch.Generator) -> Callable[[], Tensor]:
    if pass_ == "fwd":
        return forward
    grad_out: list[Tensor] = []

    def fwd_bwd() -> Tensor:
        y = forward()
        if not grad_out:  # one fixed upstream gradient, made on the first call
            grad_out.append(_randn(y.shape, y.dtype, y.device, gen))
        as_accumulated(torch.autograd.grad(y, targets, grad_out[0]), targets)  # as .backward(), and the tuner
        return y.detach()
    return fwd_bwd


def _grouped_mm_peer() -> Callable[..., Tensor] | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _impl_variants(op: str, args: tuple[Any, ...], call: Callable[..., Tensor], targets: list[Tensor],
                   cell: Cell, env: Env, gen: torch.Generator) -> list[Variant]:
    """One variant per registered implementation (forced via impl=), plus auto after prewarm."""
    spec = SPECS[op]
    with _grad_mode(cell.pass_)():
        sig = spec.signature(spec.meta(*args), False)
    variants = []
    for name, implementation in spec.registry.items():
        reasons = implementation.not_supported_reasons(sig)
        if reasons:
            variants.append(Variant(name, "impl", status="n/a: " + "; ".join(reasons)))
            continue
        extra = implementation.extra_memory(sig)
        factor = implementation.work_factor(sig)
        if extra + cell.mem_bytes > env.mem_cap or extra > env.max_workspace:
            cap = min(env.mem_cap - cell.mem_bytes, env.max_workspace)
            variants.append(Variant(name, "impl", status=f"skipped: needs ~{_gib(extra)} of workspace, "
                                    f"over the {_gib(max(cap, 0))} cap (--max-workspace-gb/--max-mem-gb)"))
        elif (why := env.too_big(cell.flops * factor, cell, f" ({factor:.0f}x the arithmetic)")) is not None:
            variants.append(Variant(name, "impl", status=f"skipped: {why}"))
        else:
            def fwd(name: str = name) -> Tensor:
                return call(*args, impl=name)
            variants.append(Variant(name, "impl", _pass_fn(cell.pass_, fwd, targets, gen)))
    try:
        t0 = time.perf_counter()
        with _grad_mode(cell.pass_)():
            decision = prewarm(op, *args)
        cell.tune_s = time.perf_counter() - t0
        cell.auto_impl, cell.auto_source = decision.impl, decision.source
        variants.append(Variant("auto", "auto", _pass_fn(cell.pass_, lambda: call(*args), targets, gen)))
        # A candidate the tuner found slower than this cell's whole time cap (seconds a call) is
        # reported from the tuner's timing instead of being run again.
        for v in variants:
            t = decision.timings.get(decision.impl if v.kind == "auto" else v.name)
            if v.fn is not None and t is not None and t > env.cell_time:
                v.known = t
    except Exception as e:
        variants.append(Variant("auto", "auto", status=f"error: prewarm raised {_short(e)}"))
    return variants


def _gl_variants(cell: Cell, env: Env, with_dense: bool = False) -> list[Variant]:
    d, dtype, dev = cell.dims, cell.dtype, env.device
    batch, n, inn, out = d["batch"], d["n"], d["in"], d["out"]
    gen = _generator(env, cell.op, d, _dname(dtype), cell.pass_)
    grad = cell.pass_ == "fwdbwd"
    x = _randn((batch, n, inn), dtype, dev, gen).requires_grad_(grad)
    w = _randn((n, out, inn), dtype, dev, gen, 1 / math.sqrt(inn)).requires_grad_(grad)
    b = _randn((n, out), dtype, dev, gen, 0.1).requires_grad_(grad)
    variants = _impl_variants(GL, (x, w, b), grouped_linear, [x, w, b], cell, env, gen)

    # peers: what a user writes without this library
    linears = nn.ModuleList(nn.Linear(inn, out, device=dev, dtype=dtype) for _ in range(n))
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(w[i])
            lin.bias.copy_(b[i])
            lin.requires_grad_(grad)

    def module_list() -> Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(linears)], dim=1)

    params, _ = torch.func.stack_module_state(list(linears))
    sw, sb = (params["weight"].detach().requires_grad_(grad), params["bias"].detach().requires_grad_(grad))
    vmapped = torch.vmap(F.linear, in_dims=(1, 0, 0), out_dims=1)

    def func_vmap() -> Tensor:
        return vmapped(x, sw, sb)

    # the TabM / rtdl layer: weight stored [n, in, out], one matmul, the result a transposed view
    w_io = w.detach().transpose(1, 2).contiguous().requires_grad_(grad)

    def tabm() -> Tensor:
        return (x.transpose(0, 1) @ w_io).transpose(0, 1) + b

    peers = [
        Variant("nn.ModuleList", "peer", _pass_fn(cell.pass_, module_list, [x, *linears.parameters()], gen)),
        Variant("func.vmap", "peer", _pass_fn(cell.pass_, func_vmap, [x, sw, sb], gen)),
        Variant("TabM", "peer", _pass_fn(cell.pass_, tabm, [x, w_io, b], gen)),
    ]
    gmm = _grouped_mm_peer()
    if gmm is None:
        peers.append(Variant("F.grouped_mm", "peer", status=f"n/a: torch {torch.__version__} has no grouped_mm"))
    elif (inn * dtype.itemsize) % 16 or (out * dtype.itemsize) % 16:
        peers.append(Variant("F.grouped_mm", "peer", status="n/a: in/out rows not 16-byte aligned"))
    else:
        def grouped_mm() -> Tensor:
            y = gmm(x.transpose(0, 1).contiguous(), w.transpose(1, 2))  # [n, batch, out]
            return (y + b.unsqueeze(1)).transpose(0, 1)
        peers.append(Variant("F.grouped_mm", "peer", _pass_fn(cell.pass_, grouped_mm, [x, w, b], gen)))
    if with_dense:  # the claims' "case A": one dense nn.Linear(n*in, n*out), not the same function
        dense = nn.Linear(n * inn, n * out, device=dev, dtype=dtype).requires_grad_(grad)
        flat = x.detach().reshape(batch, n * inn).requires_grad_(grad)
        if (why := env.too_big(cell.flops * n, cell, f" ({n}x the arithmetic)")) is not None:
            peers.append(Variant("dense", "peer", status=f"skipped: {why}"))
        else:
            peers.append(Variant("dense", "peer", _pass_fn(cell.pass_, lambda: dense(flat),
                                                           [flat, *dense.parameters()], gen), check=False))
    return variants + peers


# ---- weighted_combine ----------------------------------------------------------------------------

def _wc_estimate(batch: int, k: int, feat: int, itemsize: int, pass_: str) -> tuple[float, float, float]:
    x, y = batch * k * feat, batch * feat
    if pass_ == "fwd":
        flops, moved, mem = 2.0 * x, (x + y + batch * k) * itemsize, 4 * x + 2 * y
    else:  # backward reads dY and X again, writes dX and dW
        flops, moved, mem = 6.0 * x, (3 * x + 2 * y + 3 * batch * k) * itemsize, 7 * x + 3 * y
    return flops, moved, mem * itemsize


def _wc_variants(cell: Cell, env: Env) -> list[Variant]:
    d, dtype, dev = cell.dims, cell.dtype, env.device
    batch, k, feats, layout = d["batch"], d["k"], tuple(d["features"]), d["layout"]
    gen = _generator(env, cell.op, d, _dname(dtype), cell.pass_)
    grad = cell.pass_ == "fwdbwd"
    inputs: Tensor | tuple[Tensor, ...]
    if layout == "stacked":
        inputs = _randn((batch, k, *feats), dtype, dev, gen).requires_grad_(grad)
        leaves = [inputs]
    else:
        inputs = tuple(_randn((batch, *feats), dtype, dev, gen).requires_grad_(grad) for _ in range(k))
        leaves = list(inputs)
    weights = torch.softmax(_randn((batch, k), torch.float32, dev, gen), -1).to(dtype).requires_grad_(grad)
    targets = [*leaves, weights]
    variants = _impl_variants(WC, (inputs, weights), weighted_combine, targets, cell, env, gen)
    ones = (1,) * len(feats)

    def stack_mul_sum() -> Tensor:  # the usual idiom (the baseline)
        stacked = inputs if isinstance(inputs, Tensor) else torch.stack(inputs, 1)
        return (weights.view(batch, k, *ones) * stacked).sum(1)

    def python_loop() -> Tensor:
        parts = inputs if isinstance(inputs, tuple) else [inputs[:, i] for i in range(k)]
        return sum(weights[:, i].view(batch, *ones) * parts[i] for i in range(k))  # type: ignore[return-value]

    return variants + [
        Variant("stack_mul_sum", "peer", _pass_fn(cell.pass_, stack_mul_sum, targets, gen)),
        Variant("python_loop", "peer", _pass_fn(cell.pass_, python_loop, targets, gen)),
    ]
