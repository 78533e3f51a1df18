"""The tuning harness: out-of-memory at every step of a tuning is contained, and a partial result is
never stored; the agreement check's own memory stays small."""

from __future__ import annotations

import pytest
import torch

import grouped_ops
from grouped_ops import dispatch, grouped_linear
from grouped_ops.ops import SPECS
from grouped_ops.tuning import harness, store
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


def test_oom_making_the_private_inputs_gives_the_default_and_stores_nothing(monkeypatch):
    def make_inputs(sig, generator):  # sizing them on the meta device allocates nothing, so works
        return GL.make_inputs(sig, generator) if sig.device.type == "meta" else oom()

    spec = dataclass_replace(GL, make_inputs=make_inputs)
    with dispatch.use_timer(timer):
        decision, persist = harness.measure(spec, sig_of(), settings())
    assert (decision.impl, decision.source, persist) == ("bmm", "default", False)
    assert "out of memory" in decision.skipped["(inputs)"]


@pytest.mark.parametrize("step", ["forward", "backward"])
def test_oom_in_one_candidate_excludes_it_and_the_partial_result_is_not_stored(step):
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
    assert stored() == []  # used in this process, not written: the next process tunes again


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
    assert y.shape == (8, 4, 8) and stored() == []


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
