"""pytest-benchmark suite: op x implementation x representative shapes, forward and forward+backward.

Deselected from the default test run (pyproject's addopts: ``-m 'not slow and not benchmark'
--benchmark-disable``). Run it, saving the result, then compare a later run against it:

    python -m pytest tests/benchmarks -m benchmark --benchmark-enable --benchmark-autosave
    python -m pytest tests/benchmarks -m benchmark --benchmark-enable --benchmark-compare

See docs/benchmarks/README.md. Every registered implementation is benchmarked automatically (the
parameters come from the registries), next to ``auto`` (after prewarm) and the code users write
today (``nn.ModuleList`` of ``nn.Linear`` + ``torch.stack``; seed 003's stack-multiply-sum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import run_benchmark
from torch import Tensor, nn

import grouped_ops
from grouped_ops.ops import REGISTRIES

pytestmark = pytest.mark.benchmark


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
PASSES = ["fwd", "fwdbwd"]

# (id, batch, n, in, out): launch-bound, the seed's n=32 32->32, and a compute-heavier one
GL_SHAPES = [("b16-n8-32x32", 16, 8, 32, 32), ("b128-n32-32x32", 128, 32, 32, 32),
             ("b512-n8-256x256", 512, 8, 256, 256)]
# (id, batch, k, features, layout): conv-like stacked and list, MLP-like
WC_SHAPES = [("conv-b16-k4-32x16x16-stacked", 16, 4, (32, 16, 16), "stacked"),
             ("conv-b16-k4-32x16x16-list", 16, 4, (32, 16, 16), "list"),
             ("mlp-b256-k8-1024-stacked", 256, 8, (1024,), "stacked")]

GL_VARIANTS = [*REGISTRIES["grouped_linear"], "auto", "nn.ModuleList"]
WC_VARIANTS = [*REGISTRIES["weighted_combine"], "auto", "stack_mul_sum"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(pass_: str, forward: Callable[[], Tensor], targets: list[Tensor], device: str) -> Callable[[], Any]:
    """One benchmarked call: forward under no_grad, or forward + backward to every target."""
    if pass_ == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                forward()
            _sync(device)
        return fwd
    with torch.enable_grad():
        grad_out = torch.randn_like(forward())

    def fwd_bwd() -> None:
        with torch.enable_grad():
            torch.autograd.grad(forward(), targets, grad_out)
        _sync(device)
    return fwd_bwd


def _skip_if_unsupported(call: Callable[[], Tensor], pass_: str) -> None:
    try:
        with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
            call()
    except grouped_ops.GroupedOpsError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("variant", GL_VARIANTS)
@pytest.mark.parametrize("shape", GL_SHAPES, ids=[s[0] for s in GL_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_grouped_linear(benchmark: Any, device: str, shape: tuple[Any, ...], variant: str, pass_: str) -> None:
    name, batch, n, inn, out = shape
    benchmark.group = f"grouped_linear {name} {pass_} {device}"
    gen = torch.Generator().manual_seed(0)
    grad = pass_ == "fwdbwd"
    x = torch.randn(batch, n, inn, generator=gen).to(device).requires_grad_(grad)
    w = (torch.randn(n, out, inn, generator=gen) / inn**0.5).to(device).requires_grad_(grad)
    b = torch.randn(n, out, generator=gen).to(device).requires_grad_(grad)
    targets = [x, w, b]
    if variant == "nn.ModuleList":
        linears = nn.ModuleList(nn.Linear(inn, out, device=device) for _ in range(n))
        with torch.no_grad():
            for i, lin in enumerate(linears):
                lin.weight.copy_(w[i])
                lin.bias.copy_(b[i])

        def forward() -> Tensor:
            return torch.stack([lin(x[:, i]) for i, lin in enumerate(linears)], dim=1)
        targets = [x, *linears.parameters()]
    else:
        impl = variant

        def forward() -> Tensor:
            return grouped_ops.grouped_linear(x, w, b, impl=impl)
        _skip_if_unsupported(forward, pass_)
        if variant == "auto":
            with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                benchmark.extra_info["auto_impl"] = grouped_ops.prewarm("grouped_linear", x, w, b).impl
    run_benchmark(benchmark, _step(pass_, forward, targets, device))


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("variant", WC_VARIANTS)
@pytest.mark.parametrize("shape", WC_SHAPES, ids=[s[0] for s in WC_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_weighted_combine(benchmark: Any, device: str, shape: tuple[Any, ...], variant: str, pass_: str) -> None:
    name, batch, k, feats, layout = shape
    benchmark.group = f"weighted_combine {name} {pass_} {device}"
    gen = torch.Generator().manual_seed(0)
    grad = pass_ == "fwdbwd"
    inputs: Tensor | tuple[Tensor, ...]
    if layout == "stacked":
        inputs = torch.randn(batch, k, *feats, generator=gen).to(device).requires_grad_(grad)
        leaves = [inputs]
    else:
        inputs = tuple(torch.randn(batch, *feats, generator=gen).to(device).requires_grad_(grad) for _ in range(k))
        leaves = list(inputs)
    weights = F.softmax(torch.randn(batch, k, generator=gen), -1).to(device).requires_grad_(grad)
    ones = (1,) * len(feats)
    if variant == "stack_mul_sum":  # seed 003's answer
        def forward() -> Tensor:
            stacked = inputs if isinstance(inputs, Tensor) else torch.stack(inputs, 1)
            return (weights.view(batch, k, *ones) * stacked).sum(1)
    else:
        impl = variant

        def forward() -> Tensor:
            return grouped_ops.weighted_combine(inputs, weights, impl=impl)
        _skip_if_unsupported(forward, pass_)
        if variant == "auto":
            with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                benchmark.extra_info["auto_impl"] = grouped_ops.prewarm("weighted_combine", inputs, weights).impl
    run_benchmark(benchmark, _step(pass_, forward, [*leaves, weights], device))
