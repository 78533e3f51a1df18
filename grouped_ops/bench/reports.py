"""The sweep's results as text, markdown, CSV and JSON tables."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..ops import SPECS
from .cells import Cell, _dname, _fmt_t
from .claims import _seed_ratio, _seed_verdicts
from .grids import BASELINE, GL, PASS_TITLE, PEERS, SEED

# ---- reporting -----------------------------------------------------------------------------------

def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


class _Report:
    def __init__(self, cells: list[Cell], machine: dict[str, Any], settings: dict[str, Any],
                 ops: list[str], dtypes: list[torch.dtype], passes: list[str]) -> None:
        self.cells, self.machine, self.settings = cells, machine, settings
        self.groups: list[tuple[str, torch.dtype, str, list[Cell]]] = []
        for op in ops:
            for dtype in dtypes:
                for pass_ in passes:
                    cs = [c for c in cells if c.op == op and c.dtype == dtype and c.pass_ == pass_]
                    if cs:
                        self.groups.append((op, dtype, pass_, cs))

    # -- tables as rows of strings
    def _columns(self, cells: list[Cell]) -> list[str]:
        names: dict[str, None] = {}
        for kind in ("impl", "auto", "peer"):
            for c in cells:
                names.update({n: None for n, k in c.kinds.items() if k == kind})
        if not names:  # every cell skipped: still show what would have been timed
            op = cells[0].op
            base = GL if op == SEED else op
            names = dict.fromkeys([*SPECS[base].registry, "auto", *PEERS[base], *(["dense"] if op == SEED else [])])
        return list(names)

    def _table(self, cells: list[Cell], md: bool) -> tuple[list[str], list[list[str]], list[str]]:
        op = cells[0].op
        cols = self._columns(cells)
        base = BASELINE[GL if op == SEED else op]
        keys = (["batch", "n", "in->out"] if op in (GL, SEED) else ["shape [b x k x f]", "inputs"])
        extra = ["auto picks", f"auto vs {base}", "auto/best", "fastest", "floor", "bound", "auto % of floor"]
        if op == SEED:
            extra = ["loop/masked_dense", "loop/dense", "auto picks"]
        header = keys + cols + extra
        rows, notes = [], {}
        for c in cells:
            d = c.dims
            lead = ([str(d["batch"]), str(d["n"]), f"{d['in']}->{d['out']}"] if op in (GL, SEED)
                    else ["x".join(str(v) for v in (d["batch"], d["k"], *d["features"])), d["layout"]])
            if c.skipped:
                rows.append(lead + [f"skipped: {c.skipped}"] + [""] * (len(header) - len(lead) - 1))
                continue
            fastest = c.fastest()
            times = []
            for name in cols:
                r = c.results.get(name)
                if r is None:
                    times.append("")
                elif r.ok:
                    text = (("\\~" if md else "~") if r.reps == 1 else "") + _fmt_t(r.median_s)
                    times.append(f"**{text}**" if md and name == fastest else text)
                else:
                    short = r.status.split(":", 1)[0]
                    times.append(short)
                    notes.setdefault(f"{name}: {r.status}", None)
            if op == SEED:
                tail = [_ratio(_seed_ratio(c, "masked_dense")), _ratio(_seed_ratio(c, "dense")), c.auto_impl or "-"]
            else:
                frac = c.floor_fraction()
                tail = [c.auto_impl or "-", _ratio(c.auto_vs_baseline()), _ratio(c.auto_over_best()),
                        fastest or "-", _fmt_t(c.floor_s), c.bound, "-" if frac is None else f"{100 * frac:.1f}%"]
            rows.append(lead + times + tail)
        return header, rows, list(notes)

    def _summary(self, cells: list[Cell]) -> list[str]:
        done = [c for c in cells if not c.skipped and c.time("auto")]
        if not done or cells[0].op == SEED:
            return []
        over = [(c.auto_over_best(), c) for c in done if c.auto_over_best()]
        base = [r for c in done if (r := c.auto_vs_baseline())]
        lines = [f"{len(done)} of {len(cells)} cells measured"]
        if over:
            worst = max(over, key=lambda p: p[0])
            lines.append(f"auto / fastest implementation: geometric mean {_geomean([o for o, _ in over]):.3f}, "
                         f"worst {worst[0]:.2f}x at {worst[1].label}")
        if base:
            lines.append(f"auto speed-up over {BASELINE[cells[0].op]}: geometric mean {_geomean(base):.2f}x, "
                         f"range {min(base):.2f}x .. {max(base):.2f}x")
        for bound in ("compute", "weights", "memory"):
            big = [f for c in done if c.bound == bound and (c.floor_s or 0) >= 50e-6 and (f := c.floor_fraction())]
            if big:
                lines.append(f"auto's fraction of the floor, {bound}-bound cells with floor >= 50us: geometric mean "
                             f"{100 * _geomean(big):.1f}% over {len(big)} cells (best {100 * max(big):.1f}%)")
        return lines

    def _header_lines(self) -> list[str]:
        m = self.machine
        return [
            f"device: {m['device']} | CPU: {m['cpu']} ({m['cpu_count']} logical cores, torch threads "
            f"{m['torch_threads']}) | torch {m['torch']} (CUDA {m['cuda']}) | grouped_ops {m['grouped_ops']} "
            f"| python {m['python']}",
            f"date: {m['date']} | load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')} "
            f"| elapsed {m.get('elapsed_s')} s",
            f"command: {m['command']}",
            f"measured here: copy {m['copy_GBps']} GB/s; matmul "
            + ", ".join(f"{k} {v} GFLOP/s" for k, v in m["matmul_GFLOPs"].items()),
            "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
        ]

    @staticmethod
    def _title(op: str, dtype: torch.dtype, pass_: str) -> str:
        name = "masked_dense claims check (grouped_linear)" if op == SEED else op
        return f"{name}, {_dname(dtype)}, {PASS_TITLE[pass_]}"

    def _verdict_groups(self) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
        return [(self._title(op, dt, p), _seed_verdicts(cs)) for op, dt, p, cs in self.groups if op == SEED]

    def text(self) -> str:
        out = ["grouped_ops bench", *self._header_lines(), ""]
        for op, dtype, pass_, cells in self.groups:
            header, rows, notes = self._table(cells, md=False)
            out.append(f"== {self._title(op, dtype, pass_)} (median time per call; lower is better)")
            nlead = 3 if op in (GL, SEED) else 2
            live = [r for r in rows if not r[nlead].startswith("skipped: ")]
            skipped = [r for r in rows if r[nlead].startswith("skipped: ")]
            widths = [max(len(h), *(len(r[i]) for r in live)) if live else len(h) for i, h in enumerate(header)]
            out.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
            out.extend("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in live)
            out.extend("  " + " ".join(r[:nlead]) + "  " + r[nlead] for r in skipped)
            out.extend(f"  note: {n}" for n in notes)
            out.extend(f"  {line}" for line in self._summary(cells))
            out.append("")
        for title, verdicts in self._verdict_groups():
            out.append(f"== masked_dense claims, verdicts: {title.split(', ', 1)[1]} (loop = nn.ModuleList, C = masked_dense, "
                       "A = one dense Linear(n*in, n*out))")
            for claim, said, got, verdict in verdicts:
                out.append(f"  {claim} [claimed: {said}]\n      measured: {got}\n      verdict: {verdict}")
            out.append("")
        return "\n".join(out)

    def markdown(self, plots: dict[tuple[str, str, str], Path], folder: Path) -> str:
        m = self.machine
        out = [f"# grouped_ops benchmarks: {m['device']}", ""]
        out += [f"- {line}" for line in self._header_lines()]
        out += ["", "Times are medians per call; **bold** is the fastest column of the row; \\~ marks a single "
                "sample (a column slow next to the cell's time cap). "
                "See docs/benchmarks/README.md for what each column means.", ""]
        for op, dtype, pass_, cells in self.groups:
            header, rows, notes = self._table(cells, md=True)
            out += [f"## {self._title(op, dtype, pass_)}", ""]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---:" if i >= (3 if op in (GL, SEED) else 2) else "---"
                                      for i in range(len(header))) + "|")
            out += ["| " + " | ".join(v.replace("|", "/") for v in r) + " |" for r in rows]
            out.append("")
            out += [f"- {n}" for n in notes]
            out += [f"- {line}" for line in self._summary(cells)]
            key = (op, _dname(dtype), pass_)
            if key in plots:
                rel = os.path.relpath(plots[key], folder)
                out += ["", f"![{self._title(op, dtype, pass_)}]({Path(rel).as_posix()})"]
            out.append("")
        for title, verdicts in self._verdict_groups():
            out += [f"## masked_dense claims, verdicts: {title.split(', ', 1)[1]}", "",
                    "loop = `nn.ModuleList` + `torch.stack`, C = `masked_dense`, "
                    "A = one dense `nn.Linear(n*in, n*out)`; ratios are loop time / other time.", "",
                    "| claim | claimed | measured | verdict |", "|---|---|---|---|"]
            out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in verdicts]
            out.append("")
        return "\n".join(out)

    def csv(self) -> str:
        import io

        buf = io.StringIO()
        for k, v in self.machine.items():
            buf.write(f"# {k}: {v}\n")
        buf.write("# settings: " + json.dumps(self.settings) + "\n")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["op", "dtype", "pass", "batch", "n", "in", "out", "k", "features", "inputs", "claim",
                    "variant", "kind", "status", "median_s", "q1_s", "q3_s", "reps", "calls_per_rep",
                    "auto_impl", "auto_source", "best_impl", "auto_vs_baseline", "auto_over_best",
                    "floor_s", "bound", "auto_floor_fraction"])
        for c in self.cells:
            d = c.dims
            lead = [c.op, _dname(c.dtype), c.pass_, d.get("batch"), d.get("n", ""), d.get("in", ""),
                    d.get("out", ""), d.get("k", ""), "x".join(map(str, d.get("features", []))),
                    d.get("layout", ""), c.claim]
            best = c.best_impl()
            tail = [c.auto_impl or "", c.auto_source or "", best[0] if best else "",
                    _num(c.auto_vs_baseline()), _num(c.auto_over_best()), _num(c.floor_s), c.bound,
                    _num(c.floor_fraction())]
            if c.skipped:
                w.writerow(lead + ["", "", f"skipped: {c.skipped}", "", "", "", 0, 0] + tail)
            for name, r in c.results.items():
                w.writerow(lead + [name, c.kinds.get(name, ""), r.status, _num(r.median_s), _num(r.q1_s),
                                   _num(r.q3_s), r.reps, r.number] + tail)
        return buf.getvalue()

    def json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "machine": self.machine,
            "settings": self.settings,
            "cells": [c.to_json() for c in self.cells],
            "summaries": {self._title(op, dt, p): self._summary(cs) for op, dt, p, cs in self.groups},
            "seed_verdicts": {title: [dict(zip(("claim", "seed", "measured", "verdict"), v, strict=True))
                                      for v in verdicts] for title, verdicts in self._verdict_groups()},
        }


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"
