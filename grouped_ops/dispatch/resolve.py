"""How ``auto`` decides a signature: one function, :func:`decide`, for every path that asks.

In order:
1. forced: a ``use_impl`` scope, then ``GROUPED_OPS_IMPL``;
2. under ``torch.use_deterministic_algorithms(True)``: the op's default rule, so every process
   computes the same bits whatever its cache holds;
3. remembered: this process's table, the user's disk cache, the shipped tables. Tuned again once
   where that is allowed: a provisional decision (timed under a profiler, never stored), and a
   partial one (``Decision.partial``) that another process stored after one tuning;
4. may we tune here? Not while tracing or scripting, inside a torch.func transform, capturing a
   CUDA graph, on fake or meta tensors, while recording, or with tuning switched off. If we may,
   take the device's tuning lock (one tuning at a time per device on the host,
   :mod:`grouped_ops.tuning.lock`), look again (another process may have decided meanwhile), tune
   in an isolated context (:mod:`grouped_ops.tuning.harness`), remember and persist; else, or where
   the lock stays busy past GROUPED_OPS_TUNE_WAIT_S, use a stale entry, the nearest tuned batch
   size or the op's default rule, and persist nothing (a transient reason remembers nothing either).
Exclusions (``exclude_impls``, ``GROUPED_OPS_EXCLUDE``) apply to every answer of 3 and 4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad

from .._errors import GroupedOpsError
from ..decision import MEASURED, Decision
from ..ops._spec import OpSpec
from ..registry import Implementation
from ..signature import Signature, bucket_note
from ..tuning import harness
from ..tuning import lock as _lock
from ..tuning import store as _store
from ..tuning.settings import Settings, memory_budget, settings
from ..tuning.timer import Timer
from . import distributed, overrides

log = logging.getLogger("grouped_ops")

DECISIONS_LIMIT = 4096  # remembered decisions kept in memory (least recently used dropped first)
FAMILY_LIMIT = 64  # tuned batch sizes kept per family for nearest-batch answers

# (persistent key, exclusions) -> decision; family key -> {batch: decision}
_DECISIONS: OrderedDict[tuple[str, frozenset[str]], Decision] = OrderedDict()
# Keys of partial entries that another process wrote while this one ran: a peer starting at the
# same moment (a job's ranks, a server's workers) re-tuning them would measure the same moment
# again, so they are left to a process that starts later (bounded like the table above).
_PEERS_PARTIAL: OrderedDict[str, None] = OrderedDict()
STARTED = time.time()  # this process's start, as far as the tuner is concerned (tests move it)
_FAMILIES: OrderedDict[str, OrderedDict[int, Decision]] = OrderedDict()
_LOCK = threading.Lock()  # guards the tables above
_TIMER: list[Timer] = []  # a test's injected timer, innermost last
on_clear: list[Callable[[], None]] = []  # memo tables of the callers, emptied with ours


def forward_ad_active() -> bool:
    """Whether forward-mode AD is recording: a dual level, or a torch.func.jvp transform."""
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return True
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import (
        retrieve_all_functorch_interpreters,  # loaded with torch.func
    )

    jvp = torch._C._functorch.TransformType.Jvp
    return any(i.key() == jvp for i in retrieve_all_functorch_interpreters())


def _context_reasons(implementation: Implementation, sig: Signature) -> list[str]:
    reasons = [] if implementation.forward_ad or not forward_ad_active() else \
        ["no forward-mode AD (torch.func.jvp, dual tensors) in torch for it"]
    if _capturing(sig) and implementation.syncs(sig):
        reasons.append("reads values on the host (a sync), which capturing a CUDA graph does not allow")
    return reasons


def checked_impl(spec: OpSpec, sig: Signature, impl: str) -> Implementation:
    """A forced implementation, or an error listing why it cannot run ``sig`` here."""
    implementation = spec.registry[impl]  # unknown names raise, listing the valid ones
    reasons = implementation.not_supported_reasons(sig) + _context_reasons(implementation, sig)
    if reasons:
        raise GroupedOpsError(f"{spec.name}: impl {impl!r} does not support {sig}: " + "; ".join(reasons))
    return implementation


def decide(spec: OpSpec, sig: Signature, args: tuple[Any, ...] | None = None, *,
           at: Signature | None = None, tune_allowed: bool = True, guess: bool = True,
           retune: bool = False) -> tuple[Decision | None, bool]:
    """(decision, whether callers may remember it for these arguments). See the module docstring.
    Every path that needs a decision asks here: eager calls, torch.compile (at trace time and in
    its custom op), prewarm, lookup and the CLI.

    ``args`` are the caller's arguments (only inspected, never run); ``at`` is the exact signature
    of the call that asks: a bucket that must be tuned is timed at that batch size, not at its edge
    (measured: 1.34x off at batch 384 tuned as 512). Without ``guess`` (lookup), nothing known
    gives None instead of a stale entry, the nearest batch size or the default rule. ``retune``
    (prewarm's) measures where tuning is allowed even when memory, the cache or a shipped table answers.
    """
    forced = overrides.forced_name(spec.name)
    if forced is not None:
        checked_impl(spec, sig, forced[0])
        return Decision(forced[0], forced[1], signature=sig), True
    excluded = overrides.excluded(spec.name) | {n for n, i in spec.registry.items() if _context_reasons(i, sig)}
    if torch.are_deterministic_algorithms_enabled():
        why = "deterministic algorithms: auto uses the op's default rule, the same in every process"
        return Decision(harness.default_allowed(spec, sig, excluded), "default", {}, {"(tuning)": why}, sig), True
    s = settings()
    blocker, transient = _tuning_blocker(sig, args, s, tune_allowed)
    known = _remembered(spec, sig, excluded)
    may_tune = blocker is None and _may_retune()
    if known is not None and not (may_tune and (retune or _due(spec, known))):
        # one still due for its re-tuning (here, only in a backward pass or under a profiler) is
        # not memoised: a later call re-tunes it
        return _respecting(spec, _recalled(known), excluded), not (known.provisional or (blocker is None and _due(spec, known)))
    if blocker is not None:
        if not guess:
            return None, False
        return _guess(spec, sig, s, blocker, excluded), not transient
    with _lock.tuning_turn(sig.device, s.wait_s, s.lock_dir) as turn:
        if not turn:  # another process is tuning on this device, longer than we wait: do as if not allowed
            why = (f"another tuning on this device held its lock ({_lock.lock_path(sig.device, s.lock_dir)}) "
                   f"for over {s.wait_s:g} s (GROUPED_OPS_TUNE_WAIT_S)")
            log.warning("grouped_ops: %s: not tuning %s: %s", spec.name, sig, why)
            if known is not None:
                return _respecting(spec, _recalled(known), excluded), False
            return (_guess(spec, sig, s, why, excluded) if guess else None), False
        previous = known
        if not retune:  # another thread or process may have decided (or re-tuned) it while this one waited
            previous = _remembered(spec, sig, excluded, disk_first=known is not None) or known
            if previous is not None and not _due(spec, previous):
                return _respecting(spec, _recalled(previous), excluded), not previous.provisional
        decision, persist = harness.measure(spec, sig, s, at, excluded=excluded, timer=injected_timer())
        if previous is not None and previous.partial and not previous.provisional:
            decision = dataclasses.replace(decision, tunings=previous.tunings + 1)
        if not persist:
            pass
        elif excluded:  # a tuning that left implementations out is not the signature's answer
            decision = dataclasses.replace(decision, not_stored="tuned with implementations excluded (exclude_impls)")
        else:
            why_not = persist_decision(spec, decision)
            decision = dataclasses.replace(decision, stored=not why_not, not_stored=why_not)
        remember(decision, excluded)  # inside the lock: whoever waited for it finds the decision
        if distributed.active(s):
            log.info("grouped_ops: rank %s decided %s locally (ranks agree at a collective prewarm)",
                     distributed.rank(), sig)
    announce(decision, s)
    return decision, not decision.provisional


def decide_signature(spec: OpSpec, sig: Signature, at: Signature | None = None, retune: bool = False) -> Decision:
    """Decide a signature with no caller tensors at hand (prewarm, also from a recorded file)."""
    decision = decide(spec, sig, None, at=at, retune=retune)[0]
    assert decision is not None  # guessing is allowed: there is always an answer
    return decision


def known_decision(spec: OpSpec, sig: Signature) -> Decision | None:
    """What ``auto`` would use for ``sig`` without tuning, if anything is known: the forced choice,
    the deterministic rule, or a remembered decision. Never tunes, never guesses."""
    return decide(spec, sig, tune_allowed=False, guess=False)[0]


def remember(decision: Decision, excluded: frozenset[str] = frozenset()) -> None:
    """Keep ``decision`` in this process's tables (bounded, least recently used dropped first)."""
    sig = decision.signature
    assert sig is not None
    with _LOCK:
        previous = _DECISIONS.get((sig.key(), excluded))
        _DECISIONS[(sig.key(), excluded)] = decision
        _DECISIONS.move_to_end((sig.key(), excluded))
        while len(_DECISIONS) > DECISIONS_LIMIT:
            _DECISIONS.popitem(last=False)
        if excluded:
            return
        family = _FAMILIES.setdefault(sig.family_key(), OrderedDict())
        _FAMILIES.move_to_end(sig.family_key())
        if decision.source in MEASURED and not decision.provisional:  # guesses must not seed guesses
            family[sig.dim("batch")] = decision
            while len(family) > FAMILY_LIMIT:
                family.popitem(last=False)
        else:
            family.pop(sig.dim("batch"), None)
        while len(_FAMILIES) > DECISIONS_LIMIT:
            _FAMILIES.popitem(last=False)
    if previous is not None and previous.impl != decision.impl:
        for clear in on_clear:  # a changed decision must reach calls that memoised the old one
            clear()


def table_sizes() -> dict[str, int]:
    """How many entries each in-memory table holds (for tests of their bounds)."""
    return {"decisions": len(_DECISIONS), "families": len(_FAMILIES),
            "family_batches": max((len(f) for f in _FAMILIES.values()), default=0),
            "tune_locks": _lock.device_count()}


def clear_memory() -> None:
    """Forget every in-memory decision (the disk cache is untouched)."""
    with _LOCK:
        _DECISIONS.clear()
        _FAMILIES.clear()
        _PEERS_PARTIAL.clear()
    for clear in on_clear:
        clear()
    _store.shipped_entries.cache_clear()


def injected_timer() -> Timer | None:
    """The timer a test injected with :func:`use_timer`, or None for the device's own."""
    return _TIMER[-1] if _TIMER else None


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Time candidates with ``timer`` inside the block (tests use a fake one: deterministic, no GPU)."""
    _TIMER.append(timer)
    try:
        yield
    finally:
        _TIMER.remove(timer)


# ---- what is remembered ----------------------------------------------------------------------------

def _remembered(spec: OpSpec, sig: Signature, excluded: frozenset[str], disk_first: bool = False) -> Decision | None:
    """This process's decision for ``sig``, else the disk's (``disk_first``: the disk's if it has a
    fresh one, where another process may have re-tuned what this one remembers). As remembered:
    what this process tuned still says ``"tuned"`` (see :func:`_recalled`)."""
    if disk_first and (found := from_disk(spec, sig)) is not None:
        return found
    with _LOCK:
        found = _DECISIONS.get((sig.key(), excluded)) or _DECISIONS.get((sig.key(), frozenset()))
    if found is not None:
        return found
    return from_disk(spec, sig)


def _due(spec: OpSpec, d: Decision) -> bool:
    """Whether a remembered decision is to be tuned once more where tuning is allowed: a provisional
    one (timed under a profiler), or a partial one that an earlier process stored after one tuning
    (this process's own partial tunings, and those of peers running alongside it, are not
    repeated here: a process that starts later, or batch prewarm's later pass, re-tunes them). One
    partial for memory only where the memory now admits a candidate it did not time: under the same
    limits a new process starts without tuning again."""
    if d.provisional:
        return True
    if not (d.partial and d.tunings < 2 and d.source == "cache" and d.signature is not None
            and d.signature.key() not in _PEERS_PARTIAL):
        return False
    return not d.partial.startswith("out of memory") or harness.admits_more(spec, d.signature, settings(), d.timings)


def from_disk(spec: OpSpec, sig: Signature, allow_stale: bool = False) -> Decision | None:
    """The user cache's or a shipped table's decision for ``sig`` (a stale one only if allowed)."""
    key = sig.key()
    current = _store.fingerprint(impl_set_version(spec))
    stale: Decision | None = None
    for entry, where in ((_store.DiskStore().get(key), "cache"), (_store.shipped_entries().get(key), "shipped")):
        if entry is None or entry["impl"] not in spec.registry:
            if entry is not None:
                overrides.removed(spec.name, entry["impl"], f"a {where} entry")
            continue
        if not spec.registry[entry["impl"]].supports(sig):
            continue
        fresh = entry.get("fingerprint") == current
        decision = _store.decision_of(entry, where if fresh else "stale", sig)
        if fresh:
            if decision.partial and (_store.created_at(entry) or 0.0) >= math.floor(STARTED):
                with _LOCK:
                    _PEERS_PARTIAL[key] = None
                    while len(_PEERS_PARTIAL) > DECISIONS_LIMIT:
                        _PEERS_PARTIAL.popitem(last=False)
            remember(decision)
            return decision
        stale = stale or decision
    return stale if allow_stale else None


def _respecting(spec: OpSpec, d: Decision, excluded: Collection[str]) -> Decision:
    """``d``, or where its pick is excluded, the fastest it timed that is not (else the default)."""
    if d.impl not in excluded:
        return d
    assert d.signature is not None
    left = {n: t for n, t in d.timings.items()
            if n not in excluded and n in spec.registry and spec.registry[n].supports(d.signature)}
    impl = min(left, key=left.__getitem__) if left else harness.default_allowed(spec, d.signature, excluded)
    return dataclasses.replace(d, impl=impl, skipped={**d.skipped, d.impl: "excluded (exclude_impls)"})


def _guess(spec: OpSpec, sig: Signature, s: Settings, blocker: str, excluded: frozenset[str]) -> Decision:
    found = from_disk(spec, sig, allow_stale=True)
    if found is None:
        found = _nearest(spec, sig, s)
    if found is None:
        found = Decision(spec.default_impl(sig), "default", skipped={"(tuning)": blocker}, signature=sig)
    return _respecting(spec, dataclasses.replace(found, stored=False, not_stored=f"not tuned: {blocker}"), excluded)


def _nearest(spec: OpSpec, sig: Signature, s: Settings) -> Decision | None:
    with _LOCK:
        family = dict(_FAMILIES.get(sig.family_key(), {}))
    if not family:
        return None
    target = math.log2(max(sig.dim("batch"), 1))
    batch = min(family, key=lambda b: (abs(math.log2(max(b, 1)) - target), b))
    d = family[batch]
    implementation = spec.registry[d.impl]
    if not implementation.supports(sig):
        return None
    # Workspace can grow with the batch (weighted_combine's masked_dense is quadratic in it). The
    # free-memory query is skipped during CUDA graph capture, where it is not allowed.
    if implementation.extra_memory(sig) and not _capturing(sig) and \
            implementation.extra_memory(sig) > memory_budget(sig.device, s):
        return None
    return Decision(d.impl, "nearest", d.timings, {"(nearest)": f"tuned at batch={batch}"}, sig)


def _may_retune() -> bool:
    """Whether a provisional decision may be tuned again now: not under a profiler (it would be
    provisional again), and not inside a backward pass, where activation checkpointing recomputes
    the forward and must run the very implementations the forward ran."""
    return not harness.profiling() and torch._C._current_graph_task_id() == -1


def _capturing(sig: Signature) -> bool:
    return sig.device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tuning_blocker(sig: Signature, args: tuple[Any, ...] | None, s: Settings,
                    tune_allowed: bool) -> tuple[str | None, bool]:
    """(why tuning is not allowed here or None, whether that reason passes with the call)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "tracing (torch.compile / torch.export / torch.jit)", True
    if torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform (vmap, grad, jvp, ...)", True
    if _capturing(sig):
        return "capturing a CUDA graph", True
    if sig.device_type == "cuda" and harness.cudagraph_warmup(sig.device):
        return "warming up a CUDA graph (torch.compile mode='reduce-overhead')", True
    if args is not None and _has_fake(args):
        return "fake tensors", True
    if sig.device_type == "meta":  # shape-only runs (e.g. building a model on meta): nothing to time
        return "meta tensors", True
    if not tune_allowed:
        return "not tuning here (lookup, or recording for a later prewarm)", True
    if not s.autotune:
        return "autotune switched off (GROUPED_OPS_AUTOTUNE=0)", False
    if sig.device_type not in ("cpu", "cuda"):
        return f"no timer for device type {sig.device_type!r}", False
    if any(v == 0 for _, v in sig.dims):
        return "empty input: nothing to time", False
    return None, False


def _has_fake(args: tuple[Any, ...]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor  # loaded with torch; not at our import

    flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else (x,))]
    return any(isinstance(a, FakeTensor) for a in flat)


# ---- what is written ---------------------------------------------------------------------------------

def persist_decision(spec: OpSpec, decision: Decision) -> str:
    """Write ``decision`` to the user's cache; returns why it was not written ("" when it was)."""
    if not settings().autotune:
        return "autotune switched off (GROUPED_OPS_AUTOTUNE=0): nothing is written"
    if decision.signature is None or decision.provisional:
        return decision.not_stored or "provisional (timed under a profiler)"
    disk = _store.DiskStore()
    if not disk.put(entry_for(spec, decision)):
        return f"the cache folder {disk.root} is not writable"
    return ""


def entry_for(spec: OpSpec, decision: Decision) -> dict[str, Any]:
    """The cache entry (JSON-able) that stores ``decision`` (the format: :func:`store.entry_of`)."""
    return _store.entry_of(decision, impl_set_version(spec))


def impl_set_version(spec: OpSpec) -> str:
    return f"{spec.name}:v{spec.registry.version}:{','.join(spec.registry)}"


def _recalled(d: Decision) -> Decision:
    """A remembered decision as a later call reports it: what this process tuned now comes from the
    cache; a guess (default, nearest, stale) or rank 0's broadcast keeps saying what it is. This
    call wrote nothing (``stored`` is False); why it is not on disk, if it is not, still holds."""
    if d.source == "tuned":
        return dataclasses.replace(d, source="cache", stored=False)
    return dataclasses.replace(d, stored=False) if d.stored else d


def announce(d: Decision, s: Settings) -> None:
    marks = (", provisional" if d.provisional else "") + (f", partial: {d.partial}" if d.partial else "")
    line = f"grouped_ops: {d.signature} -> {d.impl} ({d.source}{marks})"
    if d.signature is not None and (note := bucket_note(d.signature)):
        line = f"{line}; {note}"
    log.info(line)
    if s.verbose:
        print(line, file=sys.stderr)

