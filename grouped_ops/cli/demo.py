"""``python -m grouped_ops demo``: the main job working on this machine, with the tuner's choice."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..decision import Decision
from ..functional import grouped_linear, weighted_combine
from ..recording import prewarm
from ..registry import tolerance
from ..signature import device_name, parse_dtype
from ..tuning.timer import timer_for
from ._common import cache_folder, device, floating_dtype, positive


def add_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help="show the main job working on this machine",
                          description="Build a ModuleList of nn.Linear and the equivalent grouped_linear "
                          "(and a weighted_combine), check the results match, show the tuner's choice "
                          "with every candidate's timing, and the speed-up over the loop.")
    demo.add_argument("--batch", type=positive, default=128, help="batch size (default 128)")
    demo.add_argument("--groups", type=positive, default=32, help="number of nn.Linear layers n (default 32)")
    demo.add_argument("--in", dest="in_features", type=positive, default=32,
                      help="input features per layer (default 32)")
    demo.add_argument("--out", dest="out_features", type=positive, default=32,
                      help="output features per layer (default 32)")
    demo.add_argument("--dtype", default="float32", type=floating_dtype,
                      help="float32 (default), bfloat16, float16, float64")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    demo.add_argument("--train", action="store_true", help="also time forward + backward")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    dev, dtype = device(args.device), parse_dtype(args.dtype)
    batch, n, inn, out = args.batch, args.groups, args.in_features, args.out_features
    torch.manual_seed(0)
    print(f"grouped_ops {__version__}, torch {torch.__version__}, {dev} ({device_name(dev)}), "
          f"{torch.get_num_threads()} threads")
    print(f"cache folder: {cache_folder()}")
    print("Each candidate table is the tuner's, timed while it decided on inputs of its own (here, or for "
          "'shipped', when\nthe shipped table was made); the times after it are measured now on the demo's "
          "tensors, in interleaved\nrounds, auto next to its choice forced with impl=.\n")

    # -- grouped_linear vs a ModuleList of nn.Linear
    layers = nn.ModuleList(nn.Linear(inn, out) for _ in range(n)).to(dev, dtype)
    weight = torch.stack([lin.weight for lin in layers]).detach()
    bias = torch.stack([lin.bias for lin in layers]).detach()
    x = torch.randn(batch, n, inn, device=dev, dtype=dtype)

    def loop() -> torch.Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(layers)], dim=1)

    def grouped() -> torch.Tensor:
        return grouped_linear(x, weight, bias)

    print(f"1. grouped_linear: {n} x nn.Linear({inn}, {out}) on input [{batch}, {n}, {inn}]")
    with torch.no_grad():
        decision = prewarm(grouped_linear, x, weight, bias)
        _report_match(loop(), grouped(), dtype)
        _report_decision(decision)
        chosen = _forced(decision, lambda impl: grouped_linear(x, weight, bias, impl=impl))
        t = _side_by_side({"ModuleList loop": loop, "grouped_linear (auto)": grouped, **chosen}, dev)
    _report_speed(t, "ModuleList loop", "grouped_linear (auto)")

    if args.train:
        wp, bp = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

        def loop_train() -> None:
            loop().sum().backward()

        def grouped_train() -> None:
            grouped_linear(x, wp, bp).sum().backward()

        print("\n   training (forward + backward), decided separately:")
        decision = prewarm(grouped_linear, x, wp, bp)
        _report_decision(decision)
        chosen = _forced(decision, lambda impl: grouped_linear(x, wp, bp, impl=impl).sum().backward())
        t = _side_by_side({"ModuleList loop": loop_train, "grouped_linear (auto)": grouped_train, **chosen}, dev)
        _report_speed(t, "ModuleList loop", "grouped_linear (auto)")

    # -- weighted_combine vs the stack-multiply-sum idiom
    k, c, hw = 4, 16, 16
    outs = [torch.randn(batch, c, hw, hw, device=dev, dtype=dtype) for _ in range(k)]
    w = torch.softmax(torch.randn(batch, k, device=dev, dtype=dtype), dim=-1)

    def stack_sum() -> torch.Tensor:
        return (w[:, :, None, None, None] * torch.stack(outs, 1)).sum(1)

    def combine() -> torch.Tensor:
        return weighted_combine(outs, w)

    print(f"\n2. weighted_combine: {k} branch outputs [{batch}, {c}, {hw}, {hw}] mixed by weights [{batch}, {k}]")
    with torch.no_grad():
        decision = prewarm(weighted_combine, outs, w)
        _report_match(stack_sum(), combine(), dtype)
        _report_decision(decision)
        chosen = _forced(decision, lambda impl: weighted_combine(outs, w, impl=impl))
        t = _side_by_side({"stack * w, sum": stack_sum, "weighted_combine (auto)": combine, **chosen}, dev)
    _report_speed(t, "stack * w, sum", "weighted_combine (auto)")
    print("\nNext: `python -m grouped_ops explain grouped_linear --batch 128 --groups 32 --in 32 --out 32` "
          "or `python -m grouped_ops cache list`.")
    return 0


def _forced(decision: Decision, call: Callable[[str], Any]) -> dict[str, Callable[[], Any]]:
    """The decided implementation, forced with ``impl=``, as one more column of the live timing."""
    return {f"impl={decision.impl}": lambda: call(decision.impl)}


def _report_match(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    a, b = expected.double(), got.double()
    err = ((b - a).norm() / a.norm().clamp_min(1e-30)).item()
    allowed = tolerance(dtype).agree  # grouped_ops.registry.TOLERANCE
    ok = err <= allowed
    print(f"   results match: {'yes' if ok else 'NO'} (relative difference {err:.2e}, "
          f"tolerance {allowed:.0e} for {str(dtype).removeprefix('torch.')}; "
          f"max abs difference {(b - a).abs().max().item():.2e})")


def _report_decision(d: Decision) -> None:
    where = " (a shipped table's times, not this machine's now)" if d.source == "shipped" else ""
    print(f"   auto chose {d.impl} ({d.source}); every candidate, median time per call{where}:")
    print(d.table() or "   (a single candidate: nothing to compare)")


def _report_speed(t: dict[str, float], base: str, ours: str) -> None:
    forced = "".join(f"   ({name}: {v * 1e6:.1f} us)" for name, v in t.items() if name.startswith("impl="))
    print(f"   measured now: {base}: {t[base] * 1e6:.1f} us   {ours}: {t[ours] * 1e6:.1f} us   "
          f"speed-up x{t[base] / t[ours]:.2f}{forced}")


def _side_by_side(fns: dict[str, Callable[[], Any]], dev: torch.device, seconds: float = 0.6) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds with the tuner's clock."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timer = timer_for(dev)
    for fn in fns.values():  # warm up and calibrate
        fn()
    sync()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(2e-3 / once * len(fns)))  # each sample lasts ~2 ms
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)  # a new order every round: what one function leaves behind (the
    # baseline's large temporaries) must not always slow the same next one (measured: 3.9x)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(next(iter(samples.values()))) < 5:
        for name in order.sample(list(fns), len(fns)):
            sync()
            samples[name].append(timer(name, fns[name], number))
    return {name: statistics.median(v) for name, v in samples.items()}
