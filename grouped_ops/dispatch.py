"""The one path every op call takes: forced impl, cached choice, disk, tuning, default rule.

Precedence for ``impl="auto"``: a ``use_impl`` scope, then ``GROUPED_OPS_IMPL``, then the
in-memory table, the user's disk cache, the shipped tables, then tuning (when allowed), and
when tuning is not allowed a stale entry, the nearest tuned batch size, or the op's default rule.

The hot path (a decided signature) is: describe the arguments, one dict lookup, call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import GroupedOpsError
from .ops import SPECS
from .ops._spec import OpSpec
from .registry import _forced, forced_impl
from .signature import Signature, bucketing_mode
from .tuning import store as _store
from .tuning.settings import Settings, memory_budget, settings
from .tuning.timer import Timer, timer_for
from .tuning.tuner import TuneResult, contenders, tune, vote

log = logging.getLogger("grouped_ops")


@dataclass(frozen=True)
class Decision:
    """Which implementation a signature uses, and why.

    source: ``"cache"`` (memory, disk or a shipped table), ``"tuned"`` (this call timed it),
    ``"forced"`` (a ``use_impl`` scope), ``"env"`` (GROUPED_OPS_IMPL), ``"broadcast"`` (taken
    from rank 0 under torch.distributed), ``"stale"`` (an entry from other library/torch versions,
    used because tuning is not allowed here), ``"nearest"`` (the decision of the nearest tuned batch
    size) or ``"default"`` (the op's documented rule).
    timings: median seconds per call of each timed candidate; skipped: why the others were not timed.
    opinions: where batch prewarm tuned a close call again, each tuning's pick in order (the
    decision is their majority; see :func:`prewarm_signatures`); empty otherwise.
    """

    impl: str
    source: str
    timings: Mapping[str, float] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    signature: Signature | None = None
    opinions: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.impl} ({self.source})" + (f" for {self.signature}" if self.signature else "")

    def table(self) -> str:
        """Every candidate's timing or the reason it was not timed, fastest first."""
        rows = []
        best = min(self.timings.values(), default=None)
        for name, t in sorted(self.timings.items(), key=lambda kv: kv[1]):
            mark = "*" if name == self.impl else " "
            ratio = f"x{t / best:.2f}" if best else ""
            rows.append(f" {mark} {name:<14} {t * 1e6:>12.1f} us   {ratio}")
        for name, why in self.skipped.items():
            if name not in self.timings:
                rows.append(f"   {name:<14} {'-':>12}      {why}")
            else:
                rows.append(f"   {'':<14} {'':>12}      ({name}: {why})")
        if self.opinions:
            rows.append(f"   picks of {len(self.opinions)} tunings: {', '.join(self.opinions)}")
        return "\n".join(rows)


# (op, argument description) -> implementation function, for validated and decided calls
_AUTO: dict[str, dict[Hashable, Callable[..., Any]]] = {op: {} for op in SPECS}
_FORCED: dict[str, dict[Hashable, Callable[..., Any]]] = {op: {} for op in SPECS}
# persistent signature key -> decision; family key -> {batch: decision} for nearest-neighbour answers
_DECISIONS: dict[str, Decision] = {}
_FAMILIES: dict[str, dict[int, Decision]] = {}
_LOCK = threading.Lock()
_KEY_LOCKS: dict[str, threading.Lock] = {}
_RECORDERS: list[Recorder] = []
_TIMER: list[Timer] = []  # a test's injected timer, innermost last


def call(spec: OpSpec, args: tuple[Any, ...], impl: str) -> torch.Tensor:
    m = spec.meta(*args)
    if impl == "auto":
        scope = _forced.get()
        if scope is not None:
            impl = scope.get(spec.name, "auto")
    if not _RECORDERS:
        fn = _AUTO[spec.name].get(m) if impl == "auto" else _FORCED[spec.name].get((m, impl))
        if fn is not None:
            return fn(*args)
    return _call_slow(spec, args, m, impl)


def _call_slow(spec: OpSpec, args: tuple[Any, ...], m: Hashable | None, impl: str) -> torch.Tensor:
    spec.validate(*args)
    if m is None:  # validate() accepted what meta() could not describe: a bug, never a silent answer
        raise GroupedOpsError(f"{spec.name}: could not describe the arguments {args!r}")
    sig = spec.signature(m, bucketing_mode() == "pow2")
    if _RECORDERS:
        exact = spec.signature(m, False)
        for rec in _RECORDERS:
            rec._add(sig, exact)
    if impl == "auto":
        decision, keep = _decide(spec, sig, args, at=spec.signature(m, False))
        fn = spec.registry[decision.impl].fn
        if keep:
            _AUTO[spec.name][m] = fn
        return fn(*args)
    fn = checked_impl(spec, sig, impl)
    _FORCED[spec.name][(m, impl)] = fn
    return fn(*args)


def checked_impl(spec: OpSpec, sig: Signature, impl: str) -> Callable[..., Any]:
    """The function of a forced implementation, or an error listing why it cannot run ``sig``."""
    implementation = spec.registry[impl]  # unknown names raise, listing the valid ones
    reasons = implementation.not_supported_reasons(sig)
    if reasons:
        raise GroupedOpsError(f"{spec.name}: impl {impl!r} does not support {sig}: " + "; ".join(reasons))
    return implementation.fn


# ---- deciding ------------------------------------------------------------------------------------

def decision_for(spec: OpSpec, args: tuple[Any, ...], *, tune_allowed: bool = True) -> Decision | None:
    """The decision ``auto`` uses for these arguments (tuning if allowed and needed); None if only
    looking and nothing is known. Used by ``prewarm`` and ``lookup``."""
    spec.validate(*args)
    m = spec.meta(*args)
    sig = spec.signature(m, bucketing_mode() == "pow2")
    scoped = forced_impl(spec.name)
    if scoped:
        checked_impl(spec, sig, scoped)
        return Decision(scoped, "forced", signature=sig)
    if not tune_allowed:
        return _env_impl(spec, sig) or known_decision(spec, sig)
    decision, keep = _decide(spec, sig, args, at=spec.signature(m, False))
    if keep:
        _AUTO[spec.name][m] = spec.registry[decision.impl].fn
    return decision


def decide_signature(spec: OpSpec, sig: Signature, at: Signature | None = None) -> Decision:
    """Decide a signature with no caller tensors at hand (prewarm from a recorded file); if it must
    be tuned, time it at ``at``'s batch size (the first real call's), else at ``sig``'s."""
    return _decide(spec, sig, None, at)[0]


Progress = Callable[[int, int, Signature, str], None]  # (steps done, steps known so far, signature, what)


def prewarm_signatures(requests: Sequence[tuple[Signature, Signature | None]], *, second_opinion: bool = True,
                       progress: Progress | None = None) -> list[Decision]:
    """Decide many signatures ahead of time, each ``(signature, at)`` as for :func:`decide_signature`.

    With ``second_opinion``, every signature tuned here whose runner-up came within
    SECOND_OPINION_BAND of the winner is tuned again once all are done (its close contenders only),
    and a third time where the two picks differ; the majority is kept. The tunings lie a whole pass
    apart, so one busy spell of a shared machine cannot decide alone (see tuner.contenders). Not
    under torch.distributed, where each decision is rank 0's, agreed one signature at a time.
    """
    decisions: list[Decision] = []
    total = len(requests)
    for sig, at in requests:
        decisions.append(decide_signature(SPECS[sig.op], sig, at))
        if progress:
            progress(len(decisions), total, sig, "decided")
    s = settings()
    if not second_opinion or _distributed(s):
        return decisions
    close = {i: names for i, d in enumerate(decisions)
             if d.source == "tuned" and len(names := contenders(d.timings)) >= 2}
    opinions = {i: [TuneResult(dict(decisions[i].timings), {}, decisions[i].impl)] for i in close}
    done = total
    for which in ("second opinion", "third opinion"):
        # the third only where the first two disagree
        rerun = [i for i in close if which == "second opinion" or
                 (len(opinions[i]) == 2 and opinions[i][0].winner != opinions[i][1].winner)]
        total += len(rerun)
        for i in rerun:
            sig, at = requests[i]
            d, _ = _measure(SPECS[sig.op], sig, s, at, only=close[i])
            if d.source == "tuned" and d.timings:  # else every contender failed: no opinion
                opinions[i].append(TuneResult(dict(d.timings), dict(d.skipped), d.impl))
            done += 1
            if progress:
                progress(done, total, sig, which)
    for i in close:
        if len(opinions[i]) > 1:
            decisions[i] = _settle(SPECS[decisions[i].signature.op], decisions[i], opinions[i], s)
    return decisions


def _settle(spec: OpSpec, first: Decision, opinions: list[TuneResult], s: Settings) -> Decision:
    """Replace a first tuning's decision by the vote of all the tunings of its signature."""
    sig = first.signature
    assert sig is not None
    picks = tuple(str(o.winner) for o in opinions)
    skipped = {**first.skipped, **{n: why for o in opinions for n, why in o.skipped.items()}}
    failed = {n for o in opinions for n, why in o.skipped.items() if why.startswith(("raised", "disagrees"))}
    if failed:  # a candidate that failed in any tuning must not win
        kept = [{n: t for n, t in o.timings.items() if n not in failed} for o in opinions]
        opinions = [TuneResult(t, {}, min(t, key=t.__getitem__)) for t in kept if t]
    if opinions:
        impl, timings = vote(list(spec.registry), opinions)
        final = Decision(impl, "tuned", timings, skipped, sig, picks)
    else:
        final = Decision(spec.default_impl(sig), "default", {}, skipped, sig, picks)
        impl = final.impl
    key = sig.key()
    with _LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        _DECISIONS[key] = final
        family = _FAMILIES.setdefault(sig.family_key(), {})
        if final.source in _MEASURED:
            family[sig.dim("batch")] = final
        else:
            family.pop(sig.dim("batch"), None)
        if impl != first.impl:
            _AUTO[spec.name].clear()  # a call since the first tuning may have kept its pick
    _persist(spec, final, s)
    if impl != first.impl:
        _announce(final, s)
    return final


def known_decision(spec: OpSpec, sig: Signature) -> Decision | None:
    """Memory, disk or shipped decision for ``sig`` if there is a current one; never tunes.

    Under torch.distributed only the in-memory table counts: it holds what the ranks agreed on,
    while each rank's disk may differ. (torch.compile asks this at trace time; a rank that inlined
    its own disk's choice while another emitted the tuning custom op would leave that one waiting
    in a collective forever.)
    """
    key = sig.key()
    if key in _DECISIONS:
        return _recalled(_DECISIONS[key])
    if _distributed(settings()):
        return None
    return _from_disk(spec, sig)


def _decide(spec: OpSpec, sig: Signature, args: tuple[Any, ...] | None,
            at: Signature | None = None) -> tuple[Decision, bool]:
    """(decision, whether to remember it). Thread-safe: one tuning per signature.

    ``at`` is the exact signature of the call that asks (its real batch size): if the bucket must be
    tuned, it is timed there. Timing at the bucket's edge instead misjudged calls near a crossover
    inside the bucket (measured: 1.34x off at batch 384 tuned as 512).
    """
    env = _env_impl(spec, sig)  # documented to win over every remembered decision
    if env is not None:
        return env, True
    key = sig.key()
    known = _DECISIONS.get(key)
    if known is not None:
        return _recalled(known), True
    with _LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        known = _DECISIONS.get(key)
        if known is not None:
            return _recalled(known), True
        s = settings()
        blocker, transient = _tuning_blocker(sig, args, s)
        if not transient and _distributed(s):
            decision = _agree_across_ranks(spec, sig, s, blocker, at)
        else:
            decision = _resolve(spec, sig, s, blocker, at)
        if transient:
            return decision, False
        _DECISIONS[key] = decision
        if decision.source in _MEASURED:  # guesses must not seed further guesses
            _FAMILIES.setdefault(sig.family_key(), {})[sig.dim("batch")] = decision
        _announce(decision, s)
        return decision, True


_MEASURED = frozenset({"tuned", "cache", "broadcast"})


def _resolve(spec: OpSpec, sig: Signature, s: Settings, blocker: str | None,
             at: Signature | None = None) -> Decision:
    found = _from_disk(spec, sig, allow_stale=blocker is not None)
    if found is not None and found.source == "cache":
        return found
    if blocker is None:
        return _tune(spec, sig, s, at)
    if found is not None:
        return found  # stale, but better than a guess when we may not tune
    near = _nearest(spec, sig, s)
    if near is not None:
        return near
    return Decision(spec.default_impl(sig), "default", skipped={"(tuning)": blocker}, signature=sig)


def _from_disk(spec: OpSpec, sig: Signature, allow_stale: bool = False) -> Decision | None:
    key = sig.key()
    current = _store.fingerprint(_impl_set_version(spec))
    stale: Decision | None = None
    for entry in (_store.DiskStore().get(key), _store.shipped_entries().get(key)):
        if entry is None or entry["impl"] not in spec.registry:
            continue
        if not spec.registry[entry["impl"]].supports(sig):
            continue
        fresh = entry.get("fingerprint") == current
        decision = Decision(entry["impl"], "cache" if fresh else "stale",
                            {k: float(v) for k, v in entry.get("timings", {}).items()},
                            dict(entry.get("skipped", {})), sig, tuple(map(str, entry.get("opinions", ()))))
        if fresh:
            return decision
        stale = stale or decision
    return stale if allow_stale else None


def _nearest(spec: OpSpec, sig: Signature, s: Settings) -> Decision | None:
    family = _FAMILIES.get(sig.family_key())
    if not family:
        return None
    target = math.log2(max(sig.dim("batch"), 1))
    batch = min(family, key=lambda b: (abs(math.log2(max(b, 1)) - target), b))
    d = family[batch]
    implementation = spec.registry[d.impl]
    # workspace can grow with the batch (weighted_combine's masked_dense is quadratic in it)
    if not implementation.supports(sig) or implementation.extra_memory(sig) > memory_budget(sig.device, s):
        return None
    return Decision(d.impl, "nearest", d.timings, {"(nearest)": f"tuned at batch={batch}"}, sig)


def _tuning_blocker(sig: Signature, args: tuple[Any, ...] | None, s: Settings) -> tuple[str | None, bool]:
    """(why tuning is not allowed here or None, whether that reason passes)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "tracing (torch.compile / torch.jit)", True
    if sig.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "capturing a CUDA graph", True
    if args is not None and _has_fake(args):
        return "fake tensors", True
    if sig.device_type == "meta":  # shape-only runs (e.g. building a model on meta): nothing to time
        return "meta tensors", True
    if not s.autotune:
        return "autotune switched off (GROUPED_OPS_AUTOTUNE=0)", False
    if sig.device_type not in ("cpu", "cuda"):
        return f"no timer for device type {sig.device_type!r}", False
    if any(v == 0 for _, v in sig.dims):
        return "empty input: nothing to time", False
    return None, False


def _has_fake(args: tuple[Any, ...]) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - very old or very new torch
        return False
    flat = [a for x in args for a in (x if isinstance(x, (list, tuple)) else (x,))]
    return any(isinstance(a, FakeTensor) for a in flat)


def _env_impl(spec: OpSpec, sig: Signature) -> Decision | None:
    """GROUPED_OPS_IMPL=bmm (every op that has it) or GROUPED_OPS_IMPL=grouped_linear=loop,weighted_combine=bmm."""
    raw = os.environ.get("GROUPED_OPS_IMPL", "").strip()
    if not raw:
        return None
    chosen = None
    for part in raw.split(","):
        op, _, name = part.strip().rpartition("=")
        if op in ("", spec.name) and name in spec.registry:
            chosen = name
        elif (op not in ("", *SPECS) or (op == spec.name and name not in spec.registry)
              or (op == "" and not any(name in s.registry for s in SPECS.values()))):  # a typo
            raise GroupedOpsError(f"GROUPED_OPS_IMPL={raw!r}: cannot use {part!r}; {spec.name} "
                                  f"implementations are {list(spec.registry)}")
    if chosen is None:
        return None
    checked_impl(spec, sig, chosen)
    return Decision(chosen, "env", signature=sig)


# ---- tuning --------------------------------------------------------------------------------------

_TOLERANCE = {torch.float64: 1e-7, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _compare(dtype: torch.dtype) -> Callable[[Any, Any], str | None]:
    tol = _TOLERANCE.get(dtype, 1e-2)

    def check(ref: Any, got: Any) -> str | None:
        for i, (a, b) in enumerate(zip(ref, got, strict=False)):
            if a.shape != b.shape:
                return f"result {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            if a.numel() == 0:
                continue
            a64, b64 = a.detach().double(), b.detach().double()
            err = (a64 - b64).norm() / a64.norm().clamp_min(1e-30)
            if not bool(err <= tol):  # also false for nan
                return f"relative error {float(err):.2e} in result {i} (tolerance {tol:g})"
        return None

    return check


# Where a call this long is bound by arithmetic, so that doing 10x the arithmetic cannot win. CPU:
# in every sweep cell (122) with a leader of 1 ms or more, masked_dense at 10x+ the arithmetic was
# at least 1.21x slower, and its long calls used up the budget and slowed the next candidate timed.
# CUDA: not measured yet, so not assumed (a dense GEMM can beat a badly occupied batched one).
_ARITHMETIC_BOUND_S = {"cpu": 1e-3}


def _tune(spec: OpSpec, sig: Signature, s: Settings, at: Signature | None = None) -> Decision:
    decision, keep = _measure(spec, sig, s, at)
    return _persist(spec, decision, s) if keep else decision


def _measure(spec: OpSpec, sig: Signature, s: Settings, at: Signature | None = None,
             only: Collection[str] | None = None) -> tuple[Decision, bool]:
    """Time the candidates (or ``only`` these) for ``sig``: (decision, whether it may be persisted)."""
    timed = at if at is not None and at.dim("batch") > 0 else sig  # what the candidates run on
    skipped: dict[str, str] = {}
    budget = memory_budget(sig.device, s)
    candidates = []
    for name, implementation in spec.registry.items():
        if only is not None and name not in only:
            continue
        reasons = implementation.not_supported_reasons(sig)
        if reasons:
            skipped[name] = "unsupported: " + "; ".join(reasons)
        elif (need := implementation.extra_memory(timed)) > budget:
            skipped[name] = (f"needs {need / 2**30:.2f} GiB of workspace, over the tuning memory budget "
                             f"of {budget / 2**30:.2f} GiB (GROUPED_OPS_TUNE_MEMORY_FRACTION/_BYTES)")
        else:
            candidates.append(name)
    if len(candidates) <= 1:
        impl = candidates[0] if candidates else spec.default_impl(sig)
        return Decision(impl, "tuned" if candidates else "default", {}, skipped, sig), True

    generator = torch.Generator(device=sig.device).manual_seed(0)  # private: the caller's RNG is untouched
    with torch.autocast(sig.device_type, enabled=False):
        args = spec.make_inputs(timed, generator)
        targets = spec.grad_args(timed, args)
        grad_out: list[torch.Tensor] = []

        def make_run(name: str) -> Callable[[], Any]:
            fn = spec.registry[name].fn
            if not sig.needs_grad:
                def run() -> Any:
                    with torch.no_grad():
                        return (fn(*args),)
                return run

            def run_with_grad() -> Any:
                with torch.enable_grad():
                    out = fn(*args)
                    if not grad_out:
                        grad_out.append(torch.randn(out.shape, dtype=out.dtype, device=out.device,
                                                    generator=generator))
                    grads = torch.autograd.grad(out, targets, grad_out[0])
                    # Training accumulates into .grad in each tensor's own layout: AccumulateGrad
                    # copies a gradient whose strides differ. Time that copy too, or implementations
                    # whose gradients come out transposed look cheaper than they are (measured: bmm
                    # chosen at 0.47 ms, 2.8x slower than grouped_mm in a real .backward() step).
                    grads = tuple(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
                                  for g, t in zip(grads, targets, strict=True))
                return (out.detach(), *grads)
            return run_with_grad

        result = tune(
            candidates,
            make_run=make_run,
            timer=_TIMER[-1] if _TIMER else timer_for(sig.device),
            check=_compare(sig.dtype),
            work_factor={n: spec.registry[n].work_factor(timed) for n in candidates},
            budget_s=s.budget_s,
            max_reps=s.max_reps,
            arithmetic_bound_s=_ARITHMETIC_BOUND_S.get(sig.device_type),
            on_error=lambda e: _after_error(sig, e),
        )
    skipped.update(result.skipped)
    for name, why in result.skipped.items():
        if why.startswith(("disagrees", "raised")):
            log.warning("grouped_ops: %s: excluded %s while tuning %s: %s", spec.name, name, sig, why)
    if result.winner is None:
        return Decision(spec.default_impl(sig), "default", {}, skipped, sig), False
    return Decision(result.winner, "tuned", result.timings, skipped, sig), True


def _after_error(sig: Signature, e: BaseException) -> None:
    if sig.device_type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()


def _persist(spec: OpSpec, decision: Decision, s: Settings) -> Decision:
    if not s.autotune or decision.signature is None or _rank() not in (None, 0):
        return decision
    _store.DiskStore().put(entry_for(spec, decision))
    return decision


def entry_for(spec: OpSpec, decision: Decision) -> dict[str, Any]:
    sig = decision.signature
    assert sig is not None
    return {
        "key": sig.key(),
        "signature": sig.to_spec(),
        "impl": decision.impl,
        "timings": dict(decision.timings),
        "skipped": dict(decision.skipped),
        **({"opinions": list(decision.opinions)} if decision.opinions else {}),
        "fingerprint": _store.fingerprint(_impl_set_version(spec)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _impl_set_version(spec: OpSpec) -> str:
    return f"{spec.name}:v{spec.registry.version}:{','.join(spec.registry)}"


def _with_source(d: Decision, source: str) -> Decision:
    return d if d.source == source else dataclasses.replace(d, source=source)


def _recalled(d: Decision) -> Decision:
    """A remembered decision as a later call reports it: what this process tuned now comes from the
    cache; a guess (default, nearest, stale) or rank 0's broadcast keeps saying what it is."""
    return _with_source(d, "cache") if d.source == "tuned" else d


def _announce(d: Decision, s: Settings) -> None:
    line = f"grouped_ops: {d.signature} -> {d.impl} ({d.source})"
    log.info(line)
    if s.verbose:
        print(line, file=sys.stderr)


# ---- distributed: every rank uses rank 0's choice -------------------------------------------------

def _rank() -> int | None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return None


def _distributed(s: Settings) -> bool:
    dist = torch.distributed
    return s.distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _agree_across_ranks(spec: OpSpec, sig: Signature, s: Settings, blocker: str | None,
                        at: Signature | None = None) -> Decision:
    # Each process reaches here exactly once per signature (its first sight of it), whatever its own
    # caches hold, so the ranks meet in the same collective. Rank 0 decides; the others adopt it.
    dist = torch.distributed
    rank = dist.get_rank()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if rank == 0:
        try:
            d = _resolve(spec, sig, s, blocker, at)
            box[0] = json.dumps({"impl": d.impl, "source": d.source, "timings": dict(d.timings),
                                 "skipped": dict(d.skipped)})
        except BaseException as e:  # the other ranks are already waiting: tell them, then raise
            failure = e
            box[0] = json.dumps({"error": f"{type(e).__name__}: {e}"})
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    data = json.loads(box[0])
    if "error" in data:
        raise GroupedOpsError(f"{spec.name}: rank 0 failed to decide {sig}: {data['error']}")
    if rank != 0 and not spec.registry[data["impl"]].supports(sig):
        # a rank on different hardware: keep working, on its own choice
        log.warning("grouped_ops: %s: rank 0 chose %s for %s, which this rank cannot run; deciding locally",
                    spec.name, data["impl"], sig)
        return _resolve(spec, sig, s, blocker)
    source = data["source"] if rank == 0 else "broadcast"
    return Decision(data["impl"], source, data["timings"], data["skipped"], sig)


# ---- test and recording hooks --------------------------------------------------------------------

@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Time candidates with ``timer`` inside the block (tests use a fake one: deterministic, no GPU)."""
    _TIMER.append(timer)
    try:
        yield
    finally:
        _TIMER.remove(timer)


def clear_memory() -> None:
    """Forget every in-memory decision (the disk cache is untouched)."""
    with _LOCK:
        for table in (*_AUTO.values(), *_FORCED.values()):
            table.clear()
        _DECISIONS.clear()
        _FAMILIES.clear()
        _KEY_LOCKS.clear()
    _store.shipped_entries.cache_clear()


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

    def requests(self) -> list[tuple[Signature, Signature]]:
        """(signature, its first call's exact signature) pairs, in the order first seen."""
        return [(sig, self._first_call[sig]) for sig in self.signatures]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the signatures as JSON lines, for ``python -m grouped_ops prewarm --from FILE``.
        ``tune_at_batch`` is the first call's batch size (a bucket is timed there, not at its edge)."""
        with open(path, "w", encoding="utf-8") as f:
            for sig, exact in self.requests():
                f.write(json.dumps({**sig.to_spec(), "tune_at_batch": exact.dim("batch")}) + "\n")

    def prewarm(self, *, second_opinion: bool = True, progress: bool = False) -> list[Decision]:
        """Decide every recorded signature now, in this process (see :func:`prewarm_signatures`);
        ``progress`` shows a progress bar on stderr."""
        with progress_bar(progress) as report:
            return prewarm_signatures(self.requests(), second_opinion=second_opinion, progress=report)


@contextlib.contextmanager
def progress_bar(show: bool) -> Iterator[Progress | None]:
    """A :data:`Progress` callback drawing a tqdm bar on stderr (None when not ``show``)."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, desc="prewarm", unit="tuning", file=sys.stderr)

    def report(done: int, total: int, sig: Signature, what: str) -> None:
        bar.total = total
        bar.set_postfix_str(f"{sig.op} batch={sig.dim('batch')} {what}", refresh=False)
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        bar.close()


@contextlib.contextmanager
def record() -> Iterator[Recorder]:
    """Capture every signature the ops see inside the block.

    Example:
        >>> with grouped_ops.record() as rec:
        ...     model(example_batch)
        >>> rec.save("signatures.jsonl")   # later: python -m grouped_ops prewarm --from signatures.jsonl
    """
    rec = Recorder()
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)
