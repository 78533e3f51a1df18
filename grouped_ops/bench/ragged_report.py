"""Reports of the ragged sweep (:mod:`.ragged`): text summary, markdown tables, JSON, one plot."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .cells import _dname, _fmt_t

PEERS = ("python loop", "F.grouped_mm")


def _geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _measured(cells: list[Any]) -> list[Any]:
    return [c for c in cells if not c.skipped and c.time("auto")]


def stats(cells: list[Any]) -> dict[str, Any]:
    """The acceptance numbers: auto over the fastest implementation (geomean, worst) and auto's
    speed-up over the faster of the two peers (geomean, lowest, cells below 1.0)."""
    done = _measured(cells)
    over = [r for c in done if (r := c.ratios()["auto_over_fastest"])]
    vs = [(r, c) for c in done if (r := c.ratios()["auto_vs_baseline"])]
    return {"cells": len(done), "auto_over_fastest_geomean": _geomean(over), "auto_over_fastest_worst": max(over, default=None),
            "auto_vs_baseline_geomean": _geomean([r for r, _ in vs]), "auto_vs_baseline_lowest": min((r for r, _ in vs), default=None),
            "below_1": [(c.label, _dname(c.dtype), c.pass_, round(r, 3), c.auto_impl, c.fastest(), why_below(c))
                        for r, c in sorted(vs, key=lambda rc: rc[0]) if r < 1.0]}


def why_below(c: Any) -> str:
    """Why auto is slower than the baseline in cell ``c``, from the cell's own columns."""
    auto, pick = c.time("auto"), c.auto_impl
    impls = {n: t for n, k in c.kinds.items() if k == "impl" and (t := c.time(n)) is not None}
    best = min(impls, key=impls.__getitem__) if impls else None
    peer = min((n for n in PEERS if c.time(n)), key=lambda n: c.time(n), default=None)
    forced = c.time(pick) if pick else None
    if forced and auto and auto > 1.3 * forced:
        return (f"auto ran {pick} but took {auto / forced:.2f}x its forced time in this cell (the same code): "
                + ("the weight gradients' fresh buffers (page faults) land on some variants and not others "
                   "as the interleaved calls free and take memory (docs/moe.md)" if c.pass_ == "fwdbwd"
                   else "timing noise"))
    if best and pick != best and impls[best] * 1.1 < (forced or math.inf):
        return (f"auto ran {pick}, {forced / impls[best]:.2f}x this cell's fastest implementation {best}: the "
                "pick was tuned on private offsets of the cell's class, not on the cell's own")
    if peer and best:
        same = (peer == "F.grouped_mm" and pick == "grouped_mm") or (peer == "python loop" and pick in ("loop", "padded_bmm"))
        if same and auto - c.time(peer) < 60e-6:
            return (f"auto ran the same kernels as {peer} ({pick}); the difference, {c.time(peer) * 1e6:.0f} vs "
                    f"{auto * 1e6:.0f} us, is our per-call cost (the lean road's key, the offsets' read and check; "
                    "about 7 us a forward call at T=16, and the gradient pre-hook's ~3 us in training)")
        if same:
            return (f"auto ran the same kernels as {peer} ({pick}) but took {auto / c.time(peer):.2f}x: more than "
                    "our per-call cost; " + ("in a training step our backward's own Python, or the weight "
                    "gradients' buffers (see above)" if c.pass_ == "fwdbwd" else "timing noise"))
        return (f"{peer} ({c.time(peer) * 1e6:.0f} us) beats every implementation here (fastest {best}, "
                f"{impls[best] * 1e6:.0f} us)")
    return "no implementation timed"


def skew_changes(cells: list[Any]) -> list[str]:
    """Shapes (T, E, widths, dtype, pass) whose fastest implementation differs between skew
    classes by more than 10%: the question whether a skew class belongs in the key."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(dict)
    for c in _measured(cells):
        groups[(c.tokens, c.experts, c.inn, c.out, _dname(c.dtype), c.pass_)][c.skew] = c
    lines = []
    for key, by_skew in groups.items():
        best = {}
        for skew, c in by_skew.items():
            impls = {n: t for n, k in c.kinds.items() if k == "impl" and (t := c.time(n)) is not None}
            if impls:
                best[skew] = min(impls, key=impls.__getitem__)
        if len(set(best.values())) < 2:
            continue
        # the cost of keeping the balanced winner on each skewed split
        costs = []
        for skew, c in by_skew.items():
            keep = best.get("balanced")
            if keep and c.time(keep) and skew in best and c.time(best[skew]):
                costs.append(f"{skew}: {best[skew]} ({c.time(keep) / c.time(best[skew]):.2f}x over {keep})")
        if any(float(s.split("(")[1].split("x")[0]) > 1.10 for s in costs):
            lines.append(f"T={key[0]} E={key[1]} {key[2]}->{key[3]} {key[4]} {key[5]}: " + "; ".join(costs))
    return lines


def summary(cells: list[Any]) -> str:
    s = stats(cells)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"ragged sweep: {s['cells']} cells measured",
             f"auto / fastest implementation: geomean {fmt(s['auto_over_fastest_geomean'])}, worst "
             f"{fmt(s['auto_over_fastest_worst'])}",
             f"auto vs the faster of python loop and F.grouped_mm: geomean {fmt(s['auto_vs_baseline_geomean'])}x, "
             f"lowest {fmt(s['auto_vs_baseline_lowest'])}x, {len(s['below_1'])} cells below 1.0"]
    changes = skew_changes(cells)
    lines.append(f"skew: the fastest implementation changes with the skew class by more than 10% in {len(changes)} "
                 f"of {len({(c.tokens, c.experts, c.inn, c.out, c.dtype, c.pass_) for c in _measured(cells)})} shapes")
    return "\n".join(lines + [f"  {line}" for line in changes])


def _columns(cells: list[Any]) -> list[str]:
    names: dict[str, None] = {}
    for c in cells:
        names.update(dict.fromkeys(n for n, k in c.kinds.items() if k == "impl"))
    return [*names, "auto", *PEERS]


def markdown(cells: list[Any], machine: dict[str, Any], plot_dir: Path | None, base: Path) -> str:
    cols = _columns(cells)
    s = stats(cells)
    lines = [f"# The ragged sweep: {machine.get('device')}", "",
             f"- command: `{machine.get('command')}`",
             f"- {machine.get('cpu')} ({machine.get('cpu_count')} logical cores, torch threads "
             f"{machine.get('torch_threads')}) | torch {machine.get('torch')} | grouped_ops {machine.get('grouped_ops')}",
             f"- date {machine.get('date')} | load average at start {machine.get('loadavg_start')}, at end "
             f"{machine.get('loadavg_end')} | elapsed {machine.get('elapsed_s')} s",
             f"- measured here: copy {machine.get('copy_GBps')} GB/s; matmul GFLOP/s {machine.get('matmul_GFLOPs')}", "",
             "Times are per call, the minimum of interleaved samples (other work on the machine only adds "
             "time; the medians are in the JSON). `auto` was prewarmed on the library's own private offsets of "
             "the cell's split class (docs/ragged.md) and is then called on the cell's. `python loop` (F.linear per expert) and `F.grouped_mm` are the user's code "
             "today; `vs baseline` is the faster of the two over auto. `floor` as docs/benchmarks/README.md "
             "defines it; `% floor` = floor / auto.", ""]
    if plot_dir is not None and (plot_dir / "ragged.png").exists():
        rel = (plot_dir / "ragged.png").resolve()
        with contextlib.suppress(ValueError):
            rel = rel.relative_to(base.resolve())
        lines += [f"![auto vs the baseline, per cell]({rel.as_posix()})", ""]
    lines += ["## Summary", ""] + [f"- {line.strip()}" for line in summary(cells).splitlines()] + [""]
    if s["below_1"]:
        lines += ["Cells where auto is slower than the baseline (label, dtype, pass, ratio, auto's pick, fastest, "
                  "why, read off the cell's own columns):", ""]
        lines += [f"- {row}" for row in s["below_1"]] + [""]
    for dtype, pass_ in dict.fromkeys((c.dtype, c.pass_) for c in cells):
        rows = [c for c in cells if (c.dtype, c.pass_) == (dtype, pass_)]
        lines += [f"## {_dname(dtype)}, {'forward' if pass_ == 'fwd' else 'forward + backward'}", "",
                  "| T | E | in->out | skew | " + " | ".join(cols) + " | auto picks | auto/fastest | vs baseline "
                  "| floor | % floor |", "|" + "---|" * (len(cols) + 9)]
        for c in rows:
            if c.skipped:
                lines.append(f"| {c.tokens} | {c.experts} | {c.inn}->{c.out} | {c.skew} | {c.skipped} |")
                continue
            fastest = c.fastest()
            cells_txt = []
            for n in cols:
                t = c.time(n)
                r = c.results.get(n)
                text = _fmt_t(t) if t is not None else ("-" if r is None else r.status.split(":")[0])
                cells_txt.append(f"**{text}**" if n == fastest else text)
            ratio = c.ratios()
            pct = f"{ratio['floor_share'] * 100:.0f}%" if ratio["floor_share"] else "-"
            lines.append(f"| {c.tokens} | {c.experts} | {c.inn}->{c.out} | {c.skew} | " + " | ".join(cells_txt)
                         + f" | {c.auto_impl} | {_r(ratio['auto_over_fastest'])} | {_r(ratio['auto_vs_baseline'])}x "
                         f"| {_fmt_t(c.floor_s)} | {pct} |")
        lines.append("")
    return "\n".join(lines)


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def to_json(cells: list[Any], machine: dict[str, Any]) -> dict[str, Any]:
    return {"machine": machine, "stats": stats(cells), "skew_changes": skew_changes(cells),
            "cells": [{"dtype": _dname(c.dtype), "pass": c.pass_, "T": c.tokens, "E": c.experts, "in": c.inn,
                       "out": c.out, "skew": c.skew, "skipped": c.skipped, "auto_impl": c.auto_impl,
                       "floor_s": c.floor_s, **c.ratios(),
                       "results": {n: {"kind": c.kinds.get(n), "status": r.status, "min_s": r.median_s,
                                       "median_s": c.medians.get(n), "samples": r.reps, "calls_per_sample": r.number}
                                   for n, r in c.results.items()}}
                      for c in cells]}


def plot(cells: list[Any], folder: Path) -> Path:
    """``folder/ragged.png``: auto's speed-up over the baseline and over each peer, per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys((c.dtype, c.pass_) for c in cells))
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 3.2 * len(keys)), squeeze=False)
    markers = {"balanced": "o", "half": "s", "all": "^"}
    for ax, (dtype, pass_) in zip(axes[:, 0], keys, strict=True):
        rows = [c for c in _measured(cells) if (c.dtype, c.pass_) == (dtype, pass_)]
        for i, c in enumerate(rows):
            auto = c.time("auto")
            for name, color in (("python loop", "tab:blue"), ("F.grouped_mm", "tab:orange")):
                t = c.time(name)
                if t and auto:
                    ax.scatter(i, t / auto, color=color, marker=markers.get(c.skew, "o"), s=22,
                               label=name if i == 0 else None)
            best = c.ratios()["auto_over_fastest"]
            if best:
                ax.scatter(i, 1 / best, color="tab:green", marker="_", s=60, label="fastest impl" if i == 0 else None)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{_dname(dtype)} {'forward' if pass_ == 'fwd' else 'forward + backward'}: time / auto's "
                     "(above 1: auto is faster); o balanced, s half, ^ all rows in one group", fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"T{c.tokens} E{c.experts} {c.inn}" for c in rows], rotation=90, fontsize=6)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = folder / "ragged.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
