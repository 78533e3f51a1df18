"""Running the sweep: plan, estimate, measure, report; the environment it runs in."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import dispatch
from .._version import __version__
from ..signature import device_name
from ..tuning.settings import settings as tuning_settings
from .cells import Cell, Env, Result, _dname, _fmt_t, _gib
from .grids import (
    _SEED_CELLS,
    CLAIMS,
    CUDA_EXTRA_DTYPES,
    GL,
    GRIDS,
    PASSES,
    SEED,
    WC,
    Grid,
    _square,
)
from .measurement import _free_memory, _measure, _measure_rates, _short
from .plots import _plot
from .reports import _Report
from .variants import _gl_estimate, _gl_variants, _wc_estimate, _wc_variants


def _plan(op: str, grid: Grid, args: argparse.Namespace, dtypes: list[torch.dtype],
          passes: list[str]) -> list[Cell]:
    cells = []
    if op == GL:
        if args.in_ and args.out:
            sizes = tuple((i, o) for i in args.in_ for o in args.out)
        elif args.in_ or args.out:
            sizes = _square(*(args.in_ or args.out))
        else:
            sizes = grid.sizes
        for dtype in dtypes:
            for pass_ in passes:
                for n in args.n or grid.n:
                    for inn, out in sizes:
                        for batch in args.batch or grid.batch:
                            cells.append(Cell(GL, dtype, pass_, {"batch": batch, "n": n, "in": inn, "out": out}))
    elif op == WC:
        for dtype in dtypes:
            for pass_ in passes:
                for shape in args.wc_shapes or grid.wc_shapes:
                    for layout in ("stacked", "list"):
                        for k in args.k or grid.k:
                            cells.append(Cell(WC, dtype, pass_, {"batch": shape[0], "k": k,
                                                                 "features": list(shape[1:]), "layout": layout}))
    else:
        for dtype in dtypes:
            for pass_ in passes:
                for claim, batch, n, size in _SEED_CELLS:
                    cells.append(Cell(SEED, dtype, pass_, {"batch": batch, "n": n, "in": size, "out": size},
                                      claim=claim))
    return cells


class _NoBar(list):
    """What the loop needs of a tqdm bar, for --no-progress or where tqdm is not installed."""

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(cells: list[Cell], hide: bool) -> Any:
    """A tqdm bar over ``cells`` on stderr; tqdm is imported only when a bar is shown."""
    if hide:
        return _NoBar(cells)
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(cells)
    return tqdm(cells, desc="bench", unit="cell", file=sys.stderr, dynamic_ncols=True)


def _estimate(cell: Cell, env: Env) -> None:
    d, itemsize = cell.dims, cell.dtype.itemsize
    if cell.op in (GL, SEED):
        est = _gl_estimate(d["batch"], d["n"], d["in"], d["out"], itemsize, cell.pass_)
    else:
        est = _wc_estimate(d["batch"], d["k"], math.prod(d["features"]), itemsize, cell.pass_)
    cell.flops, cell.bytes_moved, cell.mem_bytes = est
    cell.floor_s, cell.bound = env.floor(cell.dtype, cell.flops, cell.bytes_moved)
    if cell.op in (GL, SEED) and cell.bound == "memory" and d["n"] * d["in"] * d["out"] >= (d["batch"] * d["n"]
                                                                                           * (d["in"] + d["out"])):
        cell.bound = "weights"
    if cell.mem_bytes > env.mem_cap:
        cell.skipped = f"needs ~{_gib(cell.mem_bytes)}, over the {_gib(env.mem_cap)} memory cap"
    else:
        cell.skipped = env.too_big(cell.flops, cell)


def _run_cell(cell: Cell, env: Env) -> None:
    torch.manual_seed(env.seed)  # nn.Linear's init in the peers draws from the global RNG
    t0 = time.perf_counter()
    try:
        if cell.op == WC:
            variants = _wc_variants(cell, env)
        else:
            variants = _gl_variants(cell, env, with_dense=cell.op == SEED)
        if env.wanted is not None:
            variants = [v for v in variants if v.name in env.wanted]
        cell.kinds = {v.name: v.kind for v in variants}
        cell.results = _measure(variants, env, cell.pass_, cell.dtype)
    except Exception as e:  # e.g. OOM while making inputs: the cell is reported, the sweep goes on
        cell.skipped = f"error: {_short(e)}"
    finally:
        cell.elapsed_s = time.perf_counter() - t0
        if env.device.type == "cuda":
            torch.cuda.empty_cache()


def _machine(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds"),
        "command": _command_line(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grouped_ops": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "grid": args.grid,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _cpu_model() -> str:
    """The CPU model, as the tuner names CPUs (without the thread count it adds)."""
    return re.sub(r" x\d+$", "", device_name(torch.device("cpu")))


def _command_line() -> str:
    argv = list(sys.argv)
    first = Path(argv[0]) if argv else Path("")
    if first.name == "__main__.py" and first.parent.name == "grouped_ops":
        return shlex.join(["python", "-m", "grouped_ops", *argv[1:]])
    if first.name == "grouped-ops":
        return shlex.join(["grouped-ops", *argv[1:]])
    return shlex.join(["python", *argv])


@contextlib.contextmanager
def _bench_environment(args: argparse.Namespace) -> Iterator[None]:
    """A private tuning cache (unless --cache user), the tuning budget and threads; all restored."""
    saved = {k: os.environ.get(k) for k in ("GROUPED_OPS_CACHE_DIR", "GROUPED_OPS_TUNE_BUDGET_S")}
    threads = torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory(prefix="grouped_ops_bench_") if args.cache == "temp" else None
    try:
        if tmp is not None:
            os.environ["GROUPED_OPS_CACHE_DIR"] = tmp.name
            dispatch.clear_memory()
        if args.tune_budget is not None:
            os.environ["GROUPED_OPS_TUNE_BUDGET_S"] = str(args.tune_budget)
        if args.threads:
            torch.set_num_threads(args.threads)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)
        if tmp is not None:
            dispatch.clear_memory()  # decisions made against the temporary cache go with it
            tmp.cleanup()


def run(args: argparse.Namespace) -> int:
    """Run the sweep ``args`` describes (see :func:`configure_parser`); returns the exit status."""
    err = sys.stderr
    if args.peers:
        from .peers_report import from_bench  # noqa: PLC0415 - only this mode needs it

        return from_bench(args)
    grid = GRIDS[args.grid]
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"bench: bad --device {args.device!r}: {e}", file=err)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"bench: --device must be cpu or cuda, got {args.device!r}", file=err)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch.cuda.is_available() is False (a CPU-only torch build, or no GPU)",
              file=err)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("bench: --plot needs matplotlib; install it with: pip install 'grouped_ops[bench]' "
                  "(or pip install matplotlib)", file=err)
            return 2
    ops = [SEED if o == CLAIMS else o for o in (args.ops or ([SEED] if args.check_claims else grid.ops))]
    bad = [o for o in ops if o not in (GL, WC, SEED)]
    passes = list(args.passes or PASSES)
    bad += [p for p in passes if p not in PASSES]
    names = list(args.dtypes or (grid.dtypes + (CUDA_EXTRA_DTYPES if args.grid == "full" and device.type == "cuda" else ())))
    dtypes = []
    for name in names:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            dtypes.append(dtype)
        else:
            bad.append(name)
    if bad:
        print(f"bench: unknown op, pass or dtype {bad}; ops are {[GL, WC, CLAIMS]}, passes {list(PASSES)}, "
              "dtypes e.g. float32,bfloat16,float16", file=err)
        return 2

    if args.from_json:
        try:
            cells, machine, settings = _load(args.from_json)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"bench: cannot read --from-json {args.from_json}: {_short(e)}", file=err)
            return 2
        order = list(dict.fromkeys((c.op, c.dtype, c.pass_) for c in cells))
        report = _Report(cells, machine, settings, list(dict.fromkeys(o for o, _, _ in order)),
                         list(dict.fromkeys(d for _, d, _ in order)), list(dict.fromkeys(p for _, _, p in order)))
        return _emit(report, args)

    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with _bench_environment(args), torch.random.fork_rng(devices=rng_devices):  # the caller's RNG is untouched
        return _sweep(args, grid, device, ops, dtypes, passes)


BUSY_PER_CORE = 0.5  # a 1-minute load average above this per logical core counts as busy


def busy_warning(load: float, cores: int, threads: int) -> str | None:
    """What to tell the user when the load average says other work shares the CPU, or None.

    The load average counts runnable processes, so it is judged per logical core: 0.88 on an
    otherwise idle 2-core machine (this process importing torch, a shell) is 0.44 a core, not busy.
    """
    per_core = load / max(cores, 1)
    if per_core <= BUSY_PER_CORE:
        return None
    return (f"the machine is busy: the 1-minute load average was {load:.2f} before the sweep, on {cores} "
            f"logical cores ({per_core:.2f} per core; above {BUSY_PER_CORE} per core counts as busy). CPU "
            f"timings will be noisy, and with torch's {threads} threads competing for cores small calls can "
            "read 10-100x slow. Prefer a quiet machine (or --threads 1).")


def _sweep(args: argparse.Namespace, grid: Grid, device: torch.device, ops: list[str],
           dtypes: list[torch.dtype], passes: list[str]) -> int:
    err = sys.stderr
    machine = _machine(device, args)
    warning = busy_warning(machine.get("loadavg_start", [0.0])[0], os.cpu_count() or 1, torch.get_num_threads())
    if device.type == "cpu" and warning:
        print(f"bench: warning: {warning}", file=err)
    t_start = time.perf_counter()
    light = args.grid == "quick" or args.dry_run
    bandwidth, rates = _measure_rates(device, dtypes, light)
    env = Env(
        device=device,
        cell_time=args.cell_time if args.cell_time is not None else grid.cell_time[device.type],
        max_gflop=args.max_gflop if args.max_gflop is not None else grid.max_gflop[device.type],
        mem_cap=args.max_mem_gb * 2**30 if args.max_mem_gb else 0.5 * _free_memory(device),
        max_workspace=(args.max_workspace_gb if args.max_workspace_gb is not None
                       else grid.max_workspace_gb[device.type]) * 2**30,
        reps=max(1, args.reps), min_sample=args.min_sample_ms / 1e3, seed=args.seed,
        bandwidth=bandwidth, matmul=rates, wanted=tuple(args.variants) if args.variants else None,
    )
    machine["copy_GBps"] = round(bandwidth / 1e9, 2)
    machine["matmul_GFLOPs"] = {_dname(d): round(r / 1e9, 1) for d, r in rates.items()}
    settings = {"cell_time_s": env.cell_time, "max_gflop": env.max_gflop, "mem_cap_gib": round(env.mem_cap / 2**30, 2),
                "max_workspace_gib": None if math.isinf(env.max_workspace) else env.max_workspace / 2**30,
                "reps": env.reps, "min_sample_ms": args.min_sample_ms, "seed": env.seed, "cache": args.cache,
                "tune_budget_s": tuning_settings().budget_s}

    cells = [c for op in ops for c in _plan(op, grid, args, dtypes, passes)]
    for cell in cells:
        _estimate(cell, env)
    if args.dry_run:
        _print_plan(cells, env)
        return 0

    interrupted = False
    bar = _progress(cells, args.no_progress)
    try:
        for cell in bar:
            bar.set_postfix_str(f"{cell.op} {_dname(cell.dtype)} {cell.pass_} {cell.label}", refresh=False)
            if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                cell.skipped = cell.skipped or f"not reached within --time-limit {args.time_limit:g}s"
                continue
            if cell.skipped is None:
                _run_cell(cell, env)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; writing what was measured", file=err)
    finally:
        bar.close()
    machine["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    with contextlib.suppress(OSError, AttributeError):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    not_reached = sum(bool(c.skipped and c.skipped.startswith("not reached")) for c in cells)
    if not_reached:
        print(f"bench: --time-limit reached; {not_reached} cells were not run", file=err)
    report = _Report(cells, machine, settings, ops, dtypes, passes)
    status = _emit(report, args)
    return 130 if interrupted else status


def _emit(report: _Report, args: argparse.Namespace) -> int:
    """Print the tables and write every output asked for."""
    err, cells, machine = sys.stderr, report.cells, report.machine
    print(report.text())
    mismatches = [f"{c.op} {c.label} {n}: {r.status}" for c in cells for n, r in c.results.items()
                  if r.status.startswith("mismatch")]
    for line in mismatches:
        print(f"bench: WARNING {line}", file=err)
    plots: dict[tuple[str, str, str], Path] = {}
    if args.plot:
        plots = _plot(cells, Path(args.plot), machine)
    if args.markdown:
        _write(args.markdown, report.markdown(plots, Path(args.markdown).parent))
    if args.csv:
        _write(args.csv, report.csv())
    if args.json:
        _write(args.json, json.dumps(report.json(), indent=1, default=str) + "\n")
    for path in filter(None, (args.markdown, args.csv, args.json)):
        print(f"bench: wrote {path}", file=err)
    for path in plots.values():
        print(f"bench: wrote {path}", file=err)
    return 0


def _load(paths: Sequence[str]) -> tuple[list[Cell], dict[str, Any], dict[str, Any]]:
    """Cells, machine and settings of earlier --json outputs (several files are merged, in order)."""
    cells: list[Cell] = []
    machines, settings = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        machines.append(data["machine"])
        settings = settings or data.get("settings", {})
        for c in data["cells"]:
            results = {n: Result(**{k: r.get(k) for k in ("status", "median_s", "q1_s", "q3_s")},
                                 reps=r.get("reps", 0), number=r.get("number", 0))
                       for n, r in c["results"].items()}
            cells.append(Cell(
                c["op"], getattr(torch, c["dtype"]), c["pass"], c["dims"], claim=c.get("claim") or "",
                skipped=c.get("skipped"), results=results, kinds={n: r.get("kind") for n, r in c["results"].items()},
                auto_impl=c.get("auto_impl"), auto_source=c.get("auto_source"), tune_s=c.get("tune_s"),
                elapsed_s=c.get("elapsed_s"),
                flops=c.get("flops", 0.0), bytes_moved=c.get("bytes_moved", 0.0), mem_bytes=c.get("mem_bytes_est", 0.0),
                floor_s=c.get("floor_s"), bound=c.get("bound", "")))
    machine = dict(machines[0])
    if len(machines) > 1:
        machine["command"] = " ; ".join(dict.fromkeys(m["command"] for m in machines))
        machine["date"] = " .. ".join(dict.fromkeys(m["date"] for m in machines))
        machine["elapsed_s"] = round(sum(m.get("elapsed_s") or 0 for m in machines), 1)
        machine["merged_from"] = list(paths)
    return cells, machine, settings


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def _print_plan(cells: list[Cell], env: Env) -> None:
    run_n = sum(c.skipped is None for c in cells)
    print(f"{len(cells)} cells, {run_n} to run, {len(cells) - run_n} skipped; cap {env.cell_time:g}s of timing "
          f"per cell, at most {env.max_gflop:g} GFLOP per call, memory cap {_gib(env.mem_cap)}")
    for c in cells:
        print(f"  {c.op:<16} {_dname(c.dtype):<9} {c.pass_:<6} {c.label:<34} floor {_fmt_t(c.floor_s):>8} "
              f"{c.bound:<8} {'skipped: ' + c.skipped if c.skipped else ''}")
