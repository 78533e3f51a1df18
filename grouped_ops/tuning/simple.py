"""The simpler tuning protocol: the minimum of round-robin samples, a fixed tie band, and pooled
passes instead of votes.

Interference on a shared machine (another process, a preempted OpenMP thread) only ever adds
time, so a candidate's fastest sample is its least disturbed one; a busy spell that slows some
samples leaves the minimum alone unless it covers all of them.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .timer import Timer
from .tuner import LOSER_FACTOR, MIN_SAMPLE_S, SPELL_FACTOR, TuneResult, _raised, _sample

TIE_BAND = 0.02  # times within 2% of the fastest are a tie, won by the earliest in preference order


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
    statistic: Callable[[list[float]], float] = min,
    **_: Any,
) -> TuneResult:
    """Time ``candidates`` and pick the fastest by its minimum sample.

    Each candidate in order of ``work_factor`` (cheapest first) runs once (its result checked
    against the first one's) and is timed once; one whose predicted time (the fastest sample so
    far x its work factor) exceeds the budget is not run. Then rounds of one sample each, in a new
    order every round, until ``max_reps`` samples or ``budget_s``; a candidate whose best of 3+
    samples is LOSER_FACTOR times the best is no longer timed. The winner is the earliest of
    ``candidates`` within TIE_BAND of the fastest minimum.
    """
    work = work_factor or {}
    result = TuneResult()
    samples: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], Any]] = {}
    number: dict[str, int] = {}
    reference: Any = None
    reference_name: str | None = None
    predicted: dict[str, tuple[float, str]] = {}  # not run: its work factor, and the leader then
    for name in sorted(candidates, key=lambda n: work.get(n, 1.0)):
        factor = work.get(name, 1.0)
        leader = min(samples, key=lambda n: min(samples[n]), default=None)
        if leader is not None and factor > 1 and min(samples[leader]) * factor > budget_s:
            predicted[name] = (factor, leader)
            continue
        try:
            run = make_run(name)
            out = run()  # warm-up; also the numerical check
            if reference_name is not None:
                problem = check(reference, out)
                if problem:
                    result.skipped[name] = f"disagrees with {reference_name}: {problem}"
                    continue
            else:
                reference, reference_name = out, name
            first = timer(name, run, 1)
        except Exception as e:  # CUDA OOM included: skip the candidate, keep tuning
            on_error(e)
            result.skipped[name] = _raised(e)
            continue
        runs[name], samples[name] = run, [first]
        number[name] = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(first, 1e-9))))

    shuffler = random.Random(0)  # private and seeded: repeated tunings run the same orders
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a cyclic collection landing in one sample is not the candidate's cost
    try:
        start = clock()
        for _ in range(max_reps - 1):
            if clock() - start > budget_s or not runs:
                break
            best = min(min(s) for s in samples.values())
            for name in shuffler.sample(list(runs), len(runs)):
                if len(samples[name]) >= 3 and min(samples[name]) > LOSER_FACTOR * best:
                    del runs[name]  # a clear loser: its timing so far stands
                    continue
                if not _sample(name, samples[name], runs, number, timer, on_error, result):
                    del runs[name], samples[name]
    finally:
        if gc_was_enabled:
            gc.enable()
    result.disturbed = any(len(s) >= 2 and max(s) > SPELL_FACTOR * min(s) for s in samples.values())
    result.timings = {n: statistic(s) for n, s in samples.items()}
    result.winner = pick(result.timings, candidates)
    for name, (factor, leader) in predicted.items():  # quoting the leader's time as the table shows it
        t = result.timings.get(leader)
        if t is None:  # the leader failed later: no time to quote
            result.skipped[name] = f"predicted over the {budget_s:g}s tuning budget ({factor:.0f}x the arithmetic)"
            continue
        result.skipped[name] = (f"predicted ~{t * factor:.3g}s a call ({factor:.0f}x the arithmetic of {leader}, "
                                f"{t * 1e3:.3g} ms a call), over the {budget_s:g}s tuning budget")
    return result


def pick(timings: Mapping[str, float], preference: Sequence[str]) -> str | None:
    """The earliest of ``preference`` whose time is within TIE_BAND of the fastest (None if none)."""
    if not timings:
        return None
    best = min(timings.values())
    return next(n for n in preference if n in timings and timings[n] <= best * (1 + TIE_BAND))


def pool(preference: Sequence[str], opinions: Sequence[TuneResult]) -> tuple[str, dict[str, float]]:
    """Several tunings of one signature taken at different times as one: each candidate's fastest
    time over the tunings, and the pick among those."""
    timings: dict[str, float] = {}
    for o in opinions:
        for n, t in o.timings.items():
            timings[n] = min(t, timings.get(n, t))
    winner = pick(timings, preference)
    if winner is None:
        raise ValueError("pool: no tuning timed anything")
    return winner, timings
