"""The TabM-packed model against the same model re-routed through grouped_ops.

The `tabm` package's model, with every grouped layer re-routed through grouped_ops in the second
(the whole-model row of docs/benchmarks/peers.md).

    pip install tabm rtdl_num_embeddings        # the `bench` extra
    python3 scripts/tabm_model_check.py [--threads 1 2] [--rounds 9]

Model: ``tabm.TabM.make(arch_type="tabm-packed", k=32, n_blocks=3, d_block=256, dropout=0.1)`` with
``rtdl_num_embeddings.PeriodicEmbeddings(lite=False)`` on 24 numerical features, batch 512. Every
``tabm.LinearEnsemble`` and ``rtdl_num_embeddings._NLinear`` (weights stored ``[k, in, out]``) is
re-routed: its forward becomes ``grouped_linear(x, weight.transpose(1, 2), bias)``; parameters,
initialisation and checkpoints stay as they are.

Checks, under one seed with dropout on (train mode): outputs and every parameter's gradient match
(relative error); then times a training step (zero_grad + forward + backward + Adam step) and an
inference forward (eval mode, no_grad) of both, interleaved rounds in a shuffled order, medians.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import types

import torch

import grouped_ops
from grouped_ops.peers import seconds_per_call

N_FEATURES, BATCH = 24, 512


def build() -> torch.nn.Module:
    import rtdl_num_embeddings  # noqa: PLC0415 - the bench extra
    import tabm  # noqa: PLC0415

    torch.manual_seed(0)
    return tabm.TabM.make(n_num_features=N_FEATURES, d_out=1, arch_type="tabm-packed", k=32, n_blocks=3,
                          d_block=256, dropout=0.1,
                          num_embeddings=rtdl_num_embeddings.PeriodicEmbeddings(N_FEATURES, lite=False))


def _routed_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return grouped_ops.grouped_linear(x, self.weight.transpose(1, 2), self.bias)


def reroute(model: torch.nn.Module) -> list[str]:
    """Re-route every grouped layer of ``model`` in place; returns their names."""
    import rtdl_num_embeddings  # noqa: PLC0415
    import tabm  # noqa: PLC0415

    names = []
    for name, module in model.named_modules():
        if isinstance(module, (tabm.LinearEnsemble, rtdl_num_embeddings._NLinear)):
            module.forward = types.MethodType(_routed_forward, module)
            names.append(name)
    return names


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(native: torch.nn.Module, routed: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Relative differences of the train-mode outputs and gradients under one seed (dropout on)."""
    out = {}
    results = []
    for m in (native, routed):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        y = m(x)
        y.square().mean().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    out["output"] = relative(results[1][0], results[0][0])
    out["gradients (worst)"] = max(relative(results[1][1][n], g) for n, g in results[0][1].items())
    return out


def timed(fn, calls: int = 3) -> float:
    return seconds_per_call(fn, calls) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    native = build()
    routed = copy.deepcopy(native)
    names = reroute(routed)
    x = torch.randn(BATCH, N_FEATURES, generator=torch.Generator().manual_seed(1))
    diffs = check(native, routed, x)
    print(f"re-routed {len(names)} layers: {', '.join(names)}")
    print("train mode, one seed, dropout on: relative difference " +
          ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    opts = {id(m): torch.optim.Adam(m.parameters(), lr=1e-4) for m in (native, routed)}

    def train_step(m):
        def run():
            m.train()
            opts[id(m)].zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            opts[id(m)].step()
        return run

    def infer(m):
        def run():
            m.eval()
            with torch.no_grad():
                m(x)
        return run

    print(f"\ntorch {torch.__version__}; load {[round(v, 2) for v in os.getloadavg()]}")
    print("| mode | threads | native (ms) | re-routed (ms) | native / re-routed |")
    print("|---|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode, make in (("train", train_step), ("inference", infer)):
            fns = {"native": make(native), "routed": make(routed)}
            for fn in fns.values():
                timed(fn, 2)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                order = list(fns)
                random.shuffle(order)
                for k in order:
                    times[k].append(timed(fns[k]))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {mode} | {threads} | {med['native']:.1f} | {med['routed']:.1f} | "
                  f"{med['native'] / med['routed']:.3f}x |")
    print(f"load after: {[round(v, 2) for v in os.getloadavg()]}")


if __name__ == "__main__":
    main()
