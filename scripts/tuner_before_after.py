"""Choice quality and first-call cost of two versions of the tuner, side by side in one run.

Each round runs one fresh process per version (alternating which goes first), each with an empty
cache and no shipped tables, one torch thread. In it, per cell: the first call's cost (one
``prewarm``, which tunes; a throwaway signature first takes the one-off start-up costs), then every
implementation timed forced, 15 rounds of one sample of about 5 ms each, in a new order each
round; "auto vs fastest" is the largest over the other implementations of the median of the
per-round ratios of the pick's sample to theirs (paired: each round sees one moment of the machine).

    python3 scripts/tuner_before_after.py BEFORE_SRC AFTER_SRC [--rounds 2]

BEFORE_SRC and AFTER_SRC are folders holding a ``grouped_ops`` package (e.g. ``git archive c6e1ad2
grouped_ops tuning_cache | tar -x -C /tmp/before``, and this checkout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, random, statistics, sys, time, torch
import grouped_ops
torch.set_num_threads(1)
cells = []
for batch in (16, 128):
    for n, i, o in ((8, 32, 32), (32, 16, 16), (4, 128, 128)):
        for grad in (False, True):
            cells.append((batch, n, i, o, grad))
g = torch.Generator().manual_seed(0)

def make(batch, n, i, o, grad):
    return (torch.randn(batch, n, i, generator=g), torch.randn(n, o, i, generator=g).requires_grad_(grad),
            torch.randn(n, o, generator=g).requires_grad_(grad))

# one-off start-up costs, not a first call's: both modes (the first backward with a given gradient
# imports sympy, ~0.4 s)
grouped_ops.prewarm("grouped_linear", *make(3, 3, 8, 8, False))
grouped_ops.prewarm("grouped_linear", *make(3, 3, 8, 8, True))
out = []
shuffle = random.Random(0)
for batch, n, i, o, grad in cells:
    args = make(batch, n, i, o, grad)
    t0 = time.perf_counter()
    d = grouped_ops.prewarm("grouped_linear", *args)
    first = time.perf_counter() - t0

    def run(m):
        if grad:
            y = grouped_ops.grouped_linear(*args, impl=m)
            y.backward(torch.ones_like(y))
            for a in args:
                a.grad = None
        else:
            with torch.no_grad():
                grouped_ops.grouped_linear(*args, impl=m)
    ok = []
    for m in grouped_ops.implementations("grouped_linear"):
        try:
            run(m)
            ok.append(m)
        except Exception:
            pass
    number = {}
    for m in ok:
        t = time.perf_counter()
        run(m)
        number[m] = max(1, min(500, int(5e-3 / max(time.perf_counter() - t, 1e-7))))
    samples = {m: [] for m in ok}
    for _ in range(15):  # rounds: every implementation once, in a new order each round
        for m in shuffle.sample(ok, len(ok)):
            t = time.perf_counter()
            for _ in range(number[m]):
                run(m)
            samples[m].append((time.perf_counter() - t) / number[m])
    # paired: the pick against each other implementation, round by round (the same moment of a busy machine)
    paired = {m: statistics.median(p / q for p, q in zip(samples[d.impl], samples[m])) for m in ok}
    out.append({"cell": [batch, n, i, o, grad], "first_s": first, "impl": d.impl, "file": grouped_ops.__file__,
                "ratio": max(paired.values()), "fastest": min(paired, key=lambda m: 1 / paired[m]),
                "partial": getattr(d, "partial", ""), "stored": getattr(d, "stored", None)})
print(json.dumps(out))
'''


def run(src: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=src, GROUPED_OPS_CACHE_DIR=tempfile.mkdtemp(),
               GROUPED_OPS_SHIPPED_DIR=tempfile.mkdtemp(), OMP_NUM_THREADS="1")
    # cwd=src: `python -c` puts the working folder ahead of PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=1200,
                          check=True, cwd=src)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    results: dict[str, list[list[dict]]] = {"before": [], "after": []}
    loads = []
    for r in range(a.rounds):
        order = [("before", a.before), ("after", a.after)]
        for name, src in order if r % 2 == 0 else order[::-1]:
            loads.append(Path("/proc/loadavg").read_text().split()[0])
            results[name].append(run(src))
    print(f"load averages (1 min) before each process: {', '.join(loads)}")
    noisy = {name: sum(c["partial"] == "noise" for rr in runs for c in rr) for name, runs in results.items()}
    print(f"decisions marked noise: {noisy}")
    print("| version | rounds | cells | auto/fastest geomean | worst | median first call (s) | total first calls (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        ratios = [c["ratio"] for rr in runs for c in rr]
        firsts = [c["first_s"] for rr in runs for c in rr]
        geo = math.exp(statistics.mean(math.log(x) for x in ratios))
        totals = statistics.median(sum(c["first_s"] for c in rr) for rr in runs)
        print(f"| {name} | {len(runs)} | {len(ratios)} | {geo:.3f} | {max(ratios):.3f} | "
              f"{statistics.median(firsts):.3f} | {totals:.2f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
