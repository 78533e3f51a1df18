"""The steps of scripts/gpu_check.py, each run alone: ``python3 scripts/gpu_check_steps.py STEP OUTDIR [--dry-run]``.

A step prints ``@@RESULT {json}`` last: ``summary`` (report lines), ``problems`` (what looks wrong)
and ``data``. While it runs it saves what it has so far to ``OUTDIR/.partial-STEP.json``, which the
runner reports if the step is killed at its time box. ``--dry-run``: CPU, tiny sizes, no GPU.
Uses only what grouped_ops imports plus torch (the GPU machine has no network, no platformdirs).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

# the shared helpers (which put the repository on sys.path) and the steps of their own modules
from gpu_check_bench import bench, tune_table
from gpu_check_common import Ctx, _err, _gl_inputs, _median_time
from gpu_check_ragged import ragged
from torch import nn

# ---- steps ----------------------------------------------------------------------------------------

def env(ctx: Ctx) -> None:
    import importlib
    import platform
    import subprocess

    d = ctx.data
    d["python"], d["torch"], d["cuda"] = platform.python_version(), torch.__version__, str(torch.version.cuda)
    d["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                    "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    d["modules"] = {}
    for name in ("platformdirs", "tqdm", "hypothesis", "opt_einsum", "filelock", "numpy", "pytest",
                 "pytest_benchmark", "pytest_timeout", "triton", "matplotlib"):
        try:
            importlib.import_module(name)
            d["modules"][name] = "ok"
        except Exception as e:  # noqa: BLE001 - a broken module is as missing as an absent one
            d["modules"][name] = _err(e)
    try:
        import grouped_ops

        d["grouped_ops"] = grouped_ops.__version__
    except Exception as e:  # noqa: BLE001
        d["grouped_ops"] = _err(e)
        ctx.problem(f"import grouped_ops failed: {_err(e)}")
    with contextlib.suppress(Exception):
        d["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,memory.used",
                                          "--format=csv"], capture_output=True, text=True, timeout=20).stdout
    d["threads"] = torch.get_num_threads()
    missing = [k for k, v in d["modules"].items() if v != "ok"]
    ctx.note(f"python {d['python']}, torch {d['torch']} (CUDA {d['cuda']}), "
             f"{d.get('gpu', {}).get('name', 'no GPU')} sm{d.get('gpu', {}).get('capability', '-')}; "
             f"missing modules: {', '.join(missing) or 'none'}; grouped_ops {d['grouped_ops']}")


def grouped_mm_probe(ctx: Ctx) -> None:
    """grouped_mm against bmm: dtypes, n around 1024, weight layouts, backward, torch.compile; and
    whether torch's behaviour agrees with our reasons (empty reasons <=> it runs and agrees)."""
    from grouped_ops.ops import SPECS
    from grouped_ops.ops import grouped_linear as gl

    spec = SPECS["grouped_linear"]
    ns = (4, 8) if ctx.dry else (32, 1023, 1024)
    batch, d = (4, 16) if ctx.dry else (64, 64)
    layouts = {"contiguous": lambda w: w, "transposed": lambda w: w.transpose(1, 2).contiguous().transpose(1, 2),
               "shared": lambda w: w[:1].expand_as(w), "chunked": lambda w: torch.cat([w, w], 1)[:, : w.shape[1]]}
    rows = ctx.data.setdefault("cases", [])
    deadline = ctx.deadline(15 if ctx.dry else 30)
    widths = [(d, d), (d, d - 4), (d - 4, d)]  # (in, out): 16-byte aligned rows, then not
    for dtype, n, (layout, make), grad, (inn, out) in itertools.product(
            (torch.bfloat16, torch.float16, torch.float32), ns, layouts.items(), (False, True), widths):
        if time.monotonic() > deadline:
            ctx.problem("probe cut short by its time box")
            break
        x, w0, b = _gl_inputs(ctx, batch, n, inn, out, dtype)
        w = make(w0.detach().requires_grad_(grad))  # a view of a leaf: gradients reach the leaf
        x.requires_grad_(grad)
        reasons = gl._grouped_mm_reasons(spec.signature(spec.meta(x, w, b)))
        row = {"dtype": str(dtype)[6:], "n": n, "in": inn, "out": out, "layout": layout, "grad": grad,
               "reasons": reasons}
        try:
            y = gl.grouped_mm(x, w, b)
            ref = gl.bmm(x.detach().double(), w.detach().double(), b.double())
            row["rel_err"] = float((y.double() - ref).norm() / ref.norm())
            if grad:
                y.backward(torch.randn_like(y))
            ctx.sync()
            row["runs"] = True
        except Exception as e:  # noqa: BLE001
            row["runs"], row["error"] = False, _err(e)
        rows.append(row)
        if not reasons and not row["runs"]:
            ctx.problem(f"grouped_mm declared able but failed: {row}")
    able = [r for r in rows if not r["reasons"]]
    ctx.note(f"{len(rows)} cases: {len(able)} declared supported, of which {sum(r['runs'] for r in able)} ran; "
             f"{sum(1 for r in rows if r['reasons'] and r['runs'])} declared unsupported ran anyway "
             f"(torch's fallback, or a limit of ours); errors of the rest: "
             f"{sorted({r['error'][:80] for r in rows if not r['runs']})}")
    bad = [r for r in rows if r.get("rel_err", 0) > 2e-2]
    if bad:
        ctx.problem(f"{len(bad)} cases off by more than 2e-2, e.g. {bad[0]}")
    # speed of the fast path against bmm, and compiled (Inductor may lower grouped_mm itself)
    deadline = ctx.deadline(20 if ctx.dry else 40)
    for dtype in (torch.bfloat16, torch.float16):
        x, w, b = _gl_inputs(ctx, 8 if ctx.dry else 256, 8 if ctx.dry else 32, d, d, dtype)
        with torch.no_grad():
            t = {name: _median_time(ctx, lambda f=f, x=x, w=w, b=b: f(x, w, b), 10, deadline) for name, f in
                 (("grouped_mm", gl.grouped_mm), ("bmm", gl.bmm))}
        ctx.data[f"speed_{str(dtype)[6:]}"] = t
        ctx.note(f"{dtype} {tuple(x.shape)}: " + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in t.items() if v))
    for n in ns[-2:]:
        if float(os.environ.get("GPU_CHECK_END", "inf")) - time.time() < 15:  # a compile takes ~10 s
            ctx.note(f"compiled grouped_mm n={n}: left out, under 15 s left in the step's time box")
            continue
        x, w, b = _gl_inputs(ctx, batch, n, d, d, torch.bfloat16)
        try:
            torch._dynamo.reset()
            y = torch.compile(gl.grouped_mm, fullgraph=True)(x, w, b)
            ctx.sync()
            ctx.data[f"compiled_n{n}"] = float((y.float() - gl.bmm(x, w, b).float()).abs().max())
            ctx.note(f"compiled grouped_mm n={n}: ran, max abs diff {ctx.data[f'compiled_n{n}']:.3g}")
        except Exception as e:  # noqa: BLE001
            ctx.data[f"compiled_n{n}"] = _err(e)
            ctx.note(f"compiled grouped_mm n={n}: {_err(e)}")


def autocast(ctx: Ctx) -> None:
    """Every implementation's output dtype under autocast, both ops, as nn.Linear's."""
    import grouped_ops

    x, w, b = _gl_inputs(ctx, 16, 4, 32, 16, torch.float32)
    inputs = torch.randn(16, 4, 64, device=ctx.dev)
    weights = torch.rand(16, 4, device=ctx.dev)
    bad = []
    for dtype in (torch.bfloat16, torch.float16):
        for op, call in (("grouped_linear", lambda i: grouped_ops.grouped_linear(x, w, b, impl=i)),
                         ("weighted_combine", lambda i: grouped_ops.weighted_combine(inputs, weights, impl=i))):
            for impl in ("auto", *grouped_ops.implementations(op)):
                try:
                    with torch.autocast(ctx.dev.type, dtype=dtype):
                        got = str(call(impl).dtype)[6:]
                except Exception as e:  # noqa: BLE001
                    got = "error: " + _err(e)
                ctx.data[f"{op}/{impl}/{str(dtype)[6:]}"] = got
                if got != str(dtype)[6:] and not got.startswith("error: GroupedOpsError"):
                    bad.append(f"{op} {impl} under {dtype}: {got}")
    for line in bad:
        ctx.problem(line)
    ctx.note(f"{len(ctx.data)} (op, impl, dtype) cases; {len(bad)} not in the autocast dtype")


def timer_check(ctx: Ctx) -> None:
    """grouped_ops' timer against the wall clock, on the default stream and a side stream."""
    from grouped_ops.tuning.timer import timer_for

    t = timer_for(ctx.dev)
    if ctx.dry:
        work = lambda: time.sleep(0.002)  # noqa: E731
    else:
        a = torch.randn(4096, 4096, device=ctx.dev, dtype=torch.bfloat16)
        work = lambda: a @ a  # noqa: E731
        ctx.sync()  # `a` is ready before a side stream reads it
    streams = [("default", contextlib.nullcontext())]
    if not ctx.dry:
        streams.append(("side", torch.cuda.stream(torch.cuda.Stream())))
    for name, scope in streams:
        with scope:
            work()
            ctx.sync()
            events = statistics.median(t("x", work, 20) for _ in range(5))
            start = time.perf_counter()
            for _ in range(20):
                work()
            ctx.sync()
            wall = (time.perf_counter() - start) / 20
        ctx.data[name] = {"timer_s": events, "wall_s": wall, "ratio": events / wall}
        ctx.note(f"{name} stream: timer {events * 1e6:.1f} us, wall clock {wall * 1e6:.1f} us (ratio {events / wall:.2f})")
        if not 0.8 < events / wall < 1.25:
            ctx.problem(f"timer and wall clock disagree on the {name} stream: ratio {events / wall:.2f}")
    _l2_flush_rankings(ctx)


def _l2_flush_rankings(ctx: Ctx) -> None:
    """Back to back (the default) vs an L2 flush before each call (``flush_l2``): does the ranking of
    grouped_linear's implementations change? (docs/gpu.md, "Tuning conditions"). Data, not a test."""
    from grouped_ops.ops import SPECS
    from grouped_ops.tuning.timer import CudaTimer, cpu_timer

    spec = SPECS["grouped_linear"]
    timers = {"plain": cpu_timer, "flushed": cpu_timer} if ctx.dry else \
        {"plain": CudaTimer(ctx.dev), "flushed": CudaTimer(ctx.dev, flush_l2=True)}
    deadline = ctx.deadline(12)
    shapes = [(16, 4, 8, 8)] if ctx.dry else [(256, 32, 64, 64), (64, 8, 512, 512), (2048, 16, 128, 128)]
    for batch, n, inn, out in shapes:
        args = _gl_inputs(ctx, batch, n, inn, out, torch.float32 if ctx.dry else torch.bfloat16)
        sig = spec.signature(spec.meta(*args))
        cell: dict[str, dict[str, float]] = {}
        for impl_name, impl in spec.registry.items():
            if not impl.supports(sig) or time.monotonic() > deadline:
                continue
            fn = lambda impl=impl, args=args: impl(*args)  # noqa: E731
            with torch.no_grad():
                fn()
                ctx.sync()
                cell[impl_name] = {mode: statistics.median(t(impl_name, fn, 10) for _ in range(3))
                                   for mode, t in timers.items()}
        ranks = {mode: sorted(cell, key=lambda k, m=mode: cell[k][m]) for mode in timers}
        ctx.data[f"l2/{batch}x{n} {inn}->{out}"] = {"us": {k: {m: v * 1e6 for m, v in d.items()} for k, d in cell.items()},
                                                    "ranking": ranks}
        ctx.note(f"L2 flush, {batch}x{n} {inn}->{out}: " + ", ".join(
            f"{k} {d['plain'] * 1e6:.1f}/{d['flushed'] * 1e6:.1f} us" for k, d in cell.items())
            + f"; winner plain {ranks['plain'][:1]}, flushed {ranks['flushed'][:1]}")


def sync_debug(ctx: Ctx) -> None:
    """Cached auto and forced implementations, forward and training, under sync debug mode "error";
    then a first call (tuning) under it."""
    import grouped_ops

    if ctx.dry:
        ctx.note("dry run: no CUDA sync debug mode on CPU; calls run plainly")
    x, w, b = _gl_inputs(ctx, 32, 8, 32, 32, torch.float32, grad=True)
    grouped_ops.prewarm("grouped_linear", x, w, b)
    with torch.no_grad():
        grouped_ops.prewarm("grouped_linear", x, w, b)
    mode = contextlib.nullcontext if ctx.dry else _sync_error_mode
    for impl in ("auto", *grouped_ops.implementations("grouped_linear")):
        for train in (False, True):
            try:
                with mode(), torch.set_grad_enabled(train):
                    y = grouped_ops.grouped_linear(x, w, b, impl=impl)
                    if train:
                        y.sum().backward()
                got = "ok"
            except Exception as e:  # noqa: BLE001
                got = _err(e)
                if "GroupedOpsError" not in got:
                    ctx.problem(f"{impl} {'training' if train else 'forward'} synchronises: {got}")
            ctx.data[f"{impl}/{'train' if train else 'fwd'}"] = got
    x2, w2, b2 = _gl_inputs(ctx, 48, 6, 16, 16, torch.float32)
    try:
        with mode():
            d = grouped_ops.prewarm("grouped_linear", x2, w2, b2)
        ctx.data["tuned_under_mode"] = {"impl": d.impl, "source": d.source, "skipped": dict(d.skipped)}
        failed = [n for n, why in d.skipped.items() if why.startswith(("raised", "disagrees"))]
        ctx.note(f"tuning under sync debug mode: {d.impl} ({d.source}); excluded: {failed or 'none'}")
        if failed:
            ctx.problem(f"tuning under sync debug 'error' excluded {failed} (issue 14 item 7)")
    except Exception as e:  # noqa: BLE001
        ctx.problem(f"tuning under sync debug mode raised {_err(e)}")
    ctx.note(f"{sum(v == 'ok' for v in ctx.data.values() if isinstance(v, str))} of "
             f"{sum(isinstance(v, str) for v in ctx.data.values())} cached calls ran without a sync")


@contextlib.contextmanager
def _sync_error_mode():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cuda_graph(ctx: Ctx) -> None:
    """Capture grouped_linear in a CUDA graph: cold (never seen), warm (prewarmed), nearest (a
    neighbouring batch tuned); replay and compare with eager."""
    import grouped_ops

    for case, prewarm_batch, batch in (("cold", None, 40), ("warm", 24, 24), ("nearest", 16, 200)):
        x, w, b = _gl_inputs(ctx, batch, 8, 32, 32, torch.float32)
        if prewarm_batch is not None:
            grouped_ops.prewarm("grouped_linear", *_gl_inputs(ctx, prewarm_batch, 8, 32, 32, torch.float32))
        try:
            if ctx.dry:
                y = grouped_ops.grouped_linear(x, w, b)
            else:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS handles), not through
                    torch.einsum("bni,noi->bno", x, w)  # grouped_ops: "cold" means its first sight
                    if case != "cold":
                        grouped_ops.grouped_linear(x, w, b)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = grouped_ops.grouped_linear(x, w, b)
                graph.replay()
                torch.cuda.synchronize()
            ref = torch.einsum("bni,noi->bno", x, w) + b
            d = grouped_ops.lookup("grouped_linear", x, w, b)
            ctx.data[case] = {"ok": True, "max_diff": float((y - ref).abs().max()),
                              "decision": None if d is None else f"{d.impl} ({d.source})"}
        except Exception as e:  # noqa: BLE001
            ctx.data[case] = {"ok": False, "error": _err(e)}
            ctx.problem(f"graph capture {case}: {_err(e)}")
        ctx.note(f"{case}: {ctx.data[case]}")


def compile_ro(ctx: Ctx) -> None:
    """torch.compile(mode="reduce-overhead"), cold (the first call decides) vs prewarmed."""
    import grouped_ops

    backend = {"backend": "aot_eager"} if ctx.dry else {"mode": "reduce-overhead"}
    for case, n in (("cold", 8), ("prewarmed", 12)):
        torch._dynamo.reset()
        model = nn.Sequential(grouped_ops.GroupedLinear(n, 32, 64), nn.ReLU(), grouped_ops.GroupedLinear(n, 64, 32))
        model = model.to(ctx.dev)
        x = torch.randn(64, n, 32, device=ctx.dev)
        if case == "prewarmed":
            with torch.no_grad():
                model(x)
        reserved0 = torch.cuda.memory_reserved() if not ctx.dry else 0
        compiled = torch.compile(model, **backend)
        times = []
        try:
            for _ in range(4):
                start = time.perf_counter()
                with torch.no_grad():
                    y = compiled(x)
                ctx.sync()
                times.append(time.perf_counter() - start)
            with torch.no_grad():
                diff = float((y - model(x)).abs().max())
            ctx.data[case] = {"first_s": times[0], "steady_s": times[-1], "max_diff": diff,
                              "reserved_growth_mib": ((torch.cuda.memory_reserved() if not ctx.dry else 0)
                                                      - reserved0) / 2**20}
        except Exception as e:  # noqa: BLE001
            ctx.data[case] = {"error": _err(e)}
            ctx.problem(f"reduce-overhead {case}: {_err(e)}")
        ctx.note(f"{case}: {ctx.data[case]}")


def _workspace_estimates(ctx: Ctx) -> None:
    """Each grouped_linear implementation's declared footprint (result, gradients, workspace:
    ``tuning.memory.footprint``) against CUDA's ``max_memory_allocated`` over a forced call, forward
    and training (issue 26: within 1.5x). CUDA only: the CPU check is scripts/workspace_check.py."""
    import grouped_ops
    from grouped_ops.ops import SPECS
    from grouped_ops.tuning import memory

    spec, rows = SPECS["grouped_linear"], {}
    for batch, n, inn, out in ((512, 8, 1024, 1024), (4096, 16, 256, 256)):
        for train in (False, True):
            x, w, b = _gl_inputs(ctx, batch, n, inn, out, torch.bfloat16, grad=train)
            sig = spec.signature(spec.meta(x, w, b), False)
            for name, implementation in spec.registry.items():
                if not implementation.supports(sig):
                    continue
                w.grad = b.grad = x.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.set_grad_enabled(train):
                    y = grouped_ops.grouped_linear(x, w, b, impl=name)
                    if train:
                        y.backward(torch.ones_like(y))
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                estimate = memory.footprint(spec, sig, name)
                rows[f"{batch}x{n} {inn}->{out} {'train' if train else 'fwd'} {name}"] = (peak, estimate)
                del y
                if estimate and not estimate / 1.5 <= peak <= estimate * 1.5:
                    ctx.problem(f"workspace estimate of {name} at {batch}x{n} {inn}->{out} "
                                f"{'training' if train else 'forward'}: {estimate} B declared, {peak} B measured")
    ctx.data["workspace_estimates"] = {k: {"measured": p, "estimate": e} for k, (p, e) in rows.items()}
    ctx.note(f"workspace estimates checked: {len(rows)} calls")


def oom(ctx: Ctx) -> None:
    """A first call (which tunes) with the device nearly full: the user's call must not raise.
    First, on CUDA, the declared workspaces against measured peaks (:func:`_workspace_estimates`)."""
    import grouped_ops
    from grouped_ops.ops import grouped_linear as gl

    if not ctx.dry:
        try:
            _workspace_estimates(ctx)
        except Exception as e:  # noqa: BLE001
            ctx.problem(f"workspace estimates: {_err(e)}")
    hog = []
    # the user's operands first: their own call (output 128 MiB) fits; the tuning's private
    # copies, outputs and gradients on top of it do not
    x, w, b = _gl_inputs(ctx, 4096, 32, 256, 256, torch.float32) if not ctx.dry else _gl_inputs(
        ctx, 8, 4, 16, 16, torch.float32)
    if ctx.dry:  # the same path, its allocations failing as a full GPU's would
        real = gl.random_like

        def failing(shape: Any, dtype: Any, device: Any, *a: Any, **k: Any) -> torch.Tensor:
            if torch.device(device).type == "meta":  # sizes only, allocates nothing
                return real(shape, dtype, device, *a, **k)
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        gl.random_like = failing
    else:
        torch.cuda.empty_cache()
        with contextlib.suppress(torch.OutOfMemoryError):
            while torch.cuda.mem_get_info()[0] > 400 << 20:
                hog.append(torch.empty(64 << 20, dtype=torch.uint8, device=ctx.dev))
        ctx.data["free_mib_when_full"] = torch.cuda.mem_get_info()[0] / 2**20
    try:
        y = grouped_ops.grouped_linear(x, w, b)
        d = grouped_ops.lookup("grouped_linear", x, w, b)
        ctx.data["first_call"] = {"ok": True, "shape": list(y.shape),
                                  "decision": None if d is None else f"{d.impl} ({d.source})",
                                  "skipped": None if d is None else dict(d.skipped)}
    except Exception as e:  # noqa: BLE001
        ctx.data["first_call"] = {"ok": False, "error": _err(e)}
        ctx.problem(f"the first call raised with the device full: {_err(e)} (issue 14 item 2)")
    finally:
        if ctx.dry:
            gl.random_like = real
        hog.clear()
    ctx.note(f"first call with the device full: {ctx.data['first_call']}")


STEPS = {f.__name__: f for f in (env, grouped_mm_probe, autocast, timer_check, sync_debug, cuda_graph,
                                 compile_ro, oom, ragged, bench, tune_table)}


def main(argv: list[str]) -> int:
    step, out, dry = argv[0], Path(argv[1]), "--dry-run" in argv
    ctx = Ctx(step, out, dry)
    try:
        STEPS[step](ctx)
        status = 0
    except Exception as e:  # noqa: BLE001 - the report says what broke; the runner goes on
        ctx.problem(f"step failed: {_err(e)}")
        ctx.data["traceback"] = traceback.format_exc()[-3000:]
        status = 1
    print("@@RESULT " + json.dumps(ctx.result(), default=str), flush=True)
    with contextlib.suppress(FileNotFoundError):
        (out / f".partial-{step}.json").unlink()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
