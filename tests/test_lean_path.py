"""The lean road of GroupedLinear.forward and grouped_linear to the dispatcher's memo
(``dispatch.lean_key``): it is guarded by everything the memo's key covers, so every override and
context change takes effect on the next call, and where it does not apply the long road runs."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from helpers import FakeTimer

import grouped_ops
from grouped_ops import GroupedLinear, dispatch, grouped_linear
from grouped_ops.dispatch import _LEAN, resolve


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return GroupedLinear(4, 16, 8)


def _x(batch=5, dtype=torch.float32):
    return torch.randn(batch, 4, 16, generator=torch.Generator().manual_seed(batch), dtype=dtype)


def _ref(layer, x):
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    return torch.einsum("...ni,noi->...no", x.double(), w) + b


def _warm(fn, *args):
    """Call twice (the second call takes the lean road) and return the second result."""
    fn(*args)
    return fn(*args)


@pytest.mark.parametrize("road", ["module", "functional"])
def test_a_decided_call_takes_the_lean_road_to_the_memos_function(layer, road, ran):
    x = _x()
    fn = layer if road == "module" else (lambda t: grouped_linear(t, layer.weight, layer.bias))
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        fn(x)  # tunes (the tuner runs every candidate once)
    assert len(_LEAN) == 1 and ran[-1] == "grouped_linear.einsum"
    ran.clear()
    y = fn(x)
    assert ran == ["grouped_linear.einsum"] and len(_LEAN) == 1  # the memo's implementation, no new entry
    torch.testing.assert_close(y, _ref(layer, x).float())


def test_overrides_take_effect_on_the_next_call(layer, ran, monkeypatch):
    x = _x()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        _warm(layer, x)
        ran.clear()
        with grouped_ops.use_impl(grouped_linear="loop"):
            layer(x)
        layer(x)
        monkeypatch.setenv("GROUPED_OPS_IMPL", "bmm_weight_left")
        layer(x)
        monkeypatch.delenv("GROUPED_OPS_IMPL")
        with grouped_ops.exclude_impls(grouped_linear="einsum"):
            layer(x)
        monkeypatch.setenv("GROUPED_OPS_EXCLUDE", "einsum")
        layer(x)
        monkeypatch.delenv("GROUPED_OPS_EXCLUDE")
        layer(x)
        layer.impl = "loop"
        layer(x)
    assert ran[:3] == ["grouped_linear.loop", "grouped_linear.einsum", "grouped_linear.bmm_weight_left"]
    assert "grouped_linear.einsum" not in ran[3:5]
    assert ran[5:] == ["grouped_linear.einsum", "grouped_linear.loop"]


def test_a_changed_decision_reaches_the_lean_road(layer, ran):
    x = _x()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        _warm(layer, x)
    decision = grouped_ops.lookup("grouped_linear", x, layer.weight, layer.bias)
    assert decision.impl == "einsum" and _LEAN
    resolve.remember(dataclasses.replace(decision, impl="loop"))  # e.g. rank 0's broadcast decision
    assert not _LEAN
    ran.clear()
    _warm(layer, x)
    assert ran == ["grouped_linear.loop"] * 2


def test_deterministic_mode_takes_the_default_rule_on_the_next_call(layer, ran):
    x = _x()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        _warm(layer, x)
        ran.clear()
        torch.use_deterministic_algorithms(True)
        try:
            layer(x)
        finally:
            torch.use_deterministic_algorithms(False)
        layer(x)
    assert ran == ["grouped_linear.bmm", "grouped_linear.einsum"]


SETTINGS = {
    "threads": lambda: _setting(torch.set_num_threads, torch.get_num_threads(), torch.get_num_threads() + 1),
    "precision": lambda: _setting(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision(), "medium"),
    "no_grad": lambda: _context(torch.no_grad()),
    "inference_mode": lambda: _context(torch.inference_mode()),
}


class _setting:
    def __init__(self, setter, old, new):
        self.setter, self.old, self.new = setter, old, new

    def __enter__(self):
        self.setter(self.new)

    def __exit__(self, *exc):
        self.setter(self.old)


def _context(cm):
    return cm


@pytest.mark.parametrize("what", sorted(SETTINGS))
def test_a_setting_in_the_memos_key_is_in_the_lean_key(layer, what):
    x = _x()
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        _warm(layer, x)
        before = len(_LEAN)
        with SETTINGS[what]():
            y = _warm(layer, x)
        assert len(_LEAN) == before + 1  # another key
        assert y.requires_grad == (what in ("threads", "precision"))
        torch.testing.assert_close(y, _ref(layer, x).float())


def test_shapes_dtypes_and_weight_layouts_are_in_the_lean_key(layer):
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        for x in (_x(5), _x(7), _x(5).reshape(5, 1, 4, 16), _x(6).transpose(0, 0)):
            torch.testing.assert_close(_warm(layer, x), _ref(layer, x).float())
        with torch.no_grad():  # the same values stored [n, in, out]: another layout, another key
            layer.weight.data = layer.weight.data.transpose(1, 2).contiguous().transpose(1, 2)
        x = _x(5)
        torch.testing.assert_close(_warm(layer, x), _ref(layer, x).float())
        with torch.no_grad():  # a weight of another shape through .data (its identity unchanged)
            layer.weight.data = torch.randn(4, 3, 16)
            layer.bias.data = torch.randn(4, 3)
        y = _warm(layer, x)
        assert y.shape == (5, 4, 3)
        torch.testing.assert_close(y, _ref(layer, x).float())
        layer.double()
        y = _warm(layer, _x(5, torch.float64))
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, _ref(layer, _x(5, torch.float64)))


def test_grad_flags_are_in_the_lean_key(layer):
    x = _x()
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        layer.requires_grad_(False)
        assert not _warm(layer, x).requires_grad
        layer.bias.requires_grad_(True)
        y = _warm(layer, x)
        y.sum().backward()
        assert layer.weight.grad is None and torch.equal(layer.bias.grad, torch.full((4, 8), 5.0))
        xg = x.clone().requires_grad_()
        _warm(layer, xg).sum().backward()
        assert xg.grad is not None


def test_transforms_forward_ad_tracing_autocast_subclasses_and_recording_still_work(layer):
    x = _x()
    ref = _ref(layer, x).float()
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        _warm(layer, x)
        torch.testing.assert_close(torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1), ref)
        t = torch.randn_like(x)
        _, tangent = torch.func.jvp(layer, (x,), (t,))
        torch.testing.assert_close(tangent, torch.einsum("...ni,noi->...no", t, layer.weight.detach()))
        traced = torch.jit.trace(layer, x)
        torch.testing.assert_close(traced(x), ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        before = len(_LEAN)
        with grouped_ops.record() as rec:
            layer(x)
        assert rec.requests() and len(_LEAN) == before  # recording sees the call; the lean road is not taken

        class Sub(torch.Tensor):
            pass

        y = layer(x.as_subclass(Sub))
        torch.testing.assert_close(torch.Tensor(y), ref)
        assert len(_LEAN) == before
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(layer, backend="eager")(x), ref)


def test_the_lean_key_holds_everything_the_memo_key_holds(layer):
    # the memo's key is (op, meta, impl, overrides.state, _settings()): each is read by lean_key
    x = _x()
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        _warm(layer, x)
    memo_key = next(k for k in dispatch._MEMO if k[0] == "grouped_linear")
    lean_key = next(iter(_LEAN))
    (xm, wm, bm, grad) = memo_key[1]
    assert lean_key[:8] == (*xm, *wm) and lean_key[8] == bm and lean_key[9] == grad
    assert lean_key[10] == memo_key[2]
    assert lean_key[11:14] == memo_key[3] and lean_key[14:-2] == memo_key[4] and lean_key[-2] == memo_key[0]
    assert lean_key[-1] is None  # what the ragged op's meta describes beyond: its offsets (test_ragged_lean.py)
    assert os.environ.get("GROUPED_OPS_IMPL") is None


def test_a_dead_torch_func_wrapper_on_the_lean_road_gives_the_values_and_gradients(layer):
    # the lean road applies bmm's training Function without Function.apply's unwrapping of tensors
    # left over from a finished torch.func transform (ops/_common.direct_apply): its ops unwrap them
    kept = []

    def keep(t):
        kept.append(t)
        return t.sum()

    x = _x()
    torch.func.grad(keep)(x.clone())
    dead = kept[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        _warm(layer, x.clone().requires_grad_())
        before = len(_LEAN)
        y = layer(dead)
    assert len(_LEAN) == before and y.grad_fn.name().startswith("_BmmLinear")
    torch.testing.assert_close(y, _ref(layer, x).float())
    y.pow(2).sum().backward()
    w, b = layer.weight.detach().double().requires_grad_(), layer.bias.detach().double().requires_grad_()
    (torch.einsum("...ni,noi->...no", x.double(), w) + b).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad.float())
    torch.testing.assert_close(layer.bias.grad, b.grad.float())
