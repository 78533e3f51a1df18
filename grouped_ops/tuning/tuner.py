"""The tuning loop: time candidates, drop clear losers early, pick the fastest median.

Knows nothing about ops. It receives candidate names (in preference order), a way to build a
zero-argument run for each (on private inputs), a timer, and a numerical check.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .timer import Timer

MIN_SAMPLE_S = 2e-4  # repeat a fast candidate inside one sample until the sample lasts this long
LOSER_FACTOR = 3.0  # a candidate this many times slower than the leader is not timed again
TIE_MIN, TIE_MAX = 0.01, 0.05  # near-tie band: the winner's own spread, clamped to 1%..5%


@dataclass
class TuneResult:
    timings: dict[str, float] = field(default_factory=dict)  # name -> median seconds per call
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it has no timing, or why it was cut
    winner: str | None = None


def tune(
    candidates: Sequence[str],
    *,
    make_run: Callable[[str], Callable[[], Any]],
    timer: Timer,
    check: Callable[[Any, Any], str | None],
    work_factor: Mapping[str, float] | None = None,
    budget_s: float = 0.3,
    max_reps: int = 25,
    clock: Callable[[], float] = time.perf_counter,
    on_error: Callable[[BaseException], None] = lambda e: None,
) -> TuneResult:
    """Time ``candidates`` and pick the fastest by median.

    Candidates run in order of ``work_factor`` (cheapest first) so the leader is known before an
    expensive one is tried; a candidate whose predicted time (leader x work factor) exceeds the
    budget is skipped, one that raises or fails ``check`` against the first candidate's result is
    excluded. Ties within noise go to the earliest in ``candidates``.
    """
    work = work_factor or {}
    order = sorted(candidates, key=lambda n: work.get(n, 1.0))
    result = TuneResult()
    samples: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], Any]] = {}
    number: dict[str, int] = {}
    reference: Any = None
    has_reference = False

    for name in order:
        leader = min((s[0] for s in samples.values()), default=None)
        factor = work.get(name, 1.0)
        if leader is not None and factor > 1 and leader * factor > budget_s:
            result.skipped[name] = (f"predicted ~{leader * factor:.3g}s a call ({factor:.0f}x the arithmetic), "
                                    f"over the {budget_s:g}s tuning budget")
            continue
        try:
            run = make_run(name)
            out = run()  # warm-up; also the numerical check
            if has_reference:
                problem = check(reference, out)
                if problem:
                    result.skipped[name] = f"disagrees with {order[0]}: {problem}"
                    continue
            else:
                reference, has_reference = out, True
            first = timer(name, run, 1)
        except Exception as e:  # CUDA OOM included: skip the candidate, keep tuning
            on_error(e)
            result.skipped[name] = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            continue
        runs[name], samples[name] = run, [first]
        number[name] = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(first, 1e-9))))

    start = clock()
    for _ in range(max_reps - 1):
        if clock() - start > budget_s or not runs:
            break
        leader = min(statistics.median(s) for s in samples.values())
        for name in list(runs):
            if statistics.median(samples[name]) > LOSER_FACTOR * leader:
                del runs[name]  # a clear loser: its timing so far stands
                continue
            try:
                samples[name].append(timer(name, runs[name], number[name]))
            except Exception as e:
                on_error(e)
                del runs[name]

    result.timings = {n: statistics.median(s) for n, s in samples.items()}
    if result.timings:
        best_name = min(result.timings, key=result.timings.__getitem__)
        best = result.timings[best_name]
        band = min(TIE_MAX, max(TIE_MIN, _spread(samples[best_name])))
        result.winner = next(n for n in candidates if n in result.timings and result.timings[n] <= best * (1 + band))
    return result


def _spread(values: list[float]) -> float:
    """Relative interquartile range: how noisy these samples are."""
    if len(values) < 4:
        return TIE_MAX / 2
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / max(statistics.median(values), 1e-12)
