"""A first call's memory: `auto`'s first-call peak RSS against the leanest implementation's (CPU).

For each cell of the grid (grouped_linear batch, groups, in, out; forward, and a training step:
weight and bias need gradients, ``y.backward(g)`` with a dense ``g``), every measurement runs in a
process of its own with one torch thread, an empty user cache (``GROUPED_OPS_CACHE_DIR``, a new
temporary folder) and no shipped tables (``GROUPED_OPS_SHIPPED_DIR``, an empty folder): the call's
peak resident set over the resident set just before it (``/proc/self/clear_refs`` resets the peak).
Measured: ``impl="auto"``'s first call (which tunes), and each implementation forced; the leanest is
the smallest of those. The check of issue 26:

    auto's peak <= 2 x the leanest's peak + the call's operands and result (+ gradients) + 32 MB

With ``--baseline DIR`` (a checkout of an older grouped_ops, e.g. commit c6e1ad2) the old code's
first call is measured in the same run, interleaved cell by cell, and the two picks are timed
against each other in one process (median of 15 paired rounds).

``--near-limit`` instead runs the near-limit case: batch 393216, 16 groups, 64 -> 64, forward,
in a process whose address space (RLIMIT_AS) is its size before the call plus 2x the call's plain
working set (its result); the first ``auto`` call must complete with no candidate failing, and a
second process under the same limit must not tune again.

    python3 scripts/first_call_memory.py [--baseline DIR] [--markdown OUT.md] [--json OUT.json] [--plot OUT.png]
    python3 scripts/first_call_memory.py --near-limit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

GRID = [(1, 256, 64, 64), (8, 128, 64, 64), (128, 32, 32, 32), (16, 64, 256, 256), (512, 8, 1024, 1024),
        (4096, 16, 256, 256)]
IMPLS = ["bmm", "bmm_weight_left", "einsum", "grouped_mm", "loop", "masked_dense"]
MB = 2**20

# Both child programs build the cell's inputs the same way (argv[1]: the cell, then their own fields)
INPUTS = r"""
import json, os, resource, statistics, sys, time
import torch
torch.set_num_threads(1)
import grouped_ops as go
batch, n, inn, out, train, *rest = json.loads(sys.argv[1])
a = torch.randn(2, 3, 4); a @ a.transpose(1, 2)  # torch's own first-matmul setup is not the call's
g = torch.Generator().manual_seed(0)
x = torch.randn(batch, n, inn, generator=g)
w = torch.randn(n, out, inn, generator=g).requires_grad_(train)
b = torch.randn(n, out, generator=g).requires_grad_(train)
grad = torch.randn(batch, n, out, generator=g) if train else None
"""

PROBE = INPUTS + r"""
(impl,) = rest

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

if "limit" in os.environ:  # the near-limit case: the address space now plus the allowance
    size = rss("VmSize:")
    resource.setrlimit(resource.RLIMIT_AS, (size + int(os.environ["limit"]), resource.RLIM_INFINITY))
open("/proc/self/clear_refs", "w").write("5")
r0 = rss("VmRSS:")
t0 = time.perf_counter()
try:
    if train:
        go.grouped_linear(x, w, b, impl=impl).backward(grad)
    else:
        with torch.no_grad():
            go.grouped_linear(x, w, b, impl=impl)
    error = ""
except Exception as e:  # noqa: BLE001 - reported
    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
seconds = time.perf_counter() - t0
peak = rss("VmHWM:") - r0
d = None
if impl == "auto" and not error:
    with torch.no_grad() if not train else torch.enable_grad():
        d = go.lookup("grouped_linear", x, w, b)
print(json.dumps({"peak": peak, "seconds": seconds, "error": error,
                  "pick": d.impl if d else impl, "source": d.source if d else "",
                  "partial": getattr(d, "partial", "") if d else "",
                  "failed": sorted(k for k, v in (d.skipped.items() if d else ()) if v.startswith("raised"))}))
"""

PAIR = INPUTS + r"""
a, b2 = rest

def step(impl):
    if train:
        w.grad = b.grad = None
        go.grouped_linear(x, w, b, impl=impl).backward(grad)
    else:
        with torch.no_grad():
            go.grouped_linear(x, w, b, impl=impl)

def sample(impl):
    t0 = time.perf_counter(); calls = 0
    while calls < 3 or time.perf_counter() - t0 < 0.02:
        step(impl); calls += 1
    return (time.perf_counter() - t0) / calls

for impl in (a, b2):
    step(impl)
ratios = []
for i in range(15):
    first, second = (a, b2) if i % 2 else (b2, a)
    t = {first: sample(first), second: sample(second)}
    ratios.append(t[b2] / t[a])
print(json.dumps({"ratio": statistics.median(ratios)}))
"""


def probe(cell: tuple[int, int, int, int], train: bool, impl: str, path: str, extra_env: dict[str, str] | None = None,
          cache: str | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", GROUPED_OPS_SHIPPED_DIR=tempfile.mkdtemp(),
               GROUPED_OPS_CACHE_DIR=cache or tempfile.mkdtemp(), **(extra_env or {}))
    # run from an empty folder: `python -c` puts the working directory first on sys.path, ahead of
    # PYTHONPATH, so a checkout there would be imported instead of `path`
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([*cell, train, impl])], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tempfile.mkdtemp())
    if proc.returncode != 0:
        return {"peak": float("nan"), "seconds": float("nan"), "error": proc.stderr.strip().splitlines()[-1][:200],
                "pick": "", "source": "", "partial": "", "failed": []}
    return json.loads(proc.stdout.splitlines()[-1])


def paired(cell: tuple[int, int, int, int], train: bool, a: str, b: str, path: str) -> float:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", GROUPED_OPS_AUTOTUNE="0")
    out = subprocess.run([sys.executable, "-c", PAIR, json.dumps([*cell, train, a, b])], env=env, check=True,
                         capture_output=True, text=True, timeout=900, cwd=tempfile.mkdtemp()).stdout
    return float(json.loads(out.splitlines()[-1])["ratio"])


def own_bytes(cell: tuple[int, int, int, int], train: bool) -> int:
    batch, n, inn, out = cell
    x, w, b, y = batch * n * inn * 4, n * out * inn * 4, n * out * 4, batch * n * out * 4
    return x + w + b + y + ((w + b + y) if train else 0)  # training: the gradients and the incoming one


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for cell in GRID:
        for train in (False, True):
            row: dict[str, Any] = {"cell": cell, "train": train, "impls": {}}
            for impl in IMPLS:
                row["impls"][impl] = probe(cell, train, impl, here)
            row["auto"] = probe(cell, train, "auto", here)
            if args.baseline:
                row["before"] = probe(cell, train, "auto", args.baseline)
                if row["before"]["pick"] not in IMPLS:  # removed since (bmm_strided_out): no paired timing
                    row["after_over_before"] = None
                elif row["before"]["pick"] and row["auto"]["pick"] and row["before"]["pick"] != row["auto"]["pick"]:
                    row["after_over_before"] = paired(cell, train, row["before"]["pick"], row["auto"]["pick"], here)
                else:
                    row["after_over_before"] = 1.0
            ok = {k: v["peak"] for k, v in row["impls"].items() if not v["error"]}
            row["leanest"] = min(ok, key=ok.__getitem__)
            row["allowed"] = 2 * ok[row["leanest"]] + own_bytes(cell, train) + 32 * MB
            row["pass"] = row["auto"]["peak"] <= row["allowed"] and not row["auto"]["error"]
            rows.append(row)
            print(line(row), flush=True)
    return rows


def line(row: dict[str, Any]) -> str:
    batch, n, inn, out = row["cell"]
    a = row["auto"]
    text = (f"| {batch} | {n} | {inn}->{out} | {'training' if row['train'] else 'forward'} | "
            f"{row['leanest']} {row['impls'][row['leanest']]['peak'] / MB:.1f} | {a['peak'] / MB:.1f} | "
            f"{row['allowed'] / MB:.1f} | {'yes' if row['pass'] else '**no**'} | {a['pick']} | {a['seconds']:.2f}")
    if "before" in row:
        bfr = row["before"]
        text += (f" | {bfr['peak'] / MB:.1f} | {bfr['pick']} | {bfr['seconds']:.2f} | "
                 + ("removed since" if row["after_over_before"] is None else f"{row['after_over_before']:.3f}"))
    return text + " |"


HEADER = ("| batch | groups | in->out | pass | leanest, peak MB | auto first call, peak MB | allowed MB | within | "
          "auto's pick | first call s |")
BEFORE = " before: peak MB | before: pick | before: first call s | after's pick / before's pick, time |"


def near_limit(baseline: str | None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cell = (393216, 16, 64, 64)
    working = cell[0] * cell[1] * cell[3] * 4  # one plain baddbmm: its result
    env = {"limit": str(2 * working)}
    runs = []
    for label, path in (("before", baseline), ("", here)):
        if path is None:
            continue
        cache = tempfile.mkdtemp()
        runs += [(f"{label} first process".strip(), probe(cell, False, "auto", path, env, cache)),
                 (f"{label} second process".strip(), probe(cell, False, "auto", path, env, cache))]
    first, second = runs[-2][1], runs[-1][1]
    print(f"near-limit: batch {cell[0]}, {cell[1]} groups, {cell[2]}->{cell[3]}, forward; RLIMIT_AS = size before "
          f"the call + {2 * working / 2**30:.2f} GiB (2x the plain working set); load {_load()}")
    for name, r in runs:
        print(f"  {name}: pick {r['pick']} ({r['source']}), partial {r['partial']!r}, failed candidates "
              f"{r['failed'] or 'none'}, error {r['error'] or 'none'}, {r['seconds']:.2f} s, peak +{r['peak'] / MB:.0f} MB")
    ok = not first["error"] and not first["failed"] and not second["error"] and second["source"] == "cache"
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="a checkout of older grouped_ops code to measure side by side")
    p.add_argument("--markdown")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--near-limit", action="store_true")
    args = p.parse_args()
    if args.near_limit:
        return near_limit(args.baseline)
    load = _load()
    print(HEADER + (BEFORE if args.baseline else ""))
    started = time.time()
    rows = grid(args)
    print(f"load average at the end: {_load()} (start {load}); "
          f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(HEADER + (BEFORE if args.baseline else "") + "\n")
            f.write("|---" * (HEADER.count("|") - 1 + (BEFORE.count("|") if args.baseline else 0)) + "|\n")
            f.write("\n".join(line(r) for r in rows) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(r["pass"] for r in rows) else 1


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['cell'][0]}x{r['cell'][1]}\n{r['cell'][2]}->{r['cell'][3]}\n{'train' if r['train'] else 'fwd'}"
              for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    width = 0.27
    ax.bar([i - width for i in xs], [r["impls"][r["leanest"]]["peak"] / MB for r in rows], width, label="leanest impl")
    ax.bar(list(xs), [r["auto"]["peak"] / MB for r in rows], width, label="auto, first call")
    if any("before" in r for r in rows):
        ax.bar([i + width for i in xs], [r["before"]["peak"] / MB if "before" in r else 0 for r in rows], width,
               label="auto, first call, before (c6e1ad2)")
    ax.plot(list(xs), [r["allowed"] / MB for r in rows], "k_", markersize=18, label="allowed")
    ax.set_yscale("log")
    ax.set_ylabel("peak RSS over the RSS before the call (MB)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_title("grouped_linear, CPU, 1 thread: first call's peak memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
