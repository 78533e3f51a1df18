"""What the sweep measures and keeps: a cell, its variants and their results; number formats."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .grids import BASELINE, GL, SEED, SEED_CAP_FACTOR

# ---- results -------------------------------------------------------------------------------------

@dataclass
class Result:
    status: str = "ok"  # ok, or "n/a: why", "skipped: why", "error: why", "mismatch: why"
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    reps: int = 0
    number: int = 0  # calls per sample; 0: taken from the tuner's timing (too slow to run again)

    @property
    def ok(self) -> bool:
        return self.median_s is not None and self.status == "ok"


@dataclass
class Cell:
    op: str  # grouped_linear, weighted_combine, or seed (grouped_linear shapes of the seed check)
    dtype: torch.dtype
    pass_: str
    dims: dict[str, Any]
    claim: str = ""  # seed check: which claim this cell tests
    skipped: str | None = None
    results: dict[str, Result] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # variant -> impl | auto | peer
    auto_impl: str | None = None
    auto_source: str | None = None
    tune_s: float | None = None
    elapsed_s: float | None = None  # wall time of the whole cell: inputs, prewarm, warm-ups, samples
    flops: float = 0.0
    bytes_moved: float = 0.0
    mem_bytes: float = 0.0
    floor_s: float | None = None
    bound: str = ""

    @property
    def label(self) -> str:
        d = self.dims
        if self.op in (GL, SEED):
            return f"batch={d['batch']} n={d['n']} {d['in']}->{d['out']}"
        shape = "x".join(str(v) for v in (d["batch"], d["k"], *d["features"]))
        return f"[{shape}] {d['layout']}"

    def time(self, name: str) -> float | None:
        r = self.results.get(name)
        return r.median_s if r is not None and r.ok else None

    def best_impl(self) -> tuple[str, float] | None:
        ok = [(t, n) for n, k in self.kinds.items() if k == "impl" and (t := self.time(n)) is not None]
        return (min(ok)[1], min(ok)[0]) if ok else None

    def fastest(self) -> str | None:
        """The fastest implementation or peer (auto is one of the implementations, timed again)."""
        ok = [(t, n) for n in self.results if n != "auto" and (t := self.time(n)) is not None]
        return min(ok)[1] if ok else None

    def auto_vs_baseline(self) -> float | None:
        base, auto = self.time(BASELINE.get(self.op if self.op != SEED else GL, "")), self.time("auto")
        return base / auto if base and auto else None

    def auto_over_best(self) -> float | None:
        best, auto = self.best_impl(), self.time("auto")
        return auto / best[1] if best and auto else None

    def floor_fraction(self) -> float | None:
        auto = self.time("auto")
        return self.floor_s / auto if self.floor_s and auto else None

    def to_json(self) -> dict[str, Any]:
        best = self.best_impl()
        return {
            "op": self.op, "dtype": _dname(self.dtype), "pass": self.pass_, "dims": self.dims,
            "label": self.label, "claim": self.claim or None, "skipped": self.skipped,
            "auto_impl": self.auto_impl, "auto_source": self.auto_source, "tune_s": self.tune_s,
            "elapsed_s": self.elapsed_s,
            "best_impl": best[0] if best else None, "fastest": self.fastest(),
            "auto_vs_baseline": self.auto_vs_baseline(), "auto_over_best": self.auto_over_best(),
            "flops": self.flops, "bytes_moved": self.bytes_moved, "mem_bytes_est": self.mem_bytes,
            "floor_s": self.floor_s, "bound": self.bound, "auto_floor_fraction": self.floor_fraction(),
            "results": {n: {"kind": self.kinds.get(n), **r.__dict__} for n, r in self.results.items()},
        }


@dataclass
class Variant:
    name: str
    kind: str  # impl | auto | peer
    fn: Callable[[], Tensor] | None = None  # one call: forward (+ backward); returns the forward output
    status: str = "ok"
    known: float | None = None  # seconds a call, as the tuner just measured it: too slow to time again
    check: bool = True  # compare its output with the first column's (not for a different function)


@dataclass
class Env:
    device: torch.device
    cell_time: float
    max_gflop: float
    mem_cap: float
    max_workspace: float
    reps: int
    min_sample: float
    seed: int
    bandwidth: float  # bytes/s of a large copy
    matmul: dict[torch.dtype, float]  # FLOP/s of a large matmul
    wanted: tuple[str, ...] | None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def too_big(self, flops: float, cell: Cell, why: str = "") -> str | None:
        """Why a call of ``flops`` is not timed, or None. The seed check's few cells get 4x the cap:
        its per-group-size claim needs the 256-per-group point."""
        cap = self.max_gflop * (SEED_CAP_FACTOR if cell.op == SEED else 1)
        if flops <= cap * 1e9:
            return None
        est = self.floor(cell.dtype, flops, cell.bytes_moved)[0]
        return (f"{flops / 1e9:.3g} GFLOP per call{why}, over the --max-gflop cap of {cap:g} "
                f"(>= {_fmt_t(est)} a call here)")

    def floor(self, dtype: torch.dtype, flops: float, nbytes: float) -> tuple[float, str]:
        t_mem, t_flop = nbytes / self.bandwidth, flops / self.matmul.get(dtype, self.matmul[torch.float32])
        return max(t_mem, t_flop), ("compute" if t_flop >= t_mem else "memory")


# ---- the sweep -----------------------------------------------------------------------------------

def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.0f} MiB"


def _fmt_t(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.3g}us"
    if s < 1.0:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.3g}s"
