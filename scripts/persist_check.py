"""Does what processes prewarm reach the disk, and is each signature tuned once on the host?

P processes start together (a server's workers, a job's ranks) and, once all have imported
grouped_ops (``--staggered``: after 1 s, while the later ones may still import torch), each
prewarms K grouped_linear signatures (``--same``: all the same K; else distinct ones) with a
private user cache and no shipped tables, as a new user would; then a new process looks every
signature up. Prints how many it found, how many entries are marked partial (measured under noise),
and how many tunings the host ran (each process reports the decisions it tuned itself).

    python3 scripts/persist_check.py --processes 1 --per 40           # one process, 40 signatures
    python3 scripts/persist_check.py --processes 8 --per 5            # 8 x 5 distinct
    python3 scripts/persist_check.py --processes 8 --per 5 --same     # 8 x the same 5

The signatures are those of ../shared/cases/prewarm_persists.py: batch 4-256, 4-64 groups,
inference and training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIGS = """
import torch
sigs = []
for B in (4, 16, 64, 256):
    for g, i, o in ((8, 32, 32), (16, 64, 64), (4, 128, 256), (32, 16, 16), (64, 8, 8)):
        for grad in (False, True):
            sigs.append((torch.randn(B, g, i, requires_grad=grad), torch.randn(g, o, i, requires_grad=grad),
                         torch.randn(g, o, requires_grad=grad)))
"""
PREWARM = SIGS + """
import json, os, sys, time
import grouped_ops
first, count, start = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
open(f"{start}.ready-{os.getpid()}", "w").close()  # imported: torch's import is not part of the prewarm
while not os.path.exists(start):
    time.sleep(0.01)
t0 = time.perf_counter()
out = [grouped_ops.prewarm("grouped_linear", *args) for args in sigs[first:first + count]]
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "tuned": [d.signature.key() for d in out if d.source == "tuned"],
                  "not_stored": [d.not_stored for d in out if d.not_stored]}))
"""
LOOKUP = SIGS + """
import grouped_ops
print(sum(grouped_ops.lookup("grouped_linear", *args) is not None for args in sigs))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--per", type=int, default=5)
    p.add_argument("--same", action="store_true")
    p.add_argument("--staggered", action="store_true",
                   help="start prewarming 1 s after launch, not once every process has imported")
    a = p.parse_args()
    cache, start = tempfile.mkdtemp(), Path(tempfile.mkdtemp()) / "start"
    env = dict(os.environ, GROUPED_OPS_CACHE_DIR=cache, GROUPED_OPS_SHIPPED_DIR=tempfile.mkdtemp())
    load = Path("/proc/loadavg").read_text().split()[0]
    procs = [subprocess.Popen([sys.executable, "-c", PREWARM, str(0 if a.same else i * a.per), str(a.per), str(start)],
                              env=env, stdout=subprocess.PIPE, text=True) for i in range(a.processes)]
    if a.staggered:
        time.sleep(1.0)  # the later processes still import torch while the first ones tune
    else:
        deadline = time.monotonic() + 120
        while len(list(start.parent.glob("start.ready-*"))) < a.processes and time.monotonic() < deadline:
            time.sleep(0.01)
    start.write_text("")
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, "a prewarming process failed"
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wanted = a.per if a.same else a.per * a.processes
    sigs_code = LOOKUP.replace("for args in sigs)", f"for args in sigs[:{wanted}])")
    found = int(subprocess.run([sys.executable, "-c", sigs_code], env=env, check=True, capture_output=True,
                               text=True, timeout=600).stdout.split()[-1])
    entries = [json.loads(f.read_text()) for f in (Path(cache) / "v3").glob("*.json")]
    tuned = [k for r in reports for k in r["tuned"]]
    print(f"{a.processes} process(es) x {a.per} {'same' if a.same else 'distinct'} signatures"
          f"{', staggered' if a.staggered else ''}, load {load} at the start")
    print(f"found by a new process: {found} of {wanted}")
    print(f"entries marked partial: {sum(1 for e in entries if e.get('partial'))} "
          f"(tunings per entry: {sorted(e['tunings'] for e in entries)})")
    print(f"tunings on the host: {len(tuned)} ({len(set(tuned))} signatures)")
    print(f"slowest process: {max(r['seconds'] for r in reports):.1f} s; not stored: "
          f"{sum(len(r['not_stored']) for r in reports)}")


if __name__ == "__main__":
    main()
