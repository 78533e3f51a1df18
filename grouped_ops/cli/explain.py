"""``python -m grouped_ops explain``: every candidate's timing, or why not, for one signature."""

from __future__ import annotations

import argparse
from typing import Any

from .. import dispatch
from ..decision import Decision, partial_note
from ..ops import SPECS
from ..ops._spec import OpSpec
from ..signature import Signature, bucket_note, bucketing_mode
from ..tuning.settings import memory_budget, settings
from ._common import add_signature_commands, signatures_from_args


def add_parser(sub: Any) -> None:
    explain = sub.add_parser("explain", help="every candidate's timing, or why not, for one signature",
                             description="Show how auto decides one signature: every implementation's "
                             "timing (tuning it now unless --no-tune), or why it was not timed.")

    def explain_flags(p: argparse.ArgumentParser, default: Any = False) -> None:
        p.add_argument("--no-tune", action="store_true", default=default,
                       help="only show what is known; never time anything")

    explain_flags(explain)
    add_signature_commands(explain, many_batches=False, required=True, flags=explain_flags)
    explain.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ((sig, at),) = signatures_from_args(args)
    spec = SPECS[sig.op]
    s = settings()
    print(f"signature: {sig}")
    print(f"key:       {sig.key()}")
    print(f"buckets:   {bucketing_mode()} (GROUPED_OPS_BUCKETS)")
    if note := bucket_note(sig):
        print(f"           {note}")
    if args.no_tune:
        decision = dispatch.known_decision(spec, sig)
        if decision is None:
            print(f"decision:  none yet; auto would tune it on the first call, or use the default rule "
                  f"({spec.default_impl(sig)}) where tuning is not allowed")
    else:
        decision = dispatch.decide_signature(spec, sig, at)
    if decision is not None:
        print(f"decision:  {decision.impl} ({decision.source}: {_SOURCES.get(decision.source, '')})")
        if decision.partial:
            print(f"           {partial_note(decision)}")
        if decision.not_stored:
            print(f"           not stored: {decision.not_stored}")
    print()
    print(explain_table(spec, sig, decision, memory_budget(sig.device, s)))
    return 0


_SOURCES = {
    "tuned": "timed just now",
    "cache": "from memory or the user cache, timed on this machine",
    "shipped": "from a table shipped with grouped_ops, timed on a machine of this kind when the table was made",
    "default": "the op's default rule; nothing was timed",
    "env": "forced by GROUPED_OPS_IMPL",
    "forced": "forced by a use_impl scope",
    "stale": "a cache entry from other versions, used because tuning is not allowed",
    "nearest": "the choice of the nearest tuned batch size",
    "broadcast": "rank 0's choice under torch.distributed",
}


def explain_table(spec: OpSpec, sig: Signature, decision: Decision | None, budget: float) -> str:
    """Every implementation: its timing (and ratio to the best), or why it was not timed."""
    timings = dict(decision.timings) if decision else {}
    skipped = dict(decision.skipped) if decision else {}
    best = min(timings.values(), default=0.0)
    w = max(14, *(len(n) for n in (*spec.registry, *skipped)))
    rows = [f"   {'implementation':<{w}} {'median':>12}  {'vs best':>7}  notes",
            f"   {'-' * w} {'-' * 12}  {'-' * 7}  {'-' * 5}"]
    for name, implementation in spec.registry.items():
        mark = "*" if decision is not None and name == decision.impl else " "
        need = implementation.extra_memory(sig)
        notes = []
        if name in skipped:
            notes.append(skipped[name])
        elif name not in timings:
            reasons = implementation.not_supported_reasons(sig)
            if reasons:
                notes.append("unsupported: " + "; ".join(reasons))
            elif need > budget:
                notes.append(f"workspace {_bytes(need)} over the tuning memory budget {_bytes(budget)}")
            else:
                notes.append("not timed")
        if not any("workspace" in note for note in notes):
            notes.append(f"workspace {_bytes(need)}" if need else "no workspace")
        if name in timings:
            t = timings[name]
            ratio = f"x{t / best:.2f}" if best else ""
            rows.append(f" {mark} {name:<{w}} {t * 1e6:>9.1f} us  {ratio:>7}  {'; '.join(notes)}")
        else:
            rows.append(f" {mark} {name:<{w}} {'-':>12}  {'':>7}  {'; '.join(notes)}")
    for name, why in skipped.items():
        if name not in spec.registry:
            rows.append(f"   {name:<{w}} {'':>12}  {'':>7}  {why}")
    return "\n".join(rows)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
