"""The layers users already write for n linear layers side by side, and a side-by-side timing.

Each peer is built from the same ``nn.ModuleList`` of ``nn.Linear`` a user would start from, and
maps ``x [batch, n, in]`` to ``[batch, n, out]`` exactly as ``GroupedLinear.from_linears`` does:

* ``tabm``: the TabM / rtdl layer, weight stored ``[n, in, out]``,
  ``(x.transpose(0, 1) @ W).transpose(0, 1) + b``;
* ``vmap``: torch.func ensembling, ``stack_module_state`` + ``functional_call`` under ``vmap``;
* ``loop``: the ``nn.ModuleList`` loop, ``torch.stack([lin(x[:, i]) ...], 1)``;
* ``compiled_loop``: that loop under ``torch.compile``.

:func:`run_peers` times them next to GroupedLinear (forward without grad, and a training step),
in interleaved rounds. Importing this module imports nothing beyond torch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["TabMLinear", "VmapLinears", "LoopLinears", "compiled_loop", "PEERS", "build",
           "Shape", "run_peers", "summarize"]


class TabMLinear(nn.Module):
    """TabM's / rtdl's ensemble linear: ``weight [n, in, out]``, ``bias [n, out]``.

    ``x [batch, n, in]`` -> ``[batch, n, out]`` (a transposed view, as that code returns it).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, *, contiguous: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.contiguous = contiguous  # return a contiguous result (grouped_ops' output contract)

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear], *, contiguous: bool = False) -> TabMLinear:
        layers = list(linears)
        with torch.no_grad():
            weight = torch.stack([lin.weight.detach().t() for lin in layers])  # [n, in, out]
            bias = None if layers[0].bias is None else torch.stack([lin.bias.detach() for lin in layers])
        return cls(weight, bias, contiguous=contiguous)

    def forward(self, x: Tensor) -> Tensor:
        y = (x.transpose(0, 1) @ self.weight).transpose(0, 1)
        y = y if self.bias is None else y + self.bias
        return y.contiguous() if self.contiguous else y


class VmapLinears(nn.Module):
    """torch.func model ensembling (the PyTorch tutorial's recipe): the layers' parameters
    stacked by ``stack_module_state`` (``weight [n, out, in]``), one ``functional_call`` of a
    stateless copy of ``linears[0]`` vmapped over the group dim. ``x [batch, n, in]``."""

    def __init__(self, linears: Iterable[nn.Linear]) -> None:
        super().__init__()
        layers = list(linears)
        params, _ = torch.func.stack_module_state(layers)
        self.stacked = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in params.items()})
        self._base = [copy.deepcopy(layers[0]).to("meta")]  # a list: not a submodule, no state

    def forward(self, x: Tensor) -> Tensor:
        base = self._base[0]

        def one(params: dict[str, Tensor], xi: Tensor) -> Tensor:
            return torch.func.functional_call(base, params, (xi,))

        return torch.vmap(one, in_dims=(0, 1), out_dims=1)(dict(self.stacked), x)


class LoopLinears(nn.Module):
    """The ``nn.ModuleList`` loop: ``x [batch, n, in]`` -> ``stack([lin_i(x[:, i])], 1)``."""

    def __init__(self, linears: Iterable[nn.Linear]) -> None:
        super().__init__()
        self.linears = nn.ModuleList(copy.deepcopy(lin) for lin in linears)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(self.linears)], dim=1)


#: How the compiled variants compile: each for its cell's shapes, as a model compiled for one input
#: shape is. Without ``dynamic=False`` the cells' shapes, all passing through the same ``forward``
#: functions, would make dynamo recompile later cells with dynamic sizes (automatic dynamic shapes),
#: and the comparison would depend on the order of the cells.
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


def compiled_loop(linears: Iterable[nn.Linear]) -> nn.Module:
    """:class:`LoopLinears` under ``torch.compile`` (default mode, static shapes: see
    :data:`COMPILE_OPTIONS`; compiles on first call)."""
    return torch.compile(LoopLinears(linears), **COMPILE_OPTIONS)


def _grouped(linears: Iterable[nn.Linear]) -> nn.Module:
    from .nn import GroupedLinear  # noqa: PLC0415 - keeps this module's import light

    return GroupedLinear.from_linears(linears)


def _grouped_in_out(linears: Iterable[nn.Linear]) -> nn.Module:
    from .nn import GroupedLinear  # noqa: PLC0415

    return GroupedLinear.from_linears(linears, weight_layout="in_out")


def _mlp(kind: str) -> Callable[[Iterable[nn.Linear]], nn.Module]:
    """A compiled two-layer model ``layer(in->out), ReLU, layer(out->out)`` of ``kind``
    (``"grouped"`` or ``"tabm"``); the second layer's ModuleList is seeded, so both kinds of a
    cell hold the same weights."""
    def make(linears: Iterable[nn.Linear]) -> nn.Module:
        first = list(linears)
        n, out = len(first), first[0].out_features
        second = make_linears(Shape(0, n, out, out), bias=first[0].bias is not None,
                              dtype=first[0].weight.dtype, seed=1)
        return torch.compile(nn.Sequential(build(kind, first), nn.ReLU(), build(kind, second)), **COMPILE_OPTIONS)
    return make


PEERS: dict[str, Callable[[Iterable[nn.Linear]], nn.Module]] = {
    "tabm": TabMLinear.from_linears, "vmap": VmapLinears, "loop": LoopLinears, "compiled_loop": compiled_loop,
}
BUILDERS: dict[str, Callable[[Iterable[nn.Linear]], nn.Module]] = {
    "grouped": _grouped, "grouped_in_out": _grouped_in_out, **PEERS,
    # not a peer: the TabM layer under grouped_ops' output contract (a fresh contiguous result)
    "tabm_contiguous": partial(TabMLinear.from_linears, contiguous=True),
    # the torch.compile comparison: the same model with either layer, both compiled
    "compiled_grouped_mlp": _mlp("grouped"), "compiled_tabm_mlp": _mlp("tabm"),
}


def build(name: str, linears: Iterable[nn.Linear]) -> nn.Module:
    """``"grouped"`` (GroupedLinear.from_linears), ``"grouped:<impl>"`` (the same with a forced
    implementation), one of :data:`PEERS`, or a compiled model (``"compiled_grouped_mlp"`` /
    ``"compiled_tabm_mlp"``), from ``linears``."""
    if name.startswith("grouped:"):
        from .nn import GroupedLinear  # noqa: PLC0415

        return GroupedLinear.from_linears(linears, impl=name.partition(":")[2])
    return BUILDERS[name](linears)


# ---- timing --------------------------------------------------------------------------------------

class Shape(NamedTuple):
    """One cell: ``x [batch, n, in]`` through n ``Linear(in, out)``."""

    batch: int
    n: int
    inn: int
    out: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.n} {self.inn}->{self.out}"


def make_linears(shape: Shape, *, bias: bool = True, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> nn.ModuleList:
    """The ``nn.ModuleList`` every variant of a cell is built from (seeded; the caller's RNG
    state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.ModuleList(nn.Linear(shape.inn, shape.out, bias=bias, dtype=dtype) for _ in range(shape.n))


def step_fn(module: nn.Module, x: Tensor, mode: str, grad: Tensor | None = None) -> Callable[[], Any]:
    """One timed call: ``"fwd"`` is a forward under no_grad; ``"train"`` is zero_grad (to None)
    + forward + backward of a fixed random output gradient (also into ``x``)."""
    if mode == "fwd":
        def fwd() -> Any:
            with torch.no_grad():
                return module(x)
        return fwd
    params = [p for p in module.parameters() if p.requires_grad]
    x.requires_grad_(True)

    def train() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        y = module(x)
        y.backward(grad if grad is not None else torch.ones_like(y))
    return train


def _calibrate(fn: Callable[[], Any], round_s: float) -> int:
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(10_000, int(round_s / once)))


def seconds_per_call(fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls in a row (one sample of an interleaved round)."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, round_s: float,
                     rng: random.Random, stat: str = "median") -> dict[str, float]:
    """Median (or with ``stat="min"`` the fastest round's) seconds per call of each fn; every round
    times each fn once, in a shuffled order. The fastest round is the one least disturbed by other
    work: on a machine other jobs load, medians measure the load."""
    reps = {k: _calibrate(f, round_s) for k, f in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for _ in range(rounds):
        rng.shuffle(names)
        for k in names:
            samples[k].append(seconds_per_call(fns[k], reps[k]))
    pick = min if stat == "min" else statistics.median
    return {k: pick(v) for k, v in samples.items()}


def _warm(fn: Callable[[], Any], calls: int = 3) -> None:
    for _ in range(calls):  # the first call tunes (GroupedLinear) or compiles (compiled_loop)
        fn()


def run_peers(shapes: Sequence[Shape | tuple[int, int, int, int]], threads: Sequence[int] = (1,),
              passes: int = 3, *, modes: Sequence[str] = ("fwd", "train"),
              variants: Sequence[str] = ("grouped", "tabm", "vmap", "loop", "compiled_loop"),
              rounds: int = 7, round_s: float = 5e-3, bias: bool = True, dtype: torch.dtype = torch.float32,
              seed: int = 0, skip: Callable[[Shape, str, str], bool] | None = None,
              progress: Callable[[str], None] | None = None, stat: str = "median") -> list[dict[str, Any]]:
    """Time ``variants`` side by side on every (shape, threads, mode) cell, on CPU.

    A pass visits every cell once; in each cell every variant is timed in ``rounds`` interleaved
    rounds (shuffled order, each ~``round_s`` long) and its median kept. Passes repeat the whole
    grid, so one busy spell of a shared machine touches one pass only. ``skip(shape, mode,
    variant)`` leaves a variant out of a cell (e.g. a compile that would take minutes).

    Returns one row per (shape, threads, mode, variant): ``{"shape": [batch, n, in, out],
    "threads", "mode", "variant", "us"`` (median over passes of the pass medians, microseconds),
    ``"passes_us"`` (each pass's median)``}``. See :func:`summarize` for the ratios.
    """
    cells = [Shape(*s) for s in shapes]
    rng = random.Random(seed)
    built: dict[tuple[Shape, str], dict[str, Callable[[], Any]]] = {}
    per_pass: dict[tuple[Shape, int, str, str], list[float]] = {}
    before = torch.get_num_threads()
    try:
        with _recompile_limits(len(cells) * len(modes) if any(v.startswith("compiled") for v in variants) else 0):
            for p in range(passes):
                for t in threads:
                    torch.set_num_threads(t)
                    for shape in cells:
                        for mode in modes:
                            key = (shape, mode)
                            if key not in built:
                                kept = [v for v in variants if not (skip and skip(shape, mode, v))]
                                built[key] = _build_cell(shape, mode, kept, bias, dtype, seed)
                            fns = built[key]
                            if p == 0:
                                for fn in fns.values():
                                    _warm(fn)
                            times = time_interleaved(fns, rounds, round_s, rng, stat)
                            for v, s in times.items():
                                per_pass.setdefault((shape, t, mode, v), []).append(s * 1e6)
                            if progress:
                                progress(f"pass {p + 1}/{passes} threads={t} {shape} {mode}")
    finally:
        torch.set_num_threads(before)
    return [{"shape": list(shape), "threads": t, "mode": mode, "variant": v,
             "us": statistics.median(us), "passes_us": us}
            for (shape, t, mode, v), us in per_pass.items()]


@contextlib.contextmanager
def _recompile_limits(graphs: int) -> Iterator[None]:
    """Room for ``graphs`` compiled variants per code object while the benchmark runs.

    Every compiled module of every cell compiles the same ``forward`` functions again for its own
    parameters and shapes; past dynamo's recompile limit (8 per code object by default) dynamo
    silently runs the rest eagerly, and the compiled columns would time eager code."""
    if not graphs:
        yield
        return
    import torch._dynamo  # noqa: PLC0415 - only when a compiled variant runs

    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    saved = {n: getattr(config, n) for n in names}
    try:
        for n in names:
            setattr(config, n, max(saved[n], 4 * graphs + 64))
        yield
    finally:
        for n, v in saved.items():
            setattr(config, n, v)


def _build_cell(shape: Shape, mode: str, variants: Sequence[str], bias: bool, dtype: torch.dtype,
                seed: int) -> dict[str, Callable[[], Any]]:
    linears = make_linears(shape, bias=bias, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    fns = {}
    for v in variants:
        x = torch.randn(shape.batch, shape.n, shape.inn, dtype=dtype, generator=gen)
        grad = torch.randn(shape.batch, shape.n, shape.out, dtype=dtype, generator=gen)
        module = build(v, linears)
        eager = getattr(module, "_orig_mod", None)
        if eager is not None:  # tune GroupedLinear eagerly first, so the compiled graph inlines its pick
            step_fn(eager, x.detach().clone(), mode, grad)()
        fns[v] = step_fn(module, x, mode, grad)
    return fns


def module_overhead(batches: Sequence[int] = (1, 8, 32), n: int = 32, d: int = 64, rounds: int = 41,
                    passes: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Per-call cost of a decided GroupedLinear forward against the TabM layer on the same weights, at
    tiny batches where Python dominates: one thread, no grad, ``rounds`` interleaved rounds of
    ~1 ms (shuffled order) per pass; per variant the minimum round of each pass (the least disturbed
    by other work on the machine), then the median over passes, in microseconds. ``bmm_only`` is the
    one kernel bmm runs (the floor); ``grouped_fn`` the functional op on the module's parameters.
    Rows: ``{"batch", "grouped", "grouped_fn", "tabm", "bmm_only", "grouped_minus_tabm"}``."""
    from .functional import grouped_linear  # noqa: PLC0415 - keeps this module's import light
    from .nn import GroupedLinear  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(seed)
    rows = []
    try:
        for batch in batches:
            layer = GroupedLinear.from_linears(make_linears(Shape(batch, n, d, d), seed=seed))
            w, b = layer.weight, layer.bias
            tabm = TabMLinear(w.detach().transpose(1, 2).contiguous(), b.detach().clone())
            x = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed))
            wt, b3 = w.detach().transpose(1, 2), b.detach().unsqueeze(1)
            fns = {"grouped": lambda layer=layer, x=x: layer(x),
                   "grouped_fn": lambda x=x, w=w, b=b: grouped_linear(x, w, b),
                   "tabm": lambda tabm=tabm, x=x: tabm(x),
                   "bmm_only": lambda x=x, wt=wt, b3=b3: torch.baddbmm(b3, x.transpose(0, 1), wt)}
            best: dict[str, list[float]] = {k: [] for k in fns}
            with torch.no_grad():
                for fn in fns.values():
                    _warm(fn, 50)
                for _ in range(passes):  # each pass's fastest round; the median over passes below
                    for k, t in time_interleaved(fns, rounds, 1e-3, rng, stat="min").items():
                        best[k].append(t * 1e6)
            row: dict[str, Any] = {"batch": batch, **{k: statistics.median(v) for k, v in best.items()}}
            row["grouped_minus_tabm"] = row["grouped"] - row["tabm"]
            rows.append(row)
    finally:
        torch.set_num_threads(before)
    return rows


def summarize(rows: Sequence[dict[str, Any]], ours: str = "grouped") -> list[dict[str, Any]]:
    """Per (shape, threads, mode): ours, the best peer and ``speedup`` = best peer's time / ours
    (>= 1: ours is at least as fast)."""
    cells: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((tuple(r["shape"]), r["threads"], r["mode"]), {})[r["variant"]] = r["us"]
    out = []
    for (shape, t, mode), times in cells.items():
        peers = {k: v for k, v in times.items() if k != ours}
        best = min(peers, key=peers.__getitem__)
        out.append({"shape": list(shape), "threads": t, "mode": mode, "ours_us": times[ours],
                    "best_peer": best, "best_peer_us": peers[best], "speedup": peers[best] / times[ours]})
    return out


def geomean(values: Iterable[float]) -> float:
    vals = list(values)
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")
