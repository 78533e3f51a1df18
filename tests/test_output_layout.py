"""grouped_linear's group-major result: the same strides in eager mode, warm and cold torch.compile
and torch.export; an in-place op on it works in every context that the composability issue lists;
``.view()`` across the group dim raises torch's own error; removed implementation names warn once."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import FakeTimer, group_major
from torch import nn
from torch.utils.checkpoint import checkpoint

import grouped_ops
from grouped_ops import GroupedLinear, dispatch, grouped_linear
from grouped_ops.dispatch import overrides
from grouped_ops.ops import SPECS
from grouped_ops.registry import group_major_strides
from grouped_ops.tuning import store

IMPLS = [i for i in grouped_ops.implementations("grouped_linear") if i != "grouped_mm"]  # CPU: all but it


def _args(lead=(6,), grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 4, 16, generator=g)
    w = torch.randn(4, 8, 16, generator=g).requires_grad_(grad)
    b = torch.randn(4, 8, generator=g).requires_grad_(grad)
    return x, w, b


def _reference(x, w, b):
    return torch.einsum("...ni,noi->...no", x.double(), w.detach().double()) + b.detach().double()


@pytest.mark.parametrize("lead", [(), (1,), (6,), (2, 3), (0,)], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_gives_the_group_major_strides(impl, lead):
    x, w, b = _args(lead)
    for grad in (False, True):
        y = grouped_linear(x, w.detach().requires_grad_(grad), b, impl=impl)
        assert group_major(y), (impl, y.stride())
        if y.numel() and len(lead) >= 1 and 1 not in lead:
            assert y.stride() == group_major_strides(y.shape)


def test_view_across_the_group_dim_raises_torchs_error_and_reshape_works():
    x, w, b = _args((6,))
    y = grouped_linear(x, w, b)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        y.view(6, 32)
    assert y.reshape(6, 32).shape == (6, 32) and y.contiguous().view(6, 32).shape == (6, 32)
    assert y.view(6, 4, 2, 4).shape == (6, 4, 2, 4)  # within a group's features a view works


# ---- strides: eager, compile warm and cold, export --------------------------------------------------

@pytest.mark.parametrize("lead", [(6,), (2, 3), (1,)], ids=str)
def test_compile_warm_cold_export_and_eager_give_the_same_strides(lead):
    x, w, b = _args(lead)
    want = grouped_linear(x, w, b).stride()
    fn = lambda a, c, d: grouped_linear(a, c, d)  # noqa: E731
    torch._dynamo.reset()
    dispatch.clear_memory()
    with dispatch.use_timer(FakeTimer({"bmm": 1e-6})):
        # cold: a dynamic batch goes through the custom op (its fake gives the strides)
        cold = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)(x, w, b)
        torch._dynamo.reset()
        grouped_linear(x, w, b)  # decided: a warm compile inlines bmm
        warm = torch.compile(fn, backend="aot_eager", dynamic=False, fullgraph=True)(x, w, b)
    module = type("M", (nn.Module,), {"forward": lambda self, a, c, d: grouped_linear(a, c, d)})()
    exported = torch.export.export(module, (x, w, b)).module()(x, w, b)
    for name, y in (("cold", cold), ("warm", warm), ("export", exported)):
        assert _strides(y) == _strides_of(y.shape, want), (name, y.stride(), want)
        torch.testing.assert_close(y, _reference(x, w, b).float())


def _strides(y):
    return _strides_of(y.shape, y.stride())


def _strides_of(shape, stride):
    # a dim of size 1 is never stepped over: its stride is free (as for is_contiguous)
    return tuple(s if n != 1 else None for n, s in zip(shape, stride, strict=True))


@pytest.mark.parametrize("lead", [(6,), (1,)], ids=str)
@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_keeps_the_strides_of_eager(lead, dynamic):
    x, w, b = _args(lead)
    want = grouped_linear(x, w, b).stride()
    torch._dynamo.reset()
    y = torch.compile(lambda a, c, d: grouped_linear(a, c, d), fullgraph=True, dynamic=dynamic)(x, w, b)
    assert _strides(y) == _strides_of(y.shape, want)
    torch.testing.assert_close(y, _reference(x, w, b).float())


def test_the_custom_ops_fake_kernel_gives_the_eager_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b = _args((2, 3))
    want = grouped_linear(x, w, b).stride()
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        fake = torch.ops.grouped_ops.grouped_linear_auto(fx, fw, fb, 0, "")
    assert fake.stride() == want


# ---- an in-place op on the result ------------------------------------------------------------------

def _trained(fn):
    """The gradients of ``fn(layer, x).sum()`` for a fresh seeded layer, and the loop's."""
    torch.manual_seed(0)
    layer = GroupedLinear(4, 16, 8)
    x = torch.randn(5, 4, 16, requires_grad=True)
    fn(layer, x).sum().backward()
    linears = layer.to_linears()
    x2 = x.detach().requires_grad_()
    torch.stack([lin(x2[:, i]) for i, lin in enumerate(linears)], 1).relu().sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.stack([lin.weight.grad for lin in linears]))
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_relu_in_eager_mode(impl):
    def fn(layer, x):
        layer.impl = impl
        return layer(x).relu_()
    _trained(fn)


@pytest.mark.parametrize("reentrant", [True, False])
def test_in_place_relu_under_activation_checkpointing(reentrant):
    _trained(lambda layer, x: checkpoint(lambda t: layer(t).relu_(), x, use_reentrant=reentrant))


def test_in_place_relu_under_torch_func():
    layer = GroupedLinear(4, 16, 8)
    params = dict(layer.named_parameters())
    x = torch.randn(5, 4, 16)

    def loss(p, t):
        return torch.func.functional_call(layer, p, (t,)).relu_().sum()

    grads = torch.func.grad(loss)(params, x)
    for p in params.values():
        p.grad = None
    layer(x).relu().sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(grads[name], p.grad)
    batched = torch.func.vmap(lambda t: layer(t).relu_())(x.unsqueeze(1).expand(5, 3, 4, 16))
    torch.testing.assert_close(batched, layer(x).relu().unsqueeze(1).expand(5, 3, 4, 8))


@pytest.mark.parametrize("dynamic", [False, True])
def test_in_place_relu_under_torch_compile(dynamic):
    torch._dynamo.reset()
    _trained(lambda layer, x: torch.compile(lambda t: layer(t).relu_(), backend="aot_eager", dynamic=dynamic)(x))


# ---- removed implementation names: one warning, then ignored ---------------------------------------

REMOVED = "bmm_strided_out"


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(overrides, "_WARNED", set())


def _calls_warn_once(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (6, 7, 9):
            dispatch.clear_memory()
            fn(*_args((batch,)))
    return [str(w.message) for w in caught if REMOVED in str(w.message)]


@pytest.mark.parametrize("var", ["GROUPED_OPS_IMPL", "GROUPED_OPS_EXCLUDE"])
@pytest.mark.parametrize("form", ["{}", "grouped_linear={}"])
def test_a_removed_name_in_the_environment_warns_once_and_is_ignored(monkeypatch, fresh_warnings, var, form):
    assert REMOVED in SPECS["grouped_linear"].registry.removed
    monkeypatch.setenv(var, form.format(REMOVED))
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        messages = _calls_warn_once(lambda *a: grouped_linear(*a))
        d = grouped_ops.lookup("grouped_linear", *_args())
    assert len(messages) == 1 and var in messages[0] and "ignored" in messages[0], messages
    assert d is not None and d.impl == "einsum"  # auto still decides, among the others
    # the other ops read the same variable: they run, and say nothing (it is not their name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped_ops.weighted_combine(torch.randn(4, 3, 5), torch.rand(4, 3))
        grouped_ops.grouped_linear(torch.randn(6, 8), torch.randn(3, 8, 8), offsets=torch.tensor([2, 4, 6]))
    assert not [w for w in caught if REMOVED in str(w.message)]


def test_a_removed_name_passed_in_code_is_refused_saying_it_was_removed():
    for call in (lambda: grouped_linear(*_args(), impl=REMOVED), lambda: GroupedLinear(3, 4, 5, impl=REMOVED),
                 lambda: grouped_ops.use_impl(REMOVED).__enter__()):
        with pytest.raises(grouped_ops.GroupedOpsError, match=rf"unknown impl '{REMOVED}' \(removed in grouped_linear v6"):
            call()


@pytest.mark.parametrize("value", ["einsum,", ",einsum", "einsum,,"])
def test_empty_entries_in_an_environment_list_are_skipped(monkeypatch, value):
    monkeypatch.setenv("GROUPED_OPS_IMPL", value)
    assert overrides.forced_name("grouped_linear") == ("einsum", "env")


def test_a_removed_name_in_exclude_impls_warns_once_and_is_ignored(fresh_warnings):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with grouped_ops.exclude_impls(REMOVED), grouped_ops.exclude_impls(grouped_linear=[REMOVED, "loop"]):
                assert overrides.excluded("grouped_linear") == {"loop"}
    assert len([w for w in caught if REMOVED in str(w.message)]) == 1
    with pytest.raises(grouped_ops.GroupedOpsError, match="unknown impl"), \
            grouped_ops.exclude_impls("bmm_strided_ou"):  # a typo still raises
        pass


def test_a_cache_entry_naming_a_removed_implementation_warns_once_and_is_ignored(fresh_warnings):
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_linear(*_args())
    disk = store.DiskStore()
    for entry in list(disk.entries()):
        entry["impl"] = REMOVED
        disk.put(json.loads(json.dumps(entry)))
    dispatch.clear_memory()
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        messages = _calls_warn_once(lambda *a: grouped_linear(*a))
        assert grouped_ops.lookup("grouped_linear", *_args((9,))).impl == "loop"  # tuned again
    assert len(messages) == 1 and "cache entry" in messages[0], messages


def test_grouped_mm_takes_a_one_wide_weight_whose_size_one_dim_has_another_stride():
    # found by the TabM whole-model row: the output layer's [k, in, 1] weight seen as [k, 1, in] has
    # strides (in, 1, 1); the signature calls it contiguous like a (in, in, 1) one, which the tuner
    # timed, but its [k, in, 1] operand fails torch's 16-byte check unless laid column-major
    if "grouped_mm" not in grouped_ops.implementations("grouped_linear"):
        pytest.skip("no grouped_mm")
    x = torch.randn(5, 32, 256).transpose(0, 1)  # [32, 5, 256] group-major, as a previous layer's result
    w, b = torch.randn(5, 256, 1).transpose(1, 2), torch.randn(5, 1)
    try:
        y = grouped_linear(x, w, b, impl="grouped_mm")
    except grouped_ops.GroupedOpsError as e:
        if "does not support" not in str(e):
            raise
        pytest.skip(str(e)[:80])
    torch.testing.assert_close(y, (torch.einsum("...ni,noi->...no", x.double(), w.double()) + b.double()).float())
