"""Deciding ahead of time: ``prewarm``, ``lookup``, ``record()`` and the batch prewarm behind them.

Recording notes the signatures a model's calls hit and tunes nothing (the calls run the best
known or default choice meanwhile); ``Recorder.prewarm()`` then tunes them all in this process,
exactly as ``python -m grouped_ops prewarm --from FILE`` does with a saved recording in another.
Under torch.distributed a batch prewarm is collective: every rank calls it, and all take rank 0's
decisions by signature (see :mod:`grouped_ops.dispatch.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._errors import GroupedOpsError
from .decision import Decision
from .dispatch import RECORDING, distributed, resolve
from .functional import call_arguments
from .ops import SPECS
from .ops._spec import OpSpec
from .signature import Signature, bucketing_mode
from .tuning import harness
from .tuning.settings import settings
from .tuning.tuner import TuneResult, contenders, vote

Progress = Callable[[int, int, Signature, str], None]  # (steps done, steps known so far, signature, what)
Request = tuple[Signature, Signature | None]


def _spec_and_args(op: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                   who: str) -> tuple[OpSpec, tuple[Any, ...]]:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in SPECS:
        raise GroupedOpsError(f"{who}: unknown op {name!r}; valid ops are {sorted(SPECS)}")
    if kwargs.pop("impl", "auto") != "auto":
        raise GroupedOpsError(f"{who}: impl= is not taken here; the point is to choose it")
    return call_arguments(name, args, kwargs, who)


def _signatures(spec: OpSpec, args: tuple[Any, ...]) -> tuple[Signature, Signature]:
    spec.validate(*args)
    m = spec.meta(*args)
    return spec.signature(m, bucketing_mode() == "pow2"), spec.signature(m, False)


def prewarm(op: str | Callable[..., Any], *args: Any, retune: bool = False, **kwargs: Any) -> Decision:
    """Decide (tuning if needed) the implementation ``auto`` will use for these arguments, persist it,
    and return the decision. Arguments exactly as for the op's public function (``offsets=`` or
    ``group_sizes=`` reach the ragged op, ``out_dtype=`` and type promotion apply as in the call);
    they are only described, never run.
    ``retune=True`` measures on this machine even where the cache or a shipped table answers.
    Under torch.distributed it is collective: call it on every rank (see docs/autotuner.md).

    The decision says what was done: ``stored`` (written to the user cache now) or ``not_stored``
    (why not), and ``partial`` (``"noise"``: measured under noise, stored, tuned once more later).

    Example:
        >>> d = grouped_ops.prewarm("grouped_linear", x, layer.weight, layer.bias)
        >>> d.impl, d.source, d.timings, d.stored

    Raises:
        GroupedOpsError: an unknown op, ``impl=``, or arguments the op rejects.
    """
    spec, args = _spec_and_args(op, args, dict(kwargs), "prewarm")
    sig, exact = _signatures(spec, args)
    if distributed.active(settings()):
        return prewarm_signatures([(sig, exact)], second_opinion=False, retune=retune)[0]
    return resolve.decide_signature(spec, sig, at=exact, retune=retune)


def lookup(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Decision | None:
    """The decision ``auto`` would use for these arguments if one is known (forced, remembered, on
    disk or shipped); never tunes, None when nothing is known."""
    spec, args = _spec_and_args(op, args, dict(kwargs), "lookup")
    return resolve.known_decision(spec, _signatures(spec, args)[0])


def prewarm_signatures(requests: Sequence[Request], *, second_opinion: bool = True,
                       progress: Progress | None = None, retune: bool = False) -> list[Decision]:
    """Decide many signatures ahead of time, each ``(signature, at)``: ``at`` is the exact signature
    of its first call, where a bucket is timed.

    With ``second_opinion``, every signature tuned here whose runner-up came within
    SECOND_OPINION_BAND of the winner is tuned again once all are done (its close contenders only),
    and a third time where the two picks differ; the majority is kept. The tunings lie a whole pass
    apart, so one busy spell of a shared machine cannot decide alone (see tuner.contenders). A
    tuning measured under noise (``partial="noise"``) is tuned once more after the first pass.
    ``retune`` measures every signature on this machine even where the cache or a shipped table answers.
    Under torch.distributed it is collective (rank 0 decides, every rank adopts by signature).
    """
    if distributed.active(settings()):
        decided = distributed.agree(
            requests, lambda union: _prewarm_here(union, second_opinion, progress, retune),
            lambda request: resolve.decide_signature(SPECS[request[0].op], *request, retune=retune))
        return [_adopt(d) for d in decided]
    return _prewarm_here(requests, second_opinion, progress, retune)


def _adopt(d: Decision) -> Decision:
    sig = d.signature
    assert sig is not None
    spec = SPECS[sig.op]
    if not spec.registry[d.impl].supports(sig):  # a rank on other hardware keeps working, on its own pick
        return resolve.decide_signature(spec, sig)
    resolve.remember(d)
    return d


def _prewarm_here(requests: Sequence[Request], second_opinion: bool, progress: Progress | None,
                  retune: bool = False) -> list[Decision]:
    decisions: list[Decision] = []
    total = len(requests)
    for sig, at in requests:
        decisions.append(resolve.decide_signature(SPECS[sig.op], sig, at, retune=retune))
        if progress:
            progress(len(decisions), total, sig, "decided")
    # A tuning measured under noise was stored marked so: tune it once more, a pass later (its
    # re-tuning, which a later process would otherwise do), and keep that.
    noisy = [i for i, d in enumerate(decisions)
             if d.source == "tuned" and d.partial == "noise" and d.tunings < 2 and not harness.profiling()]
    total += len(noisy)
    for done, i in enumerate(noisy, start=len(decisions) + 1):
        sig, at = requests[i]
        decisions[i] = resolve.decide_signature(SPECS[sig.op], sig, at, retune=True)
        if progress:
            progress(done, total, sig, "tuned again after noise")
    if not second_opinion:
        return decisions
    s = settings()
    close = {i: names for i, d in enumerate(decisions)
             if d.source == "tuned" and len(names := contenders(d.timings)) >= 2}
    opinions = {i: [TuneResult(dict(decisions[i].timings), {}, decisions[i].impl, decisions[i].partial == "noise")]
                for i in close}
    done = total
    for which in ("second opinion", "third opinion"):
        # the third only where the first two disagree
        rerun = [i for i in close if which == "second opinion" or
                 (len(opinions[i]) == 2 and opinions[i][0].winner != opinions[i][1].winner)]
        total += len(rerun)
        for i in rerun:
            sig, at = requests[i]
            d, _ = harness.measure(SPECS[sig.op], sig, s, at, only=close[i], timer=resolve.injected_timer())
            if d.source == "tuned" and d.timings:  # else every contender failed: no opinion
                opinions[i].append(TuneResult(dict(d.timings), dict(d.skipped), d.impl, d.partial == "noise"))
            done += 1
            if progress:
                progress(done, total, sig, which)
    for i in close:
        if len(opinions[i]) > 1:
            decisions[i] = _settle(decisions[i], opinions[i])
    return decisions


def _settle(first: Decision, opinions: list[TuneResult]) -> Decision:
    """Replace a first tuning's decision by the vote of all the tunings of its signature. It comes
    from all of them (``tunings``), and is measured under noise only where every one of them was."""
    sig = first.signature
    assert sig is not None
    spec = SPECS[sig.op]
    picks = tuple(str(o.winner) for o in opinions)
    tunings = first.tunings + len(opinions) - 1
    partial = "noise" if all(o.noisy for o in opinions) else "" if first.partial == "noise" else first.partial
    skipped = {**first.skipped, **{n: why for o in opinions for n, why in o.skipped.items()}}
    failed = {n for o in opinions for n, why in o.skipped.items() if why.startswith(("raised", "disagrees"))}
    if failed:  # a candidate that failed in any tuning must not win
        kept = [{n: t for n, t in o.timings.items() if n not in failed} for o in opinions]
        opinions = [TuneResult(t, {}, min(t, key=t.__getitem__)) for t in kept if t]
    if opinions:
        impl, timings = vote(list(spec.registry), opinions)
        final = Decision(impl, "tuned", timings, skipped, sig, picks, partial=partial, tunings=tunings)
    else:
        final = Decision(spec.default_impl(sig), "default", {}, skipped, sig, picks, tunings=tunings)
    why_not = resolve.persist_decision(spec, final)
    final = dataclasses.replace(final, stored=not why_not, not_stored=why_not)
    resolve.remember(final)
    if final.impl != first.impl:
        resolve.announce(final, settings())
    return final


class Recorder:
    """Collects the signatures of every op call made while it is active (see :func:`record`), and
    for each the batch size of its first call, where prewarm will time it."""

    def __init__(self) -> None:
        self.signatures: list[Signature] = []
        self._first_call: dict[Signature, Signature] = {}  # bucketed -> exact signature of its first call
        self._lock = threading.Lock()

    def _add(self, sig: Signature, exact: Signature) -> None:
        with self._lock:
            if sig not in self._first_call:
                self._first_call[sig] = exact
                self.signatures.append(sig)

    def requests(self) -> list[Request]:
        """(signature, its first call's exact signature) pairs, in the order first seen."""
        return [(sig, self._first_call[sig]) for sig in self.signatures]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the signatures as JSON lines, for ``python -m grouped_ops prewarm --from FILE``.
        ``tune_at_batch`` is the first call's batch size (a bucket is timed there, not at its edge)."""
        with open(path, "w", encoding="utf-8") as f:
            for sig, exact in self.requests():
                f.write(json.dumps({**sig.to_spec(), "tune_at_batch": exact.dim("batch")}) + "\n")

    def prewarm(self, *, second_opinion: bool = True, progress: bool = False, retune: bool = False) -> list[Decision]:
        """Decide every recorded signature now, in this process (see :func:`prewarm_signatures`);
        ``progress`` shows a progress bar on stderr; ``retune`` measures even what is known."""
        with progress_bar(progress) as report:
            return prewarm_signatures(self.requests(), second_opinion=second_opinion, progress=report, retune=retune)


@contextlib.contextmanager
def progress_bar(show: bool) -> Iterator[Progress | None]:
    """A :data:`Progress` callback drawing a tqdm bar on stderr where it is a terminal, else writing
    a line there every :data:`PROGRESS_LINE_S` seconds and at the end (a log file gets no carriage
    returns); None when not ``show``."""
    if not show:
        yield None
        return
    if not sys.stderr.isatty():
        last = -math.inf

        def line(done: int, total: int, sig: Signature, what: str) -> None:
            nonlocal last
            now = time.monotonic()
            if done >= total or now - last >= PROGRESS_LINE_S:
                last = now
                print(f"prewarm: {done}/{total} ({sig.op} batch={sig.dim('batch')} {what})", file=sys.stderr,
                      flush=True)
        yield line
        return
    try:
        from tqdm import tqdm  # only when a bar is shown: a cheap import for everyone else
    except ImportError:  # an optional nicety: without tqdm, no bar
        yield None
        return

    bar = tqdm(total=0, desc="prewarm", unit="tuning", file=sys.stderr)

    def report(done: int, total: int, sig: Signature, what: str) -> None:
        bar.total = total
        bar.set_postfix_str(f"{sig.op} batch={sig.dim('batch')} {what}", refresh=False)
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        bar.close()


#: Seconds between the progress lines of a batch prewarm whose stderr is not a terminal.
PROGRESS_LINE_S = 10.0


@contextlib.contextmanager
def record() -> Iterator[Recorder]:
    """Capture every signature the ops see inside the block, in this thread (and asyncio task);
    nothing is tuned meanwhile.

    Example:
        >>> with grouped_ops.record() as rec:
        ...     model(example_batch)
        >>> rec.prewarm()                  # tune them here, or:
        >>> rec.save("signatures.jsonl")   # later: python -m grouped_ops prewarm --from signatures.jsonl
    """
    rec = Recorder()
    token = RECORDING.set((*RECORDING.get(), rec))
    try:
        yield rec
    finally:
        RECORDING.reset(token)

