"""What the steps of scripts/gpu_check.py share: the step context, error text, timing, inputs.

Its own module so that gpu_check_steps.py (the steps and their table), gpu_check_bench.py and
gpu_check_ragged.py each import it, and none of them imports another back.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Ctx:
    def __init__(self, step: str, out: Path, dry: bool) -> None:
        self.step, self.out, self.dry = step, out, dry
        self.dev = torch.device("cpu" if dry else "cuda")
        self.summary: list[str] = []
        self.problems: list[str] = []
        self.data: dict[str, Any] = {}

    def note(self, line: str) -> None:
        self.summary.append(line)
        print(line, flush=True)
        self.save()

    def problem(self, line: str) -> None:
        self.problems.append(line)
        print("PROBLEM:", line, flush=True)
        self.save()

    def save(self) -> None:
        path = self.out / f".partial-{self.step}.json"
        path.write_text(json.dumps(self.result(), default=str))

    def result(self) -> dict[str, Any]:
        return {"summary": self.summary, "problems": self.problems, "data": self.data}

    def deadline(self, seconds: float) -> float:
        """A time.monotonic() deadline ``seconds`` from now, but inside the step's time box (the
        runner passes its end as GPU_CHECK_END, epoch seconds), so a step stops itself in time."""
        end = float(os.environ.get("GPU_CHECK_END", "inf"))
        return time.monotonic() + min(seconds, end - time.time())

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _median_time(ctx: Ctx, fn: Any, reps: int, deadline: float) -> float | None:
    """Median seconds per call over ``reps`` samples of grouped_ops' own timer (events on CUDA)."""
    from grouped_ops.tuning.timer import timer_for

    timer = timer_for(ctx.dev)
    fn()
    fn()
    ctx.sync()
    first = timer("warm", fn, 1)
    number = max(1, min(200, int(2e-3 / max(first, 1e-7))))
    samples = []
    for _ in range(reps):
        if time.monotonic() > deadline:
            break
        samples.append(timer("x", fn, number))
    return statistics.median(samples) if samples else None


def _gl_inputs(ctx: Ctx, batch: int, n: int, inn: int, out: int, dtype: torch.dtype, grad: bool = False):
    g = torch.Generator(device=ctx.dev).manual_seed(0)
    x = torch.randn(batch, n, inn, device=ctx.dev, dtype=dtype, generator=g)
    w = (torch.randn(n, out, inn, device=ctx.dev, dtype=dtype, generator=g) / inn**0.5).requires_grad_(grad)
    b = torch.randn(n, out, device=ctx.dev, dtype=dtype, generator=g).requires_grad_(grad)
    return x.requires_grad_(grad), w, b
