"""Re-route a TabM-style layer (weights stored [k, in, out]) through grouped_linear and compare.

Checks the numbers match and times a training step (forward + backward + SGD) of both, side by side:
    python3 scripts/tabm_check.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import grouped_ops


class LinearEnsemble(nn.Module):
    """TabM's LinearEnsemble: x [B, k, in] -> [B, k, out], weight stored [k, in, out]."""

    def __init__(self, k: int, d_in: int, d_out: int, routed: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d_in, d_out) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(k, d_out) / d_in**0.5)
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routed:
            return grouped_ops.grouped_linear(x, self.weight.transpose(1, 2), self.bias)
        return (x.transpose(0, 1) @ self.weight).transpose(0, 1) + self.bias


def model(routed: bool, k: int, d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(LinearEnsemble(k, d, d, routed), nn.ReLU(), LinearEnsemble(k, d, d, routed))


def step(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'k':>3} {'d':>4}  {'max |diff|':>10}  {'original ms':>11}  {'routed ms':>9}  routed/original")
    ratios = []
    for batch, k, d in [(256, 32, 64), (1024, 32, 128), (64, 8, 256), (2048, 16, 32)]:
        a, b = model(False, k, d), model(True, k, d)
        x = torch.randn(batch, k, d)
        diff = (a(x) - b(x)).abs().max().item()
        opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3) for m in (a, b)}
        times: dict[nn.Module, list[float]] = {a: [], b: []}
        for m in (a, b):
            for _ in range(3):  # warm-up; the routed model's first step tunes its signatures
                step(m, opts[m], x)
        for _ in range(30):  # interleaved, so machine noise hits both alike
            for m in (a, b):
                t = time.perf_counter()
                step(m, opts[m], x)
                times[m].append(time.perf_counter() - t)
        ta, tb = statistics.median(times[a]), statistics.median(times[b])
        ratios.append(tb / ta)
        print(f"{batch:>6} {k:>3} {d:>4}  {diff:>10.2e}  {ta * 1e3:>11.3f}  {tb * 1e3:>9.3f}  {tb / ta:.2f}")
    print(f"geometric mean routed/original: {statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
