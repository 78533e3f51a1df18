"""Each implementation's declared memory against its measured peak RSS (CPU).

For every case (op, implementation, signature) it runs the implementation once the way the tuner
does (forward; in training also ``torch.autograd.grad`` and AccumulateGrad's layout copies) and
measures the peak resident set over the resident set just before the call; the estimate is the
call's own footprint as the tuner counts it (``memory.footprint``: result, gradients and the
implementation's declared workspace). The process runs with ``MALLOC_MMAP_THRESHOLD_`` fixed, so
that a freed large tensor leaves the resident set at once (glibc's dynamic threshold would keep
it in the heap), and resets the peak (``/proc/self/clear_refs``) before each case.

    python3 scripts/workspace_check.py [--quick] [--json OUT]

Prints one line per case: estimate, measured, ratio. Used by tests/test_memory.py (a few cases).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any

THRESHOLD = "65536"  # bytes: every tensor of 64 KiB or more gets (and gives back) its own mapping


def _page_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return float(line.split()[1])
    raise RuntimeError(field)


def _reset() -> float:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _page_kb("VmRSS:") * 1024


def _sig(op: str, dims: dict[str, int], grad: bool, layout: dict[str, str], dtype: str) -> Any:
    from grouped_ops.ops import SPECS
    from grouped_ops.signature import Signature

    spec = SPECS[op]
    grads = {"grouped_linear": ("weight", "bias"), "weighted_combine": ("inputs", "weights")}[op]
    full = {"grouped_linear": {"input": "contiguous", "weight": "contiguous", "bias": "yes"},
            "weighted_combine": {"inputs": "stacked", "contiguous": "yes"}}[op] | layout
    if op == "grouped_linear" and full["bias"] == "no":
        grads = ("weight",)
    import torch

    return spec, Signature(op, tuple(dims.items()), getattr(torch, dtype), torch.device("cpu"),
                           tuple(full.items()), grads if grad else ())


def measure_case(op: str, impl: str, dims: dict[str, int], grad: bool, layout: dict[str, str] | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """(in this process) the estimate and the measured peak, in bytes, of one case."""
    import torch

    from grouped_ops.tuning import memory

    torch.set_num_threads(1)
    spec, sig = _sig(op, dims, grad, layout or {}, dtype)
    implementation = spec.registry[impl]
    tiny = sig
    for name in ("batch", "n"):  # the per-group sizes stay: they decide the code paths
        if name in dict(sig.dims):
            tiny = tiny.with_dim(name, min(sig.dim(name), 2))
    for s in (tiny, sig):  # the tiny one loads the code paths; then the real one
        g = torch.Generator().manual_seed(0)
        args = spec.make_inputs(s, g)
        targets = spec.grad_args(s, args)
        out_shape = None
        grad_out = None
        with torch.no_grad():
            out_shape = implementation(*args).shape if s is tiny else None
        if s is not tiny:
            out_shape = spec.fake(*[a.to("meta") if isinstance(a, torch.Tensor) else
                                   tuple(t.to("meta") for t in a) for a in args]).shape
        if s.needs_grad:
            grad_out = torch.randn(out_shape, generator=g, dtype=s.dtype)
        r0 = _reset()
        if s.needs_grad:
            with torch.enable_grad():
                out = implementation(*args)
                grads = torch.autograd.grad(out, targets, grad_out)
                grads = tuple(gr if gr.stride() == t.stride() else torch.empty_like(t).copy_(gr)
                              for gr, t in zip(grads, targets, strict=True))
        else:
            with torch.no_grad():
                out = implementation(*args)
        peak = _page_kb("VmHWM:") * 1024 - r0
        del out
        grads = ()
    return {"op": op, "impl": impl, "dims": dims, "grad": grad, "layout": layout or {}, "dtype": dtype,
            "estimate": memory.footprint(spec, sig, impl), "workspace": implementation.extra_memory(sig),
            "peak": peak}


def run_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case in its own process (fixed mmap threshold, the worktree's grouped_ops)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=THRESHOLD, OMP_NUM_THREADS="1")
    results = []
    for case in cases:
        code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                "from workspace_check import measure_case; "
                "print(json.dumps(measure_case(**json.loads(sys.argv[1]))))")
        out = subprocess.run([sys.executable, "-c", code, json.dumps(case)], env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        results.append(json.loads(out.splitlines()[-1]))
    return results


GL_SHAPES = [(1, 256, 64, 64), (8, 128, 64, 64), (128, 32, 32, 32), (16, 64, 256, 256), (512, 8, 1024, 1024),
             (4096, 16, 256, 256)]
WC_SHAPES = [(64, 8, 4096), (1024, 4, 1024), (16, 4, 65536)]


def _has_grouped_mm() -> bool:
    import torch

    from grouped_ops.ops import SPECS
    from grouped_ops.signature import Signature

    sig = Signature("grouped_linear", (("batch", 8), ("n", 2), ("in", 8), ("out", 8)), torch.float32,
                    torch.device("cpu"), (("input", "contiguous"), ("weight", "contiguous"), ("bias", "yes")), ())
    return SPECS["grouped_linear"].registry["grouped_mm"].supports(sig)


def cases(quick: bool = False) -> list[dict[str, Any]]:
    from grouped_ops.ops import SPECS

    out: list[dict[str, Any]] = []
    gl = GL_SHAPES[3:] if quick else GL_SHAPES
    for b, n, i, o in gl:
        for grad in (False, True):
            for impl in SPECS["grouped_linear"].registry:
                if impl == "grouped_mm" and not _has_grouped_mm():
                    continue
                if impl == "masked_dense" and n * n * i * o * 4 > 2**29:
                    continue
                out.append({"op": "grouped_linear", "impl": impl, "dims": {"batch": b, "n": n, "in": i, "out": o},
                            "grad": grad})
    for b, k, f in WC_SHAPES[:1] if quick else WC_SHAPES:
        for grad in (False, True):
            for kind in ("stacked", "list"):
                for impl in SPECS["weighted_combine"].registry:
                    out.append({"op": "weighted_combine", "impl": impl, "dims": {"batch": b, "k": k, "features": f},
                                "grad": grad, "layout": {"inputs": kind}})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    results = []
    for case in cases(args.quick):
        (r,) = run_cases([case])
        results.append(r)
        ratio = r["peak"] / max(r["estimate"], 1)
        print(f"{r['op']:<16} {r['impl']:<16} {'grad' if r['grad'] else 'fwd ':<4} {json.dumps(r['dims']):<48} "
              f"{json.dumps(r['layout']):<22} est {r['estimate'] / 2**20:9.2f} MB  peak {r['peak'] / 2**20:9.2f} MB  "
              f"x{ratio:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
