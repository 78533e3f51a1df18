"""Would a larger tuning budget make the tuner's pick more repeatable?

For the close cells of a bench --json run (the two fastest implementations within 10%), tune each
signature several times from an empty cache with the default budget and with a 3x larger one
(alternated, so both see the same machine), and report how often the most common pick came up.

    python3 scripts/pick_stability.py docs/benchmarks/auto-check.json [--cells 12] [--repeats 6]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile

import torch

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.tuning import store

os.environ.setdefault("GROUPED_OPS_CACHE_DIR", tempfile.mkdtemp())
BUDGETS = {"default (0.3 s, 25 samples)": ("0.3", "25"), "larger (1 s, 100 samples)": ("1.0", "100")}


def main() -> None:
    from auto_check import _name, inputs  # the same cells and inputs as the auto check

    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--cells", type=int, default=12)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with open(a.json, encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    close = []
    for c in cells:
        t = sorted(r["median_s"] for r in c["results"].values() if r.get("kind") == "impl" and r.get("status") == "ok")
        if len(t) > 1 and t[1] / t[0] < 1.10:
            close.append(c)
    close = close[::max(1, len(close) // a.cells)][:a.cells]
    shares: dict[str, list[float]] = collections.defaultdict(list)
    for cell in close:
        args = inputs(cell, torch.Generator().manual_seed(0))
        picks: dict[str, list[str]] = {name: [] for name in BUDGETS}
        for _ in range(a.repeats):
            for name, (budget, reps) in BUDGETS.items():  # alternated: both see the same machine
                os.environ["GROUPED_OPS_TUNE_BUDGET_S"], os.environ["GROUPED_OPS_TUNE_REPS"] = budget, reps
                dispatch.clear_memory()
                shutil.rmtree(store.cache_dir(), ignore_errors=True)
                with torch.set_grad_enabled(cell["pass"] == "fwdbwd"):
                    picks[name].append(grouped_ops.prewarm(cell["op"], *args).impl)
        for name, p_ in picks.items():
            shares[name].append(collections.Counter(p_).most_common(1)[0][1] / len(p_))
        print(f"{_name(cell)}: " + " | ".join(f"{n.split(' (')[0]} {dict(collections.Counter(p_))}"
                                               for n, p_ in picks.items()), flush=True)
    print(f"\ntorch {torch.__version__}, {a.threads} thread(s), {len(close)} close cells x {a.repeats} tunings each")
    for name, s in shares.items():
        print(f"{name}: the most common pick came up in {sum(s) / len(s):.1%} of tunings; "
              f"{sum(x < 1 for x in s)} of {len(s)} cells had another pick at least once")


if __name__ == "__main__":
    main()
