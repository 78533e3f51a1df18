"""Timing an op's candidates on private inputs, isolated from whatever context the caller is in.

The first call of a signature can happen anywhere: under activation checkpointing (saved-tensor
hooks), a TorchDispatchMode or TorchFunctionMode (flop counters, ``torch.device`` contexts),
autocast, anomaly mode, ``inference_mode`` or a profiler. :func:`isolated` gives the tuning a clean
context and restores the caller's exactly; what cannot be left (a profiler) is labelled and makes
the decision provisional (used, never stored, tuned again after the profiler). Contexts the tuning cannot run in at all (tracing, torch.func
transforms, CUDA graph capture, fake or meta tensors) are refused earlier, by the resolver.

Knows no op by name: it receives the op's spec (registry, private inputs, gradient targets).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..decision import Decision
from ..registry import tolerance
from ..signature import Signature, applied_numerics
from . import memory
from .settings import Settings, memory_budget
from .timer import Timer, timer_for
from .tuner import tune

log = logging.getLogger("grouped_ops")

# Where a call this long is bound by arithmetic, so that doing 10x the arithmetic cannot win. CPU:
# in every sweep cell (122) with a leader of 1 ms or more, masked_dense at 10x+ the arithmetic was
# at least 1.21x slower, and its long calls used up the budget and slowed the next candidate timed.
# CUDA: not measured yet, so not assumed (a dense GEMM can beat a badly occupied batched one).
_ARITHMETIC_BOUND_S = {"cpu": 1e-3}


def profiling() -> bool:
    """Whether a torch profiler is recording (every call is slowed, so timings are not normal)."""
    return bool(torch.autograd.profiler._is_profiler_enabled)


@contextlib.contextmanager
def isolated(label: str) -> Iterator[None]:
    """A clean context for the tuning's own work, inside one ``record_function(label)``.

    Popped for the block and restored after: the caller's TorchDispatchModes and TorchFunctionModes
    (so a FlopCounterMode counts only the user's call), saved-tensor hooks (so checkpointing does
    not pack the private tensors), autocast, anomaly mode, inference mode and CUDA's sync-debug
    mode. The caller's RNG is never drawn from: the private inputs use their own generator.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())
        stack.enter_context(no_function_modes())
        stack.enter_context(_no_saved_tensor_hooks())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.autograd.set_detect_anomaly(False))
        for device_type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(_no_sync_debug())
        stack.enter_context(torch.autograd.profiler.record_function(label))
        yield


@contextlib.contextmanager
def _no_sync_debug() -> Iterator[None]:
    # A user's torch.cuda.set_sync_debug_mode("error") would make the agreement check (which reads
    # a result on the host, once per candidate, at tuning time only) raise for every candidate.
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def no_function_modes() -> Iterator[None]:
    """The caller's TorchFunctionModes popped for the block (they see Tensor methods too)."""
    popped = []
    try:
        while torch._C._len_torch_function_stack() > 0:
            popped.append(torch._C._pop_torch_function_stack())
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_function_stack(mode)


@contextlib.contextmanager
def _no_saved_tensor_hooks() -> Iterator[None]:
    # The innermost default hooks are the ones used; identity hooks on top hide the caller's.
    autograd = torch._C._autograd
    if not autograd._saved_tensors_hooks_is_enabled():  # nobody may add hooks here, so none to hide
        yield
        return
    autograd._push_saved_tensors_default_hooks(_identity, _identity)
    try:
        yield
    finally:
        autograd._pop_saved_tensors_default_hooks()


def _identity(t: Any) -> Any:
    return t


def compare(dtype: torch.dtype) -> Callable[[Any, Any], str | None]:
    """The agreement check between candidates: relative error in each result under the tolerance
    for ``dtype``. Computed in float32 at most (float64 only for float64), a piece of at most
    :data:`COMPARE_PIECE` elements at a time, so it needs little memory beside the two results."""
    tol = tolerance(dtype).agree

    def check(ref: Any, got: Any) -> str | None:
        for i, (a, b) in enumerate(zip(ref, got, strict=False)):
            if a.shape != b.shape:
                return f"result {i} has shape {tuple(b.shape)}, expected {tuple(a.shape)}"
            if a.numel() == 0:
                continue
            wide = torch.float64 if a.dtype == torch.float64 else torch.float32
            diff2 = norm2 = 0.0
            pa, pb = _flat(a.detach(), b.detach())
            for ca, cb in zip(pa.split(COMPARE_PIECE), pb.split(COMPARE_PIECE), strict=True):
                ca_ = ca.to(wide)
                diff2 += float(torch.linalg.vector_norm(ca_ - cb.to(wide))) ** 2
                norm2 += float(torch.linalg.vector_norm(ca_)) ** 2
            err = diff2 ** 0.5 / max(norm2 ** 0.5, 1e-30)
            if not err <= tol:  # also false for nan
                return f"relative error {err:.2e} in result {i} (tolerance {tol:g})"
        return None

    return check


COMPARE_PIECE = 1 << 18  # elements of each result compared at a time (1 MiB in float32)


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` (one shape) as 1-D tensors whose elements correspond: views where both are
    one dense layout (a permutation of contiguous, as results and gradients are), else copies."""
    if a.stride() == b.stride():
        order = sorted(range(a.dim()), key=lambda d: -a.stride(d))
        pa, pb = a.permute(order), b.permute(order)
        if pa.is_contiguous() and pb.is_contiguous():
            return pa.reshape(-1), pb.reshape(-1)
    return a.reshape(-1), b.reshape(-1)


def _is_oom(e: BaseException) -> bool:
    return memory.is_oom(e)


def measure(spec: Any, sig: Signature, s: Settings, at: Signature | None = None,
            only: Collection[str] | None = None, excluded: Collection[str] = (),
            timer: Timer | None = None) -> tuple[Decision, bool]:
    # under the signature's math settings: one read from a recording may have been made under others
    with isolated(f"grouped_ops.tune {sig}"), applied_numerics(sig), releasing_cache(sig.device):
        try:
            return _measure(spec, sig, s, at, only, excluded, timer)
        finally:  # the private tensors are dead: their pages go back before the caller's call runs
            memory.release_freed(sig.device)


@contextlib.contextmanager
def releasing_cache(device: torch.device) -> Iterator[None]:
    """On CUDA: where the block (a tuning; its private tensors are dead when it ends) left the
    caching allocator holding more than before, ``empty_cache``, so that a one-off workspace
    (masked_dense's block-diagonal weight, the timer's L2 buffer) is not kept reserved. That also
    returns blocks the caller's cache held unused before: one cudaMalloc later, once per tuning."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    before = torch.cuda.memory_reserved(index)
    try:
        yield
    finally:
        if torch.cuda.memory_reserved(index) > before:
            torch.cuda.empty_cache()


def cudagraph_warmup(device: torch.device) -> bool:
    """Whether this thread runs a ``torch.compile(mode="reduce-overhead")`` warm-up on ``device``: a
    cudagraph tree in its warm-up state, with its private stream current. Its allocations go to the
    graph's private memory pool, which keeps a tuning's peak for the graph's lifetime. Reads torch
    internals (torch._inductor.cudagraph_trees, only if loaded); any surprise reads as False."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or device.type != "cuda":
        return False
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        container = trees.get_obj(trees.local, "tree_manager_containers").get(index)
        manager = getattr(container, "tree_manager", None)
        return bool(manager is not None and manager.in_warmup and torch.cuda.current_stream(index) == manager.stream)
    except Exception:  # noqa: BLE001 - private API: a change in torch must not break a call
        return False


def _measure(spec: Any, sig: Signature, s: Settings, at: Signature | None,
             only: Collection[str] | None, excluded: Collection[str],
             timer: Timer | None) -> tuple[Decision, bool]:
    """Time the candidates (``only`` these, none of ``excluded``) for ``sig``, in an isolated
    context: (decision, whether it may be persisted; where not, ``Decision.not_stored`` says why).

    ``at`` is the exact signature of the call that asked (a bucket is timed at its real batch size).
    Candidates over the memory bounds are not timed (:func:`.memory.admit`); where the memory free
    now left some out, or one ran out of memory, the decision is partial (``Decision.partial``,
    ``"out of memory: ..."``), and where none could be timed for memory, the call runs the leanest.
    A tuning whose timings stayed unstable to the end of its budget is partial too, ``"noise"``.
    A partial decision is stored, and re-tuned once by a later process. Not persisted: a tuning where
    no candidate ran, or one timed under a profiler (provisional: used until one more tuning after
    the profiler).
    """
    timed = at if at is not None and at.dim("batch") > 0 else sig  # what the candidates run on
    skipped: dict[str, str] = {}
    supported = []
    for name, implementation in spec.registry.items():
        if (only is not None and name not in only) or name in excluded:
            continue
        reasons = implementation.not_supported_reasons(sig)
        if reasons:
            skipped[name] = "unsupported: " + "; ".join(reasons)
        else:
            supported.append(name)
    # A candidate's footprint is bounded by the leanest's, and with the tuning's own private
    # operands by the memory free now (tuning/memory.py)
    budget = memory_budget(sig.device, s)
    candidates, over, no_room = memory.admit(spec, timed, supported, s, budget)
    skipped.update(over)
    for name in list(candidates):  # one timing for code that two names run (see Implementation.runs_as)
        other = spec.registry[name].runs_as(sig)
        if other in candidates and other != name:
            candidates.remove(name)
            skipped[name] = f"runs {other}'s code for this signature (timed as {other})"
    partial = memory.oom_partial(no_room) if no_room else ""
    if not candidates and no_room:  # nothing fits: the leanest, not the default (which may need more)
        impl = memory.nothing_fits(spec, timed, supported, budget)
        return Decision(impl, "default", {}, skipped, sig, partial=partial), True
    if len(candidates) <= 1:
        impl = candidates[0] if candidates else default_allowed(spec, sig, excluded)
        return Decision(impl, "tuned" if candidates else "default", {}, skipped, sig, partial=partial), True

    provisional = profiling()
    ooms: list[str] = []  # the candidates that ran out of memory ("(...)" for the tuning's own steps)
    noted: set[int] = set()  # the errors a candidate's run raised (named there)

    def after_error(e: BaseException, where: str = "(agreement check)") -> None:
        if memory.is_oom(e):
            if id(e) not in noted:
                ooms.append(where)
            if sig.device_type == "cuda":
                torch.cuda.empty_cache()

    try:
        generator = torch.Generator(device=sig.device).manual_seed(0)
        args = spec.make_inputs(timed, generator)
        targets = spec.grad_args(timed, args)
        memory.release_freed(sig.device)
    except Exception as e:
        if not memory.is_oom(e):
            raise
        after_error(e, "(inputs)")
        skipped["(inputs)"] = f"out of memory making the private inputs: {str(e).splitlines()[0][:120]}"
        impl = memory.nothing_fits(spec, timed, supported, budget)
        return Decision(impl, "default", {}, skipped, sig, partial=memory.oom_partial([*no_room, *ooms]),
                        not_stored="out of memory making the private inputs"), False
    grad_out: list[torch.Tensor] = []

    def make_run(name: str) -> Callable[[], Any]:  # called just before the candidate's first run
        memory.release_freed(sig.device)  # what the previous candidate freed (see there)
        run = _make_run(name)

        def noting_oom() -> Any:
            try:
                return run()
            except Exception as e:
                if memory.is_oom(e):
                    ooms.append(name)
                    noted.add(id(e))
                raise
        return noting_oom

    # What the dispatcher's memo will run for such calls: each implementation's prepared function
    # where it has one (bmm's skips ~10 us of per-call Python: timed without it, bmm lost close
    # calls to einsum that it wins by 15-20% in use, 8 x 24 160->160 at two threads)
    with torch.set_grad_enabled(sig.needs_grad):
        described = spec.meta(*args)

    def _make_run(name: str) -> Callable[[], Any]:
        implementation = spec.registry[name] if described is None else spec.registry[name].prepared(described)
        if not sig.needs_grad:
            def run() -> Any:
                with torch.no_grad():
                    return (implementation(*args),)
            return run

        def run_with_grad() -> Any:
            with torch.enable_grad():
                out = implementation(*args)
                if not grad_out:
                    grad_out.append(torch.randn(out.shape, dtype=out.dtype, device=out.device,
                                                generator=generator))
                grads = as_accumulated(torch.autograd.grad(out, targets, grad_out[0]), targets)
            return (out.detach(), *grads)
        return run_with_grad

    result = tune(
        candidates,
        make_run=make_run,
        timer=memory.guarded(timer or timer_for(sig.device), sig.device),
        check=compare(sig.dtype),
        work_factor={n: spec.registry[n].work_factor(timed) for n in candidates},
        budget_s=s.budget_s,
        max_reps=s.max_reps,
        arithmetic_bound_s=_ARITHMETIC_BOUND_S.get(sig.device_type),
        on_error=after_error,
    )
    skipped.update(result.skipped)
    for name, why in result.skipped.items():
        if why.startswith(("disagrees", "raised")):
            log.warning("grouped_ops: %s: excluded %s while tuning %s: %s", spec.name, name, sig, why)
    if ooms or no_room:
        partial = memory.oom_partial([*no_room, *ooms])
    if result.winner is None:
        impl = memory.nothing_fits(spec, timed, supported, budget) if ooms else default_allowed(spec, sig, excluded)
        return Decision(impl, "default", {}, skipped, sig, partial=partial, not_stored="no candidate ran"), False
    if result.noisy:
        log.info("grouped_ops: %s: the timings of close candidates stayed unstable to the end of the "
                 "tuning budget while tuning %s; marked as measured under noise", spec.name, sig)
    # A candidate that ran out of memory leaves a partial decision (among the ones that fitted), and
    # so does noise: stored as partial, never as a full one; out of memory names the cause first.
    partial = partial or ("noise" if result.noisy else "")
    not_stored = "timed under a profiler (provisional): tuned again after it" if provisional else ""
    decision = Decision(result.winner, "tuned", result.timings, skipped, sig, provisional=provisional,
                        partial=partial, not_stored=not_stored)
    return decision, not not_stored


def admits_more(spec: Any, sig: Signature, s: Settings, timed: Collection[str]) -> bool:
    """Whether a tuning of ``sig`` now would time a supported candidate that is not in ``timed``
    (a decision left partial for memory is worth tuning again only then: under the same limits a
    new process would time the same candidates, or none)."""
    supported = [name for name, implementation in spec.registry.items() if implementation.supports(sig)]
    admitted = memory.admit(spec, sig, supported, s, memory_budget(sig.device, s))[0]
    return any(name not in timed for name in admitted)


def private_bytes(spec: Any, sig: Signature) -> int:
    """Bytes a tuning of ``sig`` holds besides the candidate it runs (see :mod:`.memory`)."""
    return memory.private_bytes(spec, sig)


def default_allowed(spec: Any, sig: Signature, excluded: Collection[str] = ()) -> str:
    """The op's default rule, or where that is excluded, the first supported implementation left."""
    name = spec.default_impl(sig)
    if name not in excluded:
        return name
    for other, implementation in spec.registry.items():
        if other not in excluded and implementation.supports(sig):
            return other
    log.warning("grouped_ops: %s: every implementation that can run %s is excluded; running the "
                "default rule's %s anyway", spec.name, sig, name)
    return name  # the exclusion cannot be honoured: the default still runs


def as_accumulated(grads: tuple[torch.Tensor, ...], targets: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``grads`` of ``targets`` as ``.backward()`` leaves them: AccumulateGrad copies a gradient
    whose strides differ from its tensor's into that tensor's layout. Timing that copy too keeps
    implementations whose gradients come out transposed from looking cheaper than they are
    (measured: bmm chosen at 0.47 ms, 2.8x slower than grouped_mm in a real ``.backward()`` step)."""
    return tuple(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
                 for g, t in zip(grads, targets, strict=True))
