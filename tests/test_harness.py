"""The tuning harness: out-of-memory at every step of a tuning is contained, and a partial result is
never stored; the agreement check's own memory stays small."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FakeTimer, gl_args

import grouped_ops
from grouped_ops import dispatch, grouped_linear
from grouped_ops.ops import SPECS
from grouped_ops.tuning import harness, memory, store
from grouped_ops.tuning.settings import settings

GL = SPECS["grouped_linear"]


def timer(name, fn, number):
    fn()  # run it: a failure inside the candidate must surface here
    return {"einsum": 1e-6}.get(name, 1e-4)


def args(batch=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, 8, generator=g), torch.randn(4, 8, 8, generator=g).requires_grad_(),
            torch.randn(4, 8, generator=g))


def oom(*_a, **_k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def stored() -> list[str]:
    return sorted(e["impl"] for e in store.DiskStore().entries())


def test_oom_making_the_private_inputs_gives_the_leanest_and_stores_nothing(monkeypatch):
    def make_inputs(sig, generator):
        return oom()

    spec = dataclass_replace(GL, make_inputs=make_inputs)
    with dispatch.use_timer(timer):
        decision, persist = harness.measure(spec, sig_of(), settings())
    lean = memory.leanest(GL, sig_of(), [n for n, i in GL.registry.items() if i.supports(sig_of())])
    assert (decision.impl, decision.source, persist) == (lean, "default", False)
    assert "out of memory" in decision.skipped["(inputs)"] and decision.partial == "out of memory: (inputs)"


@pytest.mark.parametrize("step", ["forward", "backward"])
def test_oom_in_one_candidate_excludes_it_and_the_decision_is_stored_partial_not_full(step):
    implementation = GL.registry["einsum"]
    real = implementation.fn

    def failing(x, w, b):
        if step == "forward":
            oom()
        y = real(x, w, b)
        return _OomInBackward.apply(y)

    object.__setattr__(implementation, "fn", failing)  # a frozen dataclass: patched by hand, restored below
    try:
        with dispatch.use_timer(timer):
            y = grouped_linear(*args())
            d = grouped_ops.lookup("grouped_linear", *args())
    finally:
        object.__setattr__(implementation, "fn", real)
    assert y.shape == (8, 4, 8)
    assert d.impl != "einsum" and d.skipped["einsum"].startswith("raised OutOfMemoryError")
    # stored in the partial state (a new process does not pay the failed tuning again, and one later
    # process re-tunes it once), never as a full decision
    (entry,) = list(store.DiskStore().entries())
    assert entry["partial"] == "out of memory: einsum" and entry["tunings"] == 1


def test_oom_in_the_agreement_check_is_contained(monkeypatch):
    real = harness.compare

    def check_factory(dtype):
        check = real(dtype)
        calls = [0]

        def failing(ref, got):
            calls[0] += 1
            if calls[0] == 2:
                oom()
            return check(ref, got)

        return failing

    monkeypatch.setattr(harness, "compare", check_factory)
    with dispatch.use_timer(timer):
        y = grouped_linear(*args())
    assert y.shape == (8, 4, 8)
    assert [e.get("partial") for e in store.DiskStore().entries()] == ["out of memory: (agreement check)"]


def test_the_agreement_check_computes_in_float32_for_half_precision():
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        out = real_to(self, *a, **k)
        seen.append(out.dtype)
        return out

    check = harness.compare(torch.bfloat16)
    a, b = torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4, dtype=torch.bfloat16)
    torch.Tensor.to = spy
    try:
        assert check((a,), (a,)) is None and check((a,), (b,)) is not None
    finally:
        torch.Tensor.to = real_to
    assert seen and set(seen) == {torch.float32}


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        oom()


def sig_of():
    m = GL.meta(*args())
    return GL.signature(m, True)


def dataclass_replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


@pytest.mark.gpu
def test_a_first_call_under_sync_debug_error_tunes_every_candidate():
    x, w, b = (t.cuda() for t in args())
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouped_linear(x, w, b)  # the tuning's host reads are exempt; the user's call has none
    finally:
        torch.cuda.set_sync_debug_mode(0)
    d = grouped_ops.lookup("grouped_linear", x, w, b)
    assert not [n for n, why in d.skipped.items() if why.startswith(("raised", "disagrees"))], d.skipped


def test_the_private_operands_count_against_the_memory_budget(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "1000")  # less than the private inputs need
    with dispatch.use_timer(timer):
        y = grouped_linear(*args())
    d = grouped_ops.lookup("grouped_linear", *args())
    assert y.shape == (8, 4, 8) and d.source == "default" and "private operands" in d.skipped["einsum"]


# ---- what a CUDA tuning leaves reserved (issue 14, item 5), simulated ----------------------------

class _Allocator:
    """A fake CUDA caching allocator: reserved bytes per device and the empty_cache calls."""

    def __init__(self, monkeypatch, reserved: int = 1000) -> None:
        self.reserved, self.emptied, self.asked = reserved, 0, []
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: self.asked.append(i) or self.reserved)
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)

    def empty(self) -> None:
        self.emptied += 1


@pytest.mark.parametrize("grow, emptied", [(500, 1), (0, 0), (-200, 0)])
def test_a_cuda_tuning_hands_back_only_what_it_made_the_cache_reserve(monkeypatch, grow, emptied):
    alloc = _Allocator(monkeypatch)

    def fake_measure(spec, sig, *rest):  # masked_dense's workspace, say, grew the cache by `grow`
        alloc.reserved += grow
        return "decision", True

    monkeypatch.setattr(harness, "_measure", fake_measure)
    sig = GL.signature(GL.meta(*args()), True)
    sig = dataclass_replace(sig, device=torch.device("cuda:1"))
    assert harness.measure(GL, sig, settings()) == ("decision", True)
    assert alloc.emptied == emptied and alloc.asked == [1, 1]  # the tensors' device, not the current one
    with harness.releasing_cache(torch.device("cuda")):  # "cuda": the current device
        alloc.reserved += 1
    assert alloc.emptied == emptied + 1 and alloc.asked[-1] == 3
    with harness.releasing_cache(torch.device("cpu")):  # nothing to ask on CPU
        pass
    assert len(alloc.asked) == 4


def test_a_reduce_overhead_warmup_is_recognised(monkeypatch):
    import sys
    import types

    stream = object()
    manager = types.SimpleNamespace(in_warmup=True, stream=stream)
    containers = {0: types.SimpleNamespace(tree_manager=manager)}
    trees = types.SimpleNamespace(local=None, get_obj=lambda local, name: containers)
    cuda0 = torch.device("cuda:0")
    monkeypatch.delitem(sys.modules, "torch._inductor.cudagraph_trees", raising=False)
    assert not harness.cudagraph_warmup(cuda0)  # never loaded: no compiled graph can be warming up
    monkeypatch.setitem(sys.modules, "torch._inductor.cudagraph_trees", trees)
    current = {"stream": stream}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda i=None: current["stream"])
    assert harness.cudagraph_warmup(cuda0)  # the tree's warm-up stream is current: inside its warm-up
    assert not harness.cudagraph_warmup(torch.device("cuda:1"))  # another device's tree: none
    assert not harness.cudagraph_warmup(torch.device("cpu"))
    current["stream"] = object()  # warmed up earlier, but this call runs outside it (eager)
    assert not harness.cudagraph_warmup(cuda0)
    current["stream"], manager.in_warmup = stream, False  # recording or replaying: capture is refused elsewhere
    assert not harness.cudagraph_warmup(cuda0)
    trees.get_obj = lambda local, name: 1 / 0  # torch changed its internals: no crash, no claim
    assert not harness.cudagraph_warmup(cuda0)


def test_an_implementation_that_runs_anothers_code_is_not_timed_twice(monkeypatch):
    # an implementation that is bmm in training (Implementation.runs_as): one timing for the two names
    registry = SPECS["grouped_linear"].registry
    bmm = registry["bmm"]
    twin = dataclasses.replace(bmm, name="bmm_twin", runs_as=lambda sig: "bmm" if sig.needs_grad else None)
    monkeypatch.setitem(registry._impls, "bmm_twin", twin)
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        trained = grouped_ops.prewarm("grouped_linear", *gl_args(grad=True))
        inferred = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert "bmm_twin" not in trained.timings and "bmm" in trained.timings
    assert trained.skipped["bmm_twin"] == "runs bmm's code for this signature (timed as bmm)"
    assert "bmm_twin" in inferred.timings
    with grouped_ops.exclude_impls(grouped_linear="bmm"), dispatch.use_timer(FakeTimer()):  # then it is timed
        assert "bmm_twin" in grouped_ops.prewarm("grouped_linear", *gl_args(batch=100, grad=True)).timings
