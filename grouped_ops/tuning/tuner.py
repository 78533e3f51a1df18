"""The tuning loop: time candidates, drop clear losers early, pick the fastest median.

Knows nothing about ops. It receives candidate names (in preference order), a way to build a
zero-argument run for each (on private inputs), a timer, and a numerical check.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .timer import Timer

MIN_SAMPLE_S = 2e-4  # repeat a fast candidate inside one sample until the sample lasts this long
LOSER_FACTOR = 3.0  # a candidate whose best of 3+ samples is this many times the leader's median is cut
HOPELESS_FACTOR = 10.0  # ... and after 2 samples when this many times
CONFIRM_BAND = 0.15  # a candidate with a sample this close to the best median gets paired extra samples ...
CONFIRM_MIN_ROUNDS, CONFIRM_MAX_ROUNDS = 10, 100  # ... this many rounds at least and at most, ...
CONFIRM_MIN_S = 0.03  # ... until each one's paired samples cover this much of its calls, and until
                      # each gap to the best is either a near-tie or larger than its uncertainty
CONFIRM_BUDGET_ROUNDS = 3  # the time budget may end a confirmation after this many rounds
TIE_MIN, TIE_MAX = 0.01, 0.05  # near-tie band: the uncertainty of a gap to the best, clamped to 1%..5%
SECOND_OPINION_BAND = 0.3  # batch prewarm tunes again the signatures whose runner-up was this close
                           # (a busy spell has decided a miss on a gap of 21%)
NOISE_Z = 2.0  # a tuning is noisy where a close contender may be over TIE_MAX faster than the pick:
               # its paired ratio to the pick, less NOISE_Z times that ratio's uncertainty, is under 1 - TIE_MAX


@dataclass
class TuneResult:
    timings: dict[str, float] = field(default_factory=dict)  # name -> median seconds per call
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it has no timing, or why it was cut
    winner: str | None = None
    noisy: bool = False  # the pick's gap to a close contender was still unresolved when the budget ran out


def tune(
    candidates: Sequence[str],
    *,
    make_run: Callable[[str], Callable[[], Any]],
    timer: Timer,
    check: Callable[[Any, Any], str | None],
    work_factor: Mapping[str, float] | None = None,
    budget_s: float = 0.3,
    max_reps: int = 25,
    arithmetic_bound_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_error: Callable[[BaseException], None] = lambda e: None,
) -> TuneResult:
    """Time ``candidates`` and pick the fastest by median.

    Candidates run in order of ``work_factor`` (cheapest first) so the leader is known before an
    expensive one is tried; a candidate whose predicted time (leader x work factor) exceeds the
    budget is skipped, one that raises or fails ``check`` against the first candidate's result is
    excluded. Ties within noise go to the earliest in ``candidates``.

    Stability is judged from medians and their spread, never from one sample: the close contenders
    are re-timed in paired rounds (see _confirm_close_calls), and where one of them may still be
    over TIE_MAX faster than the pick when the budget ends, the result is ``noisy``. One slow sample
    among many (a preempted thread, another process for a moment) moves no median.

    ``arithmetic_bound_s``: where a leader's call lasts at least this long, time follows arithmetic
    on this device, so a candidate doing HOPELESS_FACTOR times the leader's arithmetic is not run.
    """
    work = work_factor or {}
    order = sorted(candidates, key=lambda n: work.get(n, 1.0))
    result = TuneResult()
    samples: dict[str, list[float]] = {}
    runs: dict[str, Callable[[], Any]] = {}
    number: dict[str, int] = {}
    reference: Any = None
    reference_name: str | None = None  # the first candidate that ran; the others must agree with it

    predicted: dict[str, tuple[float, str, str]] = {}  # not run: work factor, leader then, why
    for name in order:
        leader_name = min(samples, key=lambda n: samples[n][0], default=None)  # the fastest first call so far
        leader = samples[leader_name][0] if leader_name is not None else None
        factor = work.get(name, 1.0)
        if leader is not None and factor > 1 and leader * factor > budget_s:
            predicted[name] = (factor, str(leader_name), f"over the {budget_s:g}s tuning budget")
            continue
        if (leader is not None and arithmetic_bound_s is not None and factor >= HOPELESS_FACTOR
                and leader >= arithmetic_bound_s):
            # It would be cut as hopeless after two samples anyway; meanwhile its long calls eat
            # the budget and their after-effects (large allocations) skew whoever runs next.
            predicted[name] = (factor, str(leader_name), "it cannot win")
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
            out = None  # held while the next candidate runs, it would add to the tuning's peak
            first = timer(name, run, 1)
        except Exception as e:  # CUDA OOM included: skip the candidate, keep tuning
            on_error(e)
            result.skipped[name] = _raised(e)
            continue
        runs[name], samples[name] = run, [first]
        number[name] = max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(first, 1e-9))))
    reference = out = None  # every candidate is checked: the timing rounds need no reference result

    shuffler = random.Random(0)  # private and seeded: repeated tunings run the same orders
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a cyclic collection landing in one sample is not the candidate's cost
    try:
        _rounds(samples, runs, number, timer, on_error, result, shuffler, clock, budget_s, max_reps)
        paired, noise = _confirm_close_calls(samples, runs, number, timer, on_error, result, shuffler, clock,
                                             budget_s)
    finally:
        if gc_was_enabled:
            gc.enable()
    result.timings = {n: statistics.median(s) for n, s in samples.items()}
    result.timings.update(paired)
    if result.timings:
        best_name = min(result.timings, key=result.timings.__getitem__)
        best = result.timings[best_name]
        # A confirmed contender's gap is known from its paired ratios to the best; anyone else's
        # from the best's own samples.
        band = {n: _band(noise[n] if n in noise else _uncertainty(samples[best_name])) for n in result.timings}
        result.winner = next(n for n in candidates if n in result.timings and result.timings[n] <= best * (1 + band[n]))
        result.noisy = _unsettled({n: samples[n] for n in paired}, result.winner)
    for name, (factor, leader_name, why) in predicted.items():  # the leader's time as the table shows it
        t = result.timings.get(leader_name)
        result.skipped[name] = (f"predicted ~{t * factor:.3g}s a call ({factor:.0f}x the arithmetic of {leader_name}, "
                                f"{t * 1e3:.3g} ms a call): {why}" if t is not None else
                                f"predicted {factor:.0f}x the arithmetic of {leader_name}: {why}")
    return result


def _rounds(samples: dict[str, list[float]], runs: dict[str, Callable[[], Any]], number: dict[str, int],
            timer: Timer, on_error: Callable[[BaseException], None], result: TuneResult,
            shuffler: random.Random, clock: Callable[[], float], budget_s: float, max_reps: int) -> None:
    """Round-robin samples of every candidate still in, until ``max_reps`` or the budget."""
    start = clock()
    for _ in range(max_reps - 1):
        if clock() - start > budget_s or not runs:
            break
        leader = min(statistics.median(s) for s in samples.values())
        # Each round in a new order: whatever one candidate leaves behind (evicted caches, a
        # trimmed heap) must not always land on the same next one.
        for name in shuffler.sample(list(runs), len(runs)):
            # A clear loser stops being timed (its timing so far stands). Judged by its best
            # sample, never by one alone: on a busy machine a preempted sample can be 10-100x
            # slow (an OpenMP barrier waiting on a descheduled thread), and the first sample is
            # a single call.
            mine, count = min(samples[name]), len(samples[name])
            if (count >= 2 and mine > HOPELESS_FACTOR * leader) or (count >= 3 and mine > LOSER_FACTOR * leader):
                del runs[name]
                continue
            if not _sample(name, samples[name], runs, number, timer, on_error, result):
                del runs[name], samples[name]


def _confirm_close_calls(samples: dict[str, list[float]], runs: dict[str, Callable[[], Any]],
                         number: dict[str, int], timer: Timer, on_error: Callable[[BaseException], None],
                         result: TuneResult, shuffler: random.Random, clock: Callable[[], float],
                         budget_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """Every candidate whose best sample is within CONFIRM_BAND of the best median (widened by
    NOISE_Z times that median's uncertainty, up to twice CONFIRM_BAND) is timed again, in
    rounds of one sample each (a new order every round), and those samples alone decide between
    them. Returns each one's median time as estimated from the paired samples, and the uncertainty
    of each one's gap to the best (see _compare_paired).

    Round-robin samples of every candidate on a shared machine are noisy enough to flip a close call
    (measured: loop 662 vs 898 us in two tunings of one signature). A fast signature's 25 rounds
    last only ~50 ms, so one transient can cover all of them. The close ones are timed for at least
    CONFIRM_MIN_ROUNDS rounds, until their samples cover CONFIRM_MIN_S each, and then on until every
    gap to the best is resolved, a near-tie (under TIE_MIN) or larger than its own uncertainty, and
    no contender may still be over TIE_MAX faster than the best (see _unsettled); from
    CONFIRM_MIN_ROUNDS on, a contender surely over TIE_MAX slower is let go (_release_clear_losers). At
    most CONFIRM_MAX_ROUNDS rounds, or the budget again (after CONFIRM_BUDGET_ROUNDS: 10 rounds of
    three 50 ms candidates took 1.5 s). In one measured miss the true best was the third, so the band
    takes them all.
    """
    timed = [n for n in samples if n in runs]
    if len(timed) < 2:
        return {}, {}
    leader = min(timed, key=lambda n: statistics.median(samples[n]))
    best = statistics.median(samples[leader])
    # Judged by each one's best sample: interference only ever adds time, and in a busy spell most
    # of a candidate's samples can be slow (measured: loop's median 922 us in the rounds, 207 us
    # when timed again; its best sample had been close to that). The band widens by the spread of
    # the leader's own samples: a median that noise may have pulled down is no clear lead.
    band = CONFIRM_BAND + min(CONFIRM_BAND, NOISE_Z * _robust_uncertainty(samples[leader]))
    paired: dict[str, list[float]] = {n: [] for n in timed if min(samples[n]) <= best * (1 + band)}
    if len(paired) < 2:
        return {}, {}
    released: dict[str, tuple[float, float]] = {}  # a clear loser let go: its estimate and gap uncertainty then
    start = clock()
    for i in range(CONFIRM_MAX_ROUNDS):
        if len(paired) < 2:
            break
        if i >= CONFIRM_BUDGET_ROUNDS and clock() - start > budget_s:
            break
        if i >= CONFIRM_MIN_ROUNDS:
            released.update(_release_clear_losers(paired, samples))
            if (len(paired) < 2 or min(sum(s) * number[n] for n, s in paired.items()) >= CONFIRM_MIN_S
                    and _settled(paired)):
                break
        for name in shuffler.sample(list(paired), len(paired)):
            if not _sample(name, paired[name], runs, number, timer, on_error, result):
                del paired[name], samples[name]
    samples.update(paired)
    if len(paired) + len(released) < 2:
        return {}, {}
    estimates, noise = _compare_paired(paired) if paired else ({}, {})
    for name, (estimate, uncertainty) in released.items():
        estimates[name], noise[name] = estimate, uncertainty
    return estimates, noise


def _release_clear_losers(paired: dict[str, list[float]], samples: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Take out of ``paired`` every contender surely over TIE_MAX slower than the best: over TIE_MAX
    slower in more of the paired rounds than half by NOISE_Z standard deviations (a sign test of its
    median ratio; it assumes nothing of the spread, and a stall in some rounds, which gives
    two-valued ratios, cannot fake a lead). Timing it on cannot change the pick, and with four
    contenders in a close call it was most of a tuning's time (the best alone left: the call is
    decided). Returns each one's estimate and gap uncertainty as they stand."""
    estimates, noise = _compare_paired(paired)
    best = min(estimates, key=estimates.__getitem__)
    out = {}
    for name in list(paired):
        if name == best:
            continue
        ratios = [a / b for a, b in zip(paired[name], paired[best], strict=True)]
        slower = sum(r > 1 + TIE_MAX for r in ratios)
        if slower >= len(ratios) / 2 + NOISE_Z * math.sqrt(len(ratios)) / 2:
            out[name] = (estimates[name], noise[name])
            samples[name] = paired.pop(name)
    return out


def _compare_paired(paired: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Estimated median times from paired samples (round i of every list ran back to back), and for
    each one but the best, the uncertainty of its gap to the best.

    Estimates are one median time scaled by the median of per-round ratios: two samples taken back
    to back see the same machine, so its drifts cancel (measured: half the noise of a side-by-side
    check that compares two medians).
    """
    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(paired[a], paired[b], strict=True)]

    reference = next(iter(paired))
    base = statistics.median(paired[reference])
    estimates = {n: base * statistics.median(ratios(n, reference)) for n in paired}
    best = min(estimates, key=estimates.__getitem__)
    return estimates, {n: _uncertainty(ratios(n, best)) for n in paired if n != best}


def _resolved(estimates: dict[str, float], noise: dict[str, float]) -> bool:
    best = min(estimates.values())
    return all(estimates[n] / best - 1 <= TIE_MIN or estimates[n] / best - 1 > _band(u) for n, u in noise.items())


def _settled(paired: dict[str, list[float]]) -> bool:
    """Every gap to the best resolved, and no contender that may still be over TIE_MAX faster."""
    estimates, noise = _compare_paired(paired)
    return _resolved(estimates, noise) and not _unsettled(paired, min(estimates, key=estimates.__getitem__))


def _unsettled(paired: Mapping[str, list[float]], winner: str) -> bool:
    """Whether a confirmed contender may be over TIE_MAX faster than ``winner``: the median of its
    per-round ratios to the winner, less NOISE_Z times that median's robust uncertainty, below
    1 - TIE_MAX. A gap inside the near-tie band is no doubt about the pick (either is within
    TIE_MAX); only a spread of the paired ratios wide enough to hide a real difference is."""
    if winner not in paired:
        return False
    for name, mine in paired.items():
        if name != winner:
            ratios = [a / b for a, b in zip(mine, paired[winner], strict=False)]
            if statistics.median(ratios) - NOISE_Z * _robust_uncertainty(ratios) < 1 - TIE_MAX:
                return True
    return False


def _robust_uncertainty(values: list[float]) -> float:
    """Standard error of the median of ``values`` relative to it, from their median absolute
    deviation (1.2533 x 1.4826 x MAD / sqrt(n) for normally spread samples): up to half the samples
    can be outliers (a preempted thread's 20x) without moving it, where a quartile range of a few
    samples takes one in. It reads what a few samples show too (a budget cut after 3 rounds)."""
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    mad = statistics.median(abs(v - middle) for v in values)
    return 1.858 * mad / max(middle, 1e-12) / math.sqrt(len(values))


def _band(uncertainty: float) -> float:
    return min(TIE_MAX, max(TIE_MIN, uncertainty))


def _sample(name: str, into: list[float], runs: dict[str, Callable[[], Any]], number: dict[str, int],
            timer: Timer, on_error: Callable[[BaseException], None], result: TuneResult) -> bool:
    """Append one timed sample of ``name``; False (and the reason recorded) if it raised: a
    candidate that fails at any point must not win."""
    try:
        into.append(timer(name, runs[name], number[name]))
    except Exception as e:
        on_error(e)
        result.skipped[name] = _raised(e)
        return False
    return True


def _raised(e: BaseException) -> str:
    first_line = str(e).splitlines()[0] if str(e) else ""
    return f"raised {type(e).__name__}: {first_line}"[:300]


def _uncertainty(values: list[float]) -> float:
    """Relative standard error of the median of ``values``: ~0.93 x interquartile range / sqrt(n)
    for normally spread samples. Differences below it are noise, not speed."""
    if len(values) < 4:
        return TIE_MAX / 2
    q = statistics.quantiles(values, n=4)
    return 0.93 * (q[2] - q[0]) / max(statistics.median(values), 1e-12) / math.sqrt(len(values))


# ---- second opinions (batch prewarm) -------------------------------------------------------------

def contenders(timings: Mapping[str, float], band: float = SECOND_OPINION_BAND) -> list[str]:
    """The candidates timed within ``band`` of the fastest, fastest first: a close call when two or more.

    One tuning lasts a fraction of a second, and on a shared machine a busy spell can cover all of
    it, slowing some candidates more than others (measured in the misses of docs/autotuner.md: the
    tuner's time for one implementation 17-65% away from the check's a minute later, while the gaps it
    decided on were 0-21%). A second tuning at another time, and a third where two disagree, outvote
    one bad window.
    """
    if not timings:
        return []
    best = min(timings.values())
    return sorted((n for n, t in timings.items() if t <= best * (1 + band)), key=timings.__getitem__)


def vote(preference: Sequence[str], opinions: Sequence[TuneResult]) -> tuple[str, dict[str, float]]:
    """The implementation most tunings picked, and each candidate's median time over the tunings
    that timed it. Without a majority (three different picks), the candidate whose time relative to
    each tuning's fastest has the lowest median wins; exact ties go to the earliest in ``preference``.
    """
    picks = [o.winner for o in opinions if o.winner is not None]
    if not picks:
        raise ValueError("vote: no tuning picked anything")
    timings = {n: statistics.median(o.timings[n] for o in opinions if n in o.timings)
               for n in {n for o in opinions for n in o.timings}}
    counts = {n: picks.count(n) for n in picks}
    top = max(counts.values())
    if top * 2 > len(picks):
        return next(n for n in picks if counts[n] == top), timings

    def relative(name: str) -> float:
        return statistics.median(o.timings[name] / min(o.timings.values()) for o in opinions if name in o.timings)

    rank = {n: i for i, n in enumerate(preference)}
    return min(counts, key=lambda n: (relative(n), rank.get(n, len(rank)))), timings
