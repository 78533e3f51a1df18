"""The masked_dense claims check (``--check-claims``): verdicts on what a block-diagonal dense matmul was said to gain over the loop."""

from __future__ import annotations

from .cells import Cell


def _seed_ratio(cell: Cell, fast: str) -> float | None:
    loop, other = cell.time("nn.ModuleList"), cell.time(fast)
    return loop / other if loop and other else None


def _seed_verdicts(cells: list[Cell]) -> list[tuple[str, str, str, str]]:
    """(claim, what was claimed, what we measured, verdict), from the claims cells of one dtype and pass.

    Ratios are loop time / other time (> 1: the other is faster), the loop being the claims' own
    ``nn.ModuleList`` + ``torch.stack``; C is ``masked_dense``, A one dense ``nn.Linear(n*in, n*out)``.
    """
    def pick(claim: str, **dims: int) -> list[Cell]:
        return [c for c in cells if c.claim == claim and all(c.dims[k] == v for k, v in dims.items())]

    def fmt(r: float | None) -> str:
        return "-" if r is None else f"{r:.2f}x"

    def span(rs: list[float]) -> str:
        return fmt(rs[0]) if len(rs) == 1 else f"{fmt(min(rs))} to {fmt(max(rs))}"

    out = []
    small = [c for c in pick("batch") if c.dims["batch"] <= 128]
    pairs = [(c.dims["batch"], r) for c in small if (r := _seed_ratio(c, "masked_dense")) is not None]
    got = ", ".join(f"batch {c.dims['batch']}: C {fmt(_seed_ratio(c, 'masked_dense'))} / "
                    f"A {fmt(_seed_ratio(c, 'dense'))}" for c in small)
    rs = [r for _, r in pairs]
    if not rs:
        verdict = "not measured"
    elif min(rs) >= 8:
        verdict = f"holds: masked_dense is {span(rs)} faster"
    elif min(rs) > 1:
        verdict = f"partly: masked_dense is faster ({span(rs)}), but not ~10x"
    elif max(rs) <= 1:
        verdict = f"does not hold: masked_dense is slower than the loop here ({span(rs)})"
    else:
        verdict = "does not hold: masked_dense is faster only at batch " + ", ".join(str(b) for b, r in pairs if r > 1)
    out.append(("masked_dense ~10x faster than the loop", "batch <= 128, n=32, 32->32", got, verdict))

    ns = pick("n")
    pairs = [(f"n={c.dims['n']} {c.dims['in']}->{c.dims['out']}", r) for c in ns
             if (r := _seed_ratio(c, "masked_dense")) is not None]
    got = ", ".join(f"{k}: {fmt(r)}" for k, r in pairs)
    rs = [r for _, r in pairs]
    if not rs:
        verdict = "not measured"
    elif max(rs) < 1:
        verdict = "holds: the loop wins at every n <= 8 measured"
    elif min(rs) >= 1:
        verdict = "does not hold: masked_dense wins at every n <= 8 measured"
    else:
        verdict = "partly: the loop wins at " + ", ".join(k for k, r in pairs if r < 1) + " only"
    out.append(("masked_dense slower than the loop for n <= 8", "batch 128; 32 per group, and n*in = 1024",
                got, verdict))

    for claim, key, what in (("batch", "batch", "batch grows"), ("size", "in", "per-group size grows")):
        cs = pick(claim, n=32) + (pick("batch", batch=128) if claim == "size" else [])
        cs.sort(key=lambda c: c.dims[key])
        got = ", ".join(f"{key} {c.dims[key]}: C {fmt(_seed_ratio(c, 'masked_dense'))} / "
                        f"A {fmt(_seed_ratio(c, 'dense'))}" for c in cs)
        pairs = [(c.dims[key], r) for c in cs if (r := _seed_ratio(c, "masked_dense")) is not None]
        if len(pairs) < 2:
            verdict = "not measured"
        else:
            first, last = pairs[0][1], pairs[-1][1]
            monotone = all(b <= a * 1.1 for (_, a), (_, b) in zip(pairs, pairs[1:], strict=False))
            trend = f"loop/masked_dense goes {fmt(first)} -> {fmt(last)}"
            flips = [v for v, r in pairs if r < 1]
            if flips and first >= 1:
                trend += f", masked_dense slower than the loop from {key} {flips[0]} on"
            elif flips:
                trend += ", masked_dense slower than the loop throughout"
            if max(r for _, r in pairs) < 1:
                verdict = (f"does not apply: masked_dense never beats the loop here, so there is no gap to "
                           f"shrink ({trend})")
            elif last < first and monotone:
                verdict = f"holds: {trend}"
            elif last < first:
                verdict = f"partly (not monotone): {trend}"
            else:
                verdict = f"does not hold: {trend}"
        seed = ("batch 2048: A only ~1.5x faster than the loop" if claim == "batch"
                else "8 per group ~18x; ~253 per group ~2.5x (A), ~1.5x (C)")
        out.append((f"the gap shrinks as {what}", seed, got, verdict))
    return out
