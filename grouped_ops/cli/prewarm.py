"""``python -m grouped_ops prewarm``: decide (tune) signatures ahead of time."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import recording
from .._errors import GroupedOpsError
from ..decision import Decision
from ..signature import bucket_note
from ..tuning.settings import settings
from ._common import (
    add_signature_commands,
    cache_folder,
    signatures_from_args,
    signatures_from_file,
)


def add_parser(sub: Any) -> None:
    prewarm = sub.add_parser("prewarm", help="decide (tune) signatures ahead of time",
                             description="Tune signatures now so the first real calls are fast. Give "
                             "one on the command line, or --from a file written by "
                             "grouped_ops.record()'s Recorder.save.")
    prewarm.add_argument("--from", dest="from_file", metavar="FILE", type=Path,
                         help="JSON lines of signatures (Recorder.save)")

    def prewarm_flags(p: argparse.ArgumentParser, default: Any = False) -> None:
        p.add_argument("--table", action="store_true", default=default, help="print every candidate's timing")
        p.add_argument("--no-progress", action="store_true", default=default, help="no progress bar")
        p.add_argument("--single-opinion", action="store_true", default=default,
                       help="tune each signature once (by default close calls are tuned again after "
                            "the others, and a third time where two tunings disagree)")
        p.add_argument("--retune", action="store_true", default=default,
                       help="measure on this machine even where the user cache or a shipped table "
                            "already has a decision (and store the new one)")

    prewarm_flags(prewarm)
    add_signature_commands(prewarm, many_batches=True, required=False, flags=prewarm_flags)
    prewarm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_file is not None and args.op is not None:
        raise GroupedOpsError("prewarm: give signatures on the command line or --from FILE, not both")
    if args.from_file is not None:
        requests = signatures_from_file(args.from_file)
    elif args.op is not None:
        requests = signatures_from_args(args)
    else:
        raise GroupedOpsError("prewarm: give an op (grouped_linear or weighted_combine) with its sizes, "
                              "or --from FILE; see `python -m grouped_ops prewarm --help`")
    if not settings().autotune:
        print("note: GROUPED_OPS_AUTOTUNE=0, so nothing is tuned or written", file=sys.stderr)
    with recording.progress_bar(not args.no_progress) as progress:
        decisions = recording.prewarm_signatures(requests, second_opinion=not args.single_opinion,
                                                progress=progress, retune=args.retune)
    counts: dict[str, int] = {}
    for (sig, _), decision in zip(requests, decisions, strict=True):
        counts[decision.source] = counts.get(decision.source, 0) + 1
        picks = f"  (picks of {len(decision.opinions)} tunings: {', '.join(decision.opinions)})" \
            if decision.opinions else ""
        note = bucket_note(sig)
        mark = f", partial: {decision.partial}" if decision.partial else ""
        print(f"{sig}" + (f"\n  ({note})" if note else "")
              + f"\n  -> {decision.impl} ({decision.source}{mark})  {_timings_line(decision)}{picks}")
        if args.table:
            print(decision.table())
    summary = ", ".join(f"{n} {source}" for source, n in sorted(counts.items()))
    again = sum(1 for d in decisions if d.opinions)
    print(f"prewarmed {len(requests)} signature(s): {summary or 'none'}"
          + (f" ({again} close call(s) tuned again)" if again else "") + f"; cache folder: {cache_folder()}")
    for line in outcome_lines(decisions):
        print(line)
    return 0


def outcome_lines(decisions: list[Decision]) -> list[str]:
    """What a prewarm could not store and why, and how many decisions are partial (measured under
    noise, or with candidates out of memory): stored, used, and tuned once more by a later process."""
    lines = []
    reasons: dict[str, int] = {}
    for d in decisions:
        if d.not_stored:
            reasons[d.not_stored] = reasons.get(d.not_stored, 0) + 1
    if reasons:
        lines.append(f"{sum(reasons.values())} not stored:")
        lines += [f"  {n}: {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    noisy = sum(1 for d in decisions if d.partial == "noise")
    other = sum(1 for d in decisions if d.partial and d.partial != "noise")
    if noisy:
        lines.append(f"{noisy} marked as measured under noise (their close candidates stayed unsettled to "
                     "the end of the tuning budget): stored and used; a later process tunes each once more")
    if other:
        lines.append(f"{other} partial for another reason (see --table): stored and used; tuned once more later")
    return lines


def _timings_line(d: Decision) -> str:
    return "  ".join(f"{name}={t * 1e6:.1f}us" for name, t in sorted(d.timings.items(), key=lambda kv: kv[1]))
