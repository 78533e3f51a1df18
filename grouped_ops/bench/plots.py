"""PNG plots of the sweep (needs matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .cells import Cell, _dname
from .grids import BASELINE, GL, PASS_TITLE, WC

# ---- plots ---------------------------------------------------------------------------------------

def _plot(cells: list[Cell], folder: Path, machine: dict[str, Any]) -> dict[tuple[str, str, str], Path]:
    """One PNG per op, dtype and pass: speed-up of every column over the baseline, small multiples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[tuple[str, str, str], Path] = {}
    keys = dict.fromkeys((c.op, c.dtype, c.pass_) for c in cells if c.op in (GL, WC))
    for op, dtype, pass_ in keys:
        cs = [c for c in cells if (c.op, c.dtype, c.pass_) == (op, dtype, pass_) and not c.skipped and c.results]
        if not cs:
            continue
        base = BASELINE[op]
        if op == GL:
            rows = sorted({c.dims["n"] for c in cs})
            cols = sorted({(c.dims["in"], c.dims["out"]) for c in cs})
            panel = {(r, col): [c for c in cs if c.dims["n"] == r and (c.dims["in"], c.dims["out"]) == col]
                     for r in rows for col in cols}
            row_name, col_name, x_key, x_label = "n={}", "{0[0]}->{0[1]} per group", "batch", "batch"
        else:
            rows = ["stacked", "list"]
            cols = sorted({(c.dims["batch"], *c.dims["features"]) for c in cs})
            panel = {(r, col): [c for c in cs if c.dims["layout"] == r
                                and (c.dims["batch"], *c.dims["features"]) == col] for r in rows for col in cols}
            row_name, col_name, x_key, x_label = "{} inputs", "b x f = {}", "k", "k (branches)"
            rows = [r for r in rows if any(panel[(r, col)] for col in cols)]
        names = list(dict.fromkeys(n for c in cs for n in c.kinds))
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols) + 1.0, 2.6 * len(rows) + 1.3),
                                 squeeze=False, sharex=True)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, r in enumerate(rows):
            for j, col in enumerate(cols):
                ax = axes[i][j]
                group = sorted(panel.get((r, col), []), key=lambda c: c.dims[x_key])
                for ci, name in enumerate(names):
                    pts = [(c.dims[x_key], c.time(base) / c.time(name)) for c in group
                           if c.time(name) and c.time(base)]
                    if not pts:
                        continue
                    kind = cs[0].kinds.get(name) or next((c.kinds[name] for c in cs if name in c.kinds), "impl")
                    style = ({"color": "black", "linewidth": 2.2, "zorder": 5} if name == "auto" else
                             {"color": colors[ci % len(colors)], "linestyle": "--" if kind == "peer" else "-",
                              "linewidth": 1.2})
                    ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name, **style)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.axhline(1.0, color="grey", linewidth=0.6)
                ax.grid(True, which="major", linewidth=0.3)
                col_text = col_name.format("x".join(map(str, col)) if op == WC else col)
                ax.set_title(f"{row_name.format(r)}, {col_text}", fontsize=8)
                if i == len(rows) - 1:
                    ax.set_xlabel(x_label, fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"speed-up over {base}", fontsize=8)
                ax.tick_params(labelsize=7)
        handles, labels = {}, []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in handles:
                    handles[lab] = h
                    labels.append(lab)
        width, height = fig.get_figwidth(), fig.get_figheight()
        ncol = max(1, min(len(labels), int(width / 1.3)))
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", fontsize=7, ncol=ncol,
                   frameon=False)
        bottom = (0.15 + 0.17 * math.ceil(len(labels) / ncol)) / height
        fig.suptitle(f"{op}, {_dname(dtype)}, {PASS_TITLE[pass_]}: speed-up over {base} (higher is better)\n"
                     f"{machine['device']}, torch {machine['torch']}, {machine['date'][:10]}", fontsize=9)
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / height))
        path = folder / f"{op}-{_dname(dtype)}-{pass_}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written[(op, _dname(dtype), pass_)] = path
    return written
