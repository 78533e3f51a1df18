"""Weight gradients that glibc maps fresh (32 MiB and more) are advised huge pages before their first
touch (ops/_huge_pages.py), by the ragged loop's and grouped_mm's backward and by bmm's, with the
same values as every other implementation: drawn inputs with every buffer counted as a fresh
mapping, and one real 32 MiB weight."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings

import grouped_ops
from grouped_ops.ops import SPECS, _huge_pages
from grouped_ops.testing import (
    assert_implementations_agree,
    grouped_linear_inputs,
    grouped_linear_ragged_inputs,
)

MADV_HUGEPAGE = 14


@contextlib.contextmanager
def advice_recorded(threshold: int = 1):
    """Every ``madvise`` call made, with buffers of ``threshold`` bytes or more counted as fresh mappings."""
    calls: list[tuple[int, int, int]] = []
    real = _huge_pages._madvise()

    def record(start: int, length: int, advice: int) -> int:
        calls.append((start, length, advice))
        return real(start, length, advice) if real is not None else 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_huge_pages, "FRESH_MAPPING_BYTES", threshold)
        mp.setattr(_huge_pages, "_madvise", lambda: record)
        yield calls


@settings(max_examples=25, deadline=None)
@given(grouped_linear_ragged_inputs(dtypes=(torch.float32,), requires_grad=True, feature_multiple=8))
def test_ragged_gradients_written_into_advised_pages_agree_with_the_reference(drawn):
    # features in multiples of 8: grouped_mm supports the signature and is checked beside the loop
    with advice_recorded():
        checked = assert_implementations_agree("grouped_linear_ragged", *drawn, impls=("loop", "grouped_mm"))
    assert "loop" in checked


@settings(max_examples=25, deadline=None)
@given(grouped_linear_inputs(dtypes=(torch.float32, torch.float64), requires_grad=True))
def test_bmm_gradients_written_into_advised_pages_agree_with_the_reference(drawn):
    with advice_recorded():
        assert_implementations_agree("grouped_linear", *drawn, impls=("bmm",))


@pytest.mark.parametrize("prepared", [True, False])
@pytest.mark.parametrize(("impl", "transposed"), [("loop", False), ("loop", True), ("grouped_mm", False),
                                                  ("grouped_mm", True)])
def test_a_32_mib_expert_weight_gets_its_gradient_in_advised_pages(impl, transposed, prepared):
    # Mixtral-like experts' gate_up_proj in float32 (8 x 2048 x 512): two experts get rows, as at T=1, top-2
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(8, 512, 2048, generator=g) if transposed else torch.randn(8, 2048, 512, generator=g)
    w = (storage.transpose(1, 2) if transposed else storage).requires_grad_()
    x = torch.randn(2, 512, generator=g)
    offsets = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    run = SPECS["grouped_linear_ragged"].registry[impl]  # unprepared: the function contexts other than eager take
    with advice_recorded(_huge_pages.FRESH_MAPPING_BYTES) as calls:
        if prepared:
            y = grouped_ops.grouped_linear(x, w, offsets=offsets, impl=impl)
        else:
            y = run(x, w, None, offsets)
        y.backward(torch.ones(2, 2048))
    assert any(advice == MADV_HUGEPAGE and length >= 31 << 20 for _, length, advice in calls), calls
    assert w.grad.stride() == w.stride()  # the parameter's own layout: AccumulateGrad keeps it
    expected = torch.zeros(8, 2048, 512)
    expected[2], expected[5] = x[0].expand(2048, 512), x[1].expand(2048, 512)
    torch.testing.assert_close(w.grad, expected)


def test_a_32_mib_bmm_weight_gets_its_gradient_in_advised_pages():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1024, 512, generator=g, requires_grad=True)
    x = torch.randn(3, 16, 512, generator=g)
    with advice_recorded(_huge_pages.FRESH_MAPPING_BYTES) as calls:
        grouped_ops.grouped_linear(x, w, impl="bmm").backward(torch.ones(3, 16, 1024))
    assert any(advice == MADV_HUGEPAGE for _, _, advice in calls), calls
    torch.testing.assert_close(w.grad, x.sum(0).unsqueeze(1).expand(16, 1024, 512))


def test_a_second_derivative_is_not_written_into_a_buffer():
    # create_graph records the backward's ops: there the gradient is bmm's own result, not out=
    w = torch.randn(2, 8, 4096, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 4096, dtype=torch.float64, requires_grad=True)
    with advice_recorded() as calls:
        (gw,) = torch.autograd.grad(grouped_ops.grouped_linear(x, w, impl="bmm").square().sum(), w,
                                    create_graph=True)
        assert gw.requires_grad and not calls
        small = (torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True),
                 torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True))
        assert torch.autograd.gradgradcheck(lambda x, w: grouped_ops.grouped_linear(x, w, impl="bmm"), small)


def test_advice_is_only_advice():
    # a buffer under a page, and a kernel that refuses (THP "never", or no madvise): nothing raises
    _huge_pages.advise(torch.empty(3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_huge_pages, "_madvise", lambda: lambda start, length, advice: -1)
        t = _huge_pages.empty_strided((1 << 13,), (1,), torch.float32, torch.device("cpu"))
        assert t.shape == (1 << 13,)
        mp.setattr(_huge_pages, "_madvise", lambda: None)
        _huge_pages.advise(torch.empty(1 << 20))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(_huge_pages.ENV, "0")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1024, 512, generator=g, requires_grad=True)
    x = torch.randn(3, 16, 512, generator=g)
    with advice_recorded(_huge_pages.FRESH_MAPPING_BYTES) as calls:
        grouped_ops.grouped_linear(x, w, impl="bmm").backward(torch.ones(3, 16, 1024))
    assert not calls and not _huge_pages.fresh_mapping(w)
    torch.testing.assert_close(w.grad, x.sum(0).unsqueeze(1).expand(16, 1024, 512))
