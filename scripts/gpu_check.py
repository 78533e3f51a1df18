"""One GPU validation run (issue 14): ``python3 scripts/gpu_check.py OUTDIR [--dry-run] [--budget S]``.

Runs each step of scripts/gpu_check_steps.py in its own process with its own time box, and after
every step rewrites OUTDIR/report.md and OUTDIR/results.json, so a step that hangs or a call that
runs out of time still leaves the earlier results. The `gpu`-marked tests run as a step of their
own (log in OUTDIR/gpu_tests.log). ``--dry-run``: every step on CPU with tiny sizes (CI runs this).

Files written (at most 8, for the device tool): report.md, results.json, steps.log, gpu_tests.log,
<device>-table.json (the tuned table, by the tune_table step).
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# (step, seconds on an H100/H200, seconds in a dry run): each step's time box. Each column adds up
# to its budget less RESERVE_S (525 of 530 s on the GPU, 285 of 290 s dry), so every step fits;
# a smaller --budget leaves steps out, in LEAVE_OUT order, and the report says which and why.
STEPS = [
    ("env", 20, 10),
    ("gpu_tests", 120, 32),
    ("grouped_mm_probe", 55, 55),
    ("autocast", 20, 17),
    ("timer_check", 30, 12),
    ("sync_debug", 25, 26),
    ("cuda_graph", 20, 15),
    ("compile_ro", 65, 31),
    ("oom", 30, 15),  # + the workspace estimates against max_memory_allocated (CUDA only)
    ("ragged", 45, 28),
    ("bench", 45, 30),
    ("tune_table", 50, 14),
]
# the least needed first: a table and timings can be redone; correctness checks cannot be skipped
LEAVE_OUT = ("tune_table", "bench", "timer_check", "compile_ro", "grouped_mm_probe", "oom", "autocast",
             "sync_debug", "cuda_graph", "ragged", "gpu_tests", "env")
RESERVE_S = 5  # for the last report


def plan(steps: list[tuple[str, float]], budget: float) -> tuple[list[tuple[str, float]], dict[str, str]]:
    """The steps whose boxes fit in ``budget`` (less RESERVE_S), and why each other one is left out."""
    kept, left_out = list(steps), {}
    for name in LEAVE_OUT:
        total = sum(box for _, box in kept)
        if total <= budget - RESERVE_S:
            break
        if any(n == name for n, _ in kept):
            kept = [(n, b) for n, b in kept if n != name]
            left_out[name] = (f"left out: the time boxes add up to {total:.0f} s, over the {budget - RESERVE_S:.0f} s "
                              f"this budget leaves; {name} is the least needed of those left (order: {', '.join(LEAVE_OUT)})")
    return kept, left_out


def run_step(name: str, box: float, out: Path, dry: bool, log: Any) -> dict[str, Any]:
    """Run one step in a child process, killed at ``box`` seconds; its result or what it left."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1", "GPU_CHECK_END": str(time.time() + box - 8)}
    if name == "gpu_tests":
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "--no-header", "-p", "no:cacheprovider",
               str(REPO / "tests")]
    else:
        cmd = [sys.executable, str(REPO / "scripts" / "gpu_check_steps.py"), name, str(out)]
        cmd += ["--dry-run"] if dry else []
    start = time.monotonic()
    log.write(f"\n===== {name} (time box {box:.0f} s): {' '.join(cmd)}\n")
    log.flush()
    target = open(out / "gpu_tests.log", "w") if name == "gpu_tests" else log  # noqa: SIM115
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=box)
        text, status = proc.stdout, ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or ""
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        status = f"timed out after {box:.0f} s"
    finally:
        wall = time.monotonic() - start
    target.write(text)
    target.flush()
    if target is not log:
        target.close()
    result: dict[str, Any] = {"status": status, "wall_s": round(wall, 1)}
    if name == "gpu_tests":
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        result.update(summary=[tail[0]], problems=[] if status == "ok" else [f"pytest: {tail[0]}"],
                      data={"log": "gpu_tests.log"})
        if dry and "no tests ran" in tail[0]:  # exit code 5: every gpu test deselected/skipped
            result["status"] = "ok"
        return result
    marker = [line for line in text.splitlines() if line.startswith("@@RESULT ")]
    partial = out / f".partial-{name}.json"
    if marker:
        result.update(json.loads(marker[-1][len("@@RESULT "):]))
    elif partial.exists():
        result.update(json.loads(partial.read_text()))
        result.setdefault("problems", []).append(f"{name} {status}: partial results only")
    else:
        result.update(summary=[], problems=[f"{name} {status}: no results"], data={"tail": text[-2000:]})
    if partial.exists():
        partial.unlink()
    return result


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "steps": results}, indent=1, default=str))
    lines = [f"# GPU check {'(dry run, CPU)' if meta['dry_run'] else ''}", "",
             f"Started {meta['started']}, {meta['elapsed_s']:.0f} s so far of a {meta['budget_s']:.0f} s budget. "
             f"Commit {meta['commit']}.", "", "| step | status | wall s | problems |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r['wall_s']} | {len(r.get('problems', []))} |")
    for name, r in results.items():
        lines += ["", f"## {name}", ""]
        lines += [f"- {s}" for s in r.get("summary", [])] or ["- (no summary)"]
        lines += [f"- **problem**: {p}" for p in r.get("problems", [])]
    lines += ["", "Full data: results.json; step output: steps.log; the gpu-marked tests: gpu_tests.log.", ""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU validation run; see docs/gpu.md")
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny sizes")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default 530, dry run 290)")
    p.add_argument("--only", help="comma-separated steps to run")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (290.0 if args.dry_run else 530.0)
    start = time.monotonic()
    try:  # the device machine's copy of the tree may have no .git, or no git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    meta = {"dry_run": args.dry_run, "budget_s": budget, "commit": commit, "elapsed_s": 0.0,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results: dict[str, Any] = {}
    only = set(args.only.split(",")) if args.only else None
    # hermetic: a private cache and no shipped tables, so every first call really is one
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    (scratch / "shipped").mkdir()
    os.environ.update(GROUPED_OPS_CACHE_DIR=str(scratch / "cache"), GROUPED_OPS_SHIPPED_DIR=str(scratch / "shipped"))
    selected = [(name, dry_s if args.dry_run else gpu_s) for name, gpu_s, dry_s in STEPS
                if only is None or name in only]
    kept, left_out = plan(selected, budget)
    with open(args.out / "steps.log", "a", encoding="utf-8") as log:
        for name, box in selected:
            if name in left_out:
                results[name] = {"status": left_out[name], "wall_s": 0, "summary": [], "problems": []}
            else:
                left = budget - (time.monotonic() - start) - RESERVE_S
                if left < 5:
                    results[name] = {"status": "skipped: out of time", "wall_s": 0, "summary": [], "problems": []}
                else:
                    results[name] = run_step(name, min(box, left), args.out, args.dry_run, log)
            meta["elapsed_s"] = time.monotonic() - start
            write_report(args.out, results, meta)
            print(f"{name}: {results[name]['status']} ({results[name]['wall_s']} s)", flush=True)
    problems = sum(len(r.get("problems", [])) for r in results.values())
    print(f"report: {args.out / 'report.md'} ({problems} problems, {meta['elapsed_s']:.0f} s)")
    failed = [n for n, r in results.items() if r["status"] != "ok" and not r["status"].startswith("left out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
