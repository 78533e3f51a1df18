"""How ``auto`` decides a signature: one function, :func:`decide`, for every path that asks.

In order:
1. forced: a ``use_impl`` scope, then ``GROUPED_OPS_IMPL``;
2. under ``torch.use_deterministic_algorithms(True)``: the op's default rule, so every process
   computes the same bits whatever its cache holds;
3. remembered: this process's table, the user's disk cache, the shipped tables (a provisional
   decision, timed under a profiler, is tuned again once where that is allowed);
4. may we tune here? Not while tracing or scripting, inside a torch.func transform, capturing a
   CUDA graph, on fake or meta tensors, while recording, or with tuning switched off. If we may,
   tune in an isolated context (:mod:`grouped_ops.tuning.harness`), one tuning at a time per
   device, then remember and persist; else use a stale entry, the nearest tuned batch size or the
   op's default rule, and persist nothing (a transient reason remembers nothing either).
Exclusions (``exclude_impls``, ``GROUPED_OPS_EXCLUDE``) apply to every answer of 3 and 4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading
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
from ..tuning import store as _store
from ..tuning.settings import Settings, memory_budget, settings
from ..tuning.timer import Timer
from . import distributed, overrides

log = logging.getLogger("grouped_ops")

DECISIONS_LIMIT = 4096  # remembered decisions kept in memory (least recently used dropped first)
FAMILY_LIMIT = 64  # tuned batch sizes kept per family for nearest-batch answers

# (persistent key, exclusions) -> decision; family key -> {batch: decision}
_DECISIONS: OrderedDict[tuple[str, frozenset[str]], Decision] = OrderedDict()
_FAMILIES: OrderedDict[str, OrderedDict[int, Decision]] = OrderedDict()
_LOCK = threading.Lock()  # guards the tables above
_TUNE_LOCKS: dict[str, threading.Lock] = {}  # one tuning at a time per device: they would time each other
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
           at: Signature | None = None, tune_allowed: bool = True, guess: bool = True) -> tuple[Decision | None, bool]:
    """(decision, whether callers may remember it for these arguments). See the module docstring.
    Every path that needs a decision asks here: eager calls, torch.compile (at trace time and in
    its custom op), prewarm, lookup and the CLI.

    ``args`` are the caller's arguments (only inspected, never run); ``at`` is the exact signature
    of the call that asks: a bucket that must be tuned is timed at that batch size, not at its edge
    (measured: 1.34x off at batch 384 tuned as 512). Without ``guess`` (lookup), nothing known
    gives None instead of a stale entry, the nearest batch size or the default rule.
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
    if known is not None and not (known.provisional and blocker is None and _may_retune()):
        return _respecting(spec, known, excluded), not known.provisional
    if blocker is not None:
        if not guess:
            return None, False
        return _guess(spec, sig, s, blocker, excluded), not transient
    lock = _TUNE_LOCKS.setdefault(str(sig.device), threading.Lock())
    with lock:
        known = _remembered(spec, sig, excluded)  # another thread may have tuned it meanwhile
        if known is not None and not known.provisional:
            return _respecting(spec, known, excluded), True
        retune = known is not None  # a provisional decision gets one more tuning, and no more
        decision, persist = harness.measure(spec, sig, s, at, excluded=excluded, timer=injected_timer(),
                                            final=retune)
        if distributed.active(s):
            log.info("grouped_ops: rank %s decided %s locally (ranks agree at a collective prewarm)",
                     distributed.rank(), sig)
    remember(decision, excluded)
    if persist and not excluded:  # a tuning that left implementations out is not the signature's answer
        persist_decision(spec, decision)
    announce(decision, s)
    return decision, not decision.provisional


def decide_signature(spec: OpSpec, sig: Signature, at: Signature | None = None) -> Decision:
    """Decide a signature with no caller tensors at hand (prewarm from a recorded file)."""
    decision = decide(spec, sig, None, at=at)[0]
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
            "tune_locks": len(_TUNE_LOCKS)}


def clear_memory() -> None:
    """Forget every in-memory decision (the disk cache is untouched)."""
    with _LOCK:
        _DECISIONS.clear()
        _FAMILIES.clear()
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

def _remembered(spec: OpSpec, sig: Signature, excluded: frozenset[str]) -> Decision | None:
    with _LOCK:
        found = _DECISIONS.get((sig.key(), excluded)) or _DECISIONS.get((sig.key(), frozenset()))
    if found is not None:
        return _recalled(found)
    return from_disk(spec, sig)


def from_disk(spec: OpSpec, sig: Signature, allow_stale: bool = False) -> Decision | None:
    """The user cache's or a shipped table's decision for ``sig`` (a stale one only if allowed)."""
    key = sig.key()
    current = _store.fingerprint(impl_set_version(spec))
    stale: Decision | None = None
    for entry, where in ((_store.DiskStore().get(key), "cache"), (_store.shipped_entries().get(key), "shipped")):
        if entry is None or entry["impl"] not in spec.registry:
            continue
        if not spec.registry[entry["impl"]].supports(sig):
            continue
        fresh = entry.get("fingerprint") == current
        decision = _store.decision_of(entry, where if fresh else "stale", sig)
        if fresh:
            remember(decision)
            return decision
        stale = stale or decision
    return stale if allow_stale else None


def _respecting(spec: OpSpec, d: Decision, excluded: Collection[str]) -> Decision:
    """``d``, or where its pick is excluded, the fastest it timed that is not (else the default)."""
    if d.impl not in excluded:
        return d
    assert d.signature is not None
    left = {n: t for n, t in d.timings.items() if n not in excluded and spec.registry[n].supports(d.signature)}
    impl = min(left, key=left.__getitem__) if left else harness.default_allowed(spec, d.signature, excluded)
    return dataclasses.replace(d, impl=impl, skipped={**d.skipped, d.impl: "excluded (exclude_impls)"})


def _guess(spec: OpSpec, sig: Signature, s: Settings, blocker: str, excluded: frozenset[str]) -> Decision:
    found = from_disk(spec, sig, allow_stale=True)
    if found is None:
        found = _nearest(spec, sig, s)
    if found is None:
        found = Decision(spec.default_impl(sig), "default", skipped={"(tuning)": blocker}, signature=sig)
    return _respecting(spec, found, excluded)


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

def persist_decision(spec: OpSpec, decision: Decision) -> None:
    """Write ``decision`` to the user's cache (unless tuning is switched off or it is provisional)."""
    if settings().autotune and decision.signature is not None and not decision.provisional:
        _store.DiskStore().put(entry_for(spec, decision))


def entry_for(spec: OpSpec, decision: Decision) -> dict[str, Any]:
    """The cache entry (JSON-able) that stores ``decision`` (the format: :func:`store.entry_of`)."""
    return _store.entry_of(decision, impl_set_version(spec))


def impl_set_version(spec: OpSpec) -> str:
    return f"{spec.name}:v{spec.registry.version}:{','.join(spec.registry)}"


def _recalled(d: Decision) -> Decision:
    """A remembered decision as a later call reports it: what this process tuned now comes from the
    cache; a guess (default, nearest, stale) or rank 0's broadcast keeps saying what it is."""
    return dataclasses.replace(d, source="cache") if d.source == "tuned" else d


def announce(d: Decision, s: Settings) -> None:
    line = f"grouped_ops: {d.signature} -> {d.impl} ({d.source}{', provisional' if d.provisional else ''})"
    if d.signature is not None and (note := bucket_note(d.signature)):
        line = f"{line}; {note}"
    log.info(line)
    if s.verbose:
        print(line, file=sys.stderr)

