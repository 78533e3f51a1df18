"""GroupedLinear: init, conversion from and to nn.Linear, checkpoints, repr, training."""

from __future__ import annotations

import io
import math
import pathlib
import re

import pytest
import torch
from torch import nn

import grouped_ops
from grouped_ops import GroupedLinear, GroupedOpsError
from grouped_ops.ops import SPECS

GL = SPECS["grouped_linear"]


def linears(n=4, d_in=16, d_out=32, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(d_in, d_out, bias=bias, dtype=dtype) for _ in range(n))


def assert_equal_linears(a, b):
    assert len(a) == len(b)
    for la, lb in zip(a, b, strict=True):
        assert type(lb) is nn.Linear
        assert (la.in_features, la.out_features) == (lb.in_features, lb.out_features)
        assert la.weight.dtype == lb.weight.dtype and la.weight.device == lb.weight.device
        assert torch.equal(la.weight, lb.weight)
        assert (la.bias is None) == (lb.bias is None)
        if la.bias is not None:
            assert torch.equal(la.bias, lb.bias)


# ---- init --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_init_equals_a_row_of_seeded_nn_linear(bias):
    torch.manual_seed(123)
    layer = GroupedLinear(5, 7, 3, bias=bias)
    assert_equal_linears(layer.to_linears(), linears(5, 7, 3, bias=bias, seed=123))


def test_init_bounds_and_spread_are_nn_linears():
    layer = GroupedLinear(8, 256, 64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) and the bias rule both give 1/sqrt(in)
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound  # uses the whole range ...
        assert abs(p.mean().item()) < 0.1 * bound  # ... centred ...
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # ... uniform
    for g in range(8):  # every group drawn separately, not one group repeated
        assert not torch.equal(layer.weight[g], layer.weight[(g + 1) % 8])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_dtype_and_device_are_kept(dtype):
    layer = GroupedLinear(3, 4, 5, dtype=dtype, device="cpu")
    assert layer.weight.dtype == layer.bias.dtype == dtype
    assert layer.weight.shape == (3, 5, 4) and layer.bias.shape == (3, 5)
    meta = GroupedLinear(3, 4, 5, device="meta")
    assert meta.weight.is_meta
    assert GroupedLinear.from_linears(meta.to_linears()).weight.is_meta


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": -1}, "groups must be a non-negative int, got -1"),
    ({"in_features": 2.0}, "in_features must be a non-negative int, got 2.0"),
    ({"impl": "fast"}, "unknown impl 'fast'; valid options are ['auto', 'bmm'"),
], ids=["groups", "in_features", "impl"])
def test_constructor_refuses_bad_arguments(kwargs, message):
    args = {"groups": 2, "in_features": 3, "out_features": 4} | kwargs
    with pytest.raises(GroupedOpsError, match=re.escape("GroupedLinear: " + message)):
        GroupedLinear(**args)


# ---- repr --------------------------------------------------------------------------------------------

def test_extra_repr():
    assert repr(GroupedLinear(4, 16, 32)) == "GroupedLinear(groups=4, in_features=16, out_features=32, bias=True)"
    assert str(GroupedLinear(2, 3, 1, bias=False, impl="loop")) == (
        "GroupedLinear(groups=2, in_features=3, out_features=1, bias=False, impl='loop')")


# ---- from_linears / to_linears -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("container", [nn.ModuleList, list, tuple], ids=lambda c: c.__name__)
def test_round_trip_is_bit_exact(container, bias, dtype):
    original = linears(bias=bias, dtype=dtype)
    layer = GroupedLinear.from_linears(container(original))
    assert (layer.groups, layer.in_features, layer.out_features) == (4, 16, 32)
    assert layer.weight.dtype == dtype and (layer.bias is None) == (not bias)
    for g, lin in enumerate(original):
        assert torch.equal(layer.weight[g], lin.weight)
        if bias:
            assert torch.equal(layer.bias[g], lin.bias)
    back = layer.to_linears()
    assert isinstance(back, nn.ModuleList)
    assert_equal_linears(original, back)
    again = GroupedLinear.from_linears(back)
    assert torch.equal(again.weight, layer.weight)


def test_conversions_copy_and_never_share_memory():
    original = linears()
    layer = GroupedLinear.from_linears(original)
    back = layer.to_linears()
    with torch.no_grad():
        original[0].weight.zero_()
        back[1].weight.zero_()
    assert layer.weight[0].abs().sum() > 0 and layer.weight[1].abs().sum() > 0


def test_conversions_consume_no_random_numbers():
    original = linears()
    state = torch.get_rng_state()
    GroupedLinear.from_linears(original).to_linears()
    assert torch.equal(state, torch.get_rng_state())


def test_requires_grad_is_kept():
    frozen = linears()
    frozen.requires_grad_(False)
    layer = GroupedLinear.from_linears(frozen)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert not any(p.requires_grad for p in layer.to_linears().parameters())
    assert all(p.requires_grad for p in GroupedLinear.from_linears(linears()).parameters())


@pytest.mark.parametrize("impl", list(GL.registry), ids=str)
@pytest.mark.parametrize("lead", [(), (8,), (2, 3)], ids=["no_batch", "batch", "2d_batch"])
def test_outputs_equal_the_loop_of_the_original_modules(impl, lead):
    """Bit-exact with impl="loop": it makes the very same F.linear call per group as the modules.
    The others (bmm/baddbmm, einsum, grouped_mm, one block-diagonal matmul) sum the same products
    in another order, so they agree to float32 rounding (assert_close's float32 tolerances)."""
    original = linears()
    layer = GroupedLinear.from_linears(original, impl=impl)
    x = torch.randn(*lead, 4, 16)
    sig = GL.signature(GL.meta(x, layer.weight, layer.bias), True)
    if not GL.registry[impl].supports(sig):
        pytest.skip("; ".join(GL.registry[impl].not_supported_reasons(sig)))
    expected = torch.stack([lin(x[..., g, :]) for g, lin in enumerate(original)], dim=-2)
    got = layer(x)
    assert got.shape == (*lead, 4, 32)
    if impl == "loop":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)


def test_auto_output_is_close_to_the_loop_of_modules():
    original = linears()
    x = torch.randn(64, 4, 16)
    expected = torch.stack([lin(x[:, g]) for g, lin in enumerate(original)], dim=1)
    torch.testing.assert_close(GroupedLinear.from_linears(original)(x), expected)


def _meta_linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs, device="meta")


@pytest.mark.parametrize("layers, message", [
    ([], "got an empty list; pass at least one nn.Linear"),
    (nn.Linear(3, 4), "expected a list or nn.ModuleList of nn.Linear, got one Linear; wrap it in a list"),
    ([nn.Linear(3, 4), nn.ReLU()], "linears[1] is a ReLU, not an nn.Linear"),
    ([nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(5, 4)],
     "linears[2] is Linear(in_features=5, out_features=4) (weight.shape=(4, 5)) but linears[0] is "
     "Linear(in_features=3, out_features=4) (weight.shape=(4, 3)); all layers must have one shape"),
    ([nn.Linear(3, 4), nn.Linear(3, 4, bias=False)],
     "linears[1] has no bias but linears[0] has one (Linear(in_features=3, out_features=4, bias=False) "
     "(weight.shape=(4, 3)) vs Linear(in_features=3, out_features=4) (weight.shape=(4, 3))); all layers must agree"),
    ([nn.Linear(3, 4, bias=False), nn.Linear(3, 4)], "linears[1] has a bias but linears[0] has none"),
    ([nn.Linear(3, 4), nn.Linear(3, 4, dtype=torch.float64)],
     "linears[1].weight is float64 but linears[0].weight is float32 (Linear(in_features=3, out_features=4) "
     "(weight.shape=(4, 3))); cast them to one dtype first"),
    ([nn.Linear(3, 4), _meta_linear(3, 4)], "linears[1].weight is on meta but linears[0].weight is on cpu"),
    ([nn.Linear(3, 4), nn.LazyLinear(4)], "linears[1] is an uninitialised nn.LazyLinear; run one forward pass"),
], ids=["empty", "single", "not_linear", "shape", "bias_mix", "bias_mix2", "dtype", "device", "lazy"])
def test_from_linears_refuses_mismatches_with_a_clear_error(layers, message):
    with pytest.raises(GroupedOpsError, match=re.escape("GroupedLinear.from_linears: " + message)):
        GroupedLinear.from_linears(layers)


def test_from_linears_refuses_mixed_bias_dtype():
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    b.bias.data = b.bias.data.double()
    with pytest.raises(GroupedOpsError, match=re.escape("linears[1].bias is float64 but linears[0].bias is float32")):
        GroupedLinear.from_linears([a, b])


def test_from_linears_unknown_impl():
    with pytest.raises(GroupedOpsError, match=r"^GroupedLinear.from_linears: unknown impl 'nope'"):
        GroupedLinear.from_linears(linears(), impl="nope")


# ---- checkpoints -------------------------------------------------------------------------------------

class Old(nn.Module):
    def __init__(self, n=4, bias=True):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.heads = nn.ModuleList(nn.Linear(16, 32, bias=bias) for _ in range(n))

    def forward(self, x):
        h = self.embed(x)
        return torch.stack([head(h) for head in self.heads], dim=-2)


class New(nn.Module):
    def __init__(self, n=4, bias=True):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.heads = GroupedLinear(n, 16, 32, bias=bias)

    def forward(self, x):
        h = self.embed(x)
        return self.heads(h.unsqueeze(-2).expand(*h.shape[:-1], self.heads.groups, h.shape[-1]))


def assert_same_model(old: Old, new: New):
    assert torch.equal(old.embed.weight, new.embed.weight)
    assert_equal_linears(old.heads, new.heads.to_linears())
    x = torch.randn(5, 8)
    torch.testing.assert_close(new(x), old(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_load_state_dict_accepts_the_module_list_form(bias):
    old = Old(bias=bias)
    new = New(bias=bias)
    result = new.load_state_dict(old.state_dict())  # strict: every key accounted for
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_model(old, new)
    # as the root module too, and with assign=True
    layer = GroupedLinear(4, 16, 32, bias=bias)
    layer.load_state_dict(old.heads.state_dict(), assign=True)
    assert_equal_linears(old.heads, layer.to_linears())


def test_load_state_dict_still_takes_its_own_form():
    a, b = GroupedLinear(3, 4, 5), GroupedLinear(3, 4, 5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_load_state_dict_explains_a_broken_module_list_checkpoint():
    sd = Old().state_dict()
    del sd["heads.2.bias"]
    with pytest.raises(RuntimeError, match=re.escape(
            "GroupedLinear at 'heads': cannot load the nn.ModuleList-of-nn.Linear entries: "
            "heads.2.bias is missing but heads.0.bias is present")):
        New().load_state_dict(sd)
    # a checkpoint with more layers than groups: the extra ones are reported, as usual
    with pytest.raises(RuntimeError, match=r"size mismatch for heads.weight"):
        New(n=3).load_state_dict(Old(n=4).state_dict())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_state_dict_conversions_both_ways(bias):
    old = Old(bias=bias)
    converted = GroupedLinear.state_dict_from_linears(old.state_dict(), prefix="heads.")
    assert list(converted) == ["embed.weight", "embed.bias", "heads.weight", *(["heads.bias"] if bias else [])]
    assert hasattr(converted, "_metadata")  # nn.Module's per-module version info is carried over
    new = New(bias=bias)
    new.load_state_dict(converted)
    assert_same_model(old, new)
    # ... and back, through a file, into the old model: bit-exact
    buffer = io.BytesIO()
    torch.save(GroupedLinear.state_dict_to_linears(new.state_dict(), prefix="heads"), buffer)  # "." optional
    buffer.seek(0)
    restored = Old(bias=bias)
    restored.load_state_dict(torch.load(buffer))
    assert_same_model(restored, new)
    for p, q in zip(old.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_conversions_of_a_bare_module_list():
    heads = linears()
    layer = GroupedLinear(4, 16, 32)
    layer.load_state_dict(GroupedLinear.state_dict_from_linears(heads.state_dict()))
    back = nn.ModuleList(nn.Linear(16, 32) for _ in range(4))
    back.load_state_dict(GroupedLinear.state_dict_to_linears(layer.state_dict()))
    assert_equal_linears(heads, back)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("heads.1.bias"), "heads.1.bias is missing but heads.0.bias is present"),
    (lambda sd: sd.update({"heads.2.weight": torch.zeros(32, 15)}),
     "heads.2.weight has shape (32, 15) and dtype float32 but heads.0.weight has shape (32, 16) and dtype float32"),
    (lambda sd: sd.update({"heads.3.bias": torch.zeros(31)}),
     "heads.3.bias must have shape (32,) and dtype float32 to match heads.3.weight, got shape (31,), float32"),
    (lambda sd: sd.pop("heads.0.weight"), "no 'heads.0.weight' entry to convert"),
], ids=["missing_bias", "shape", "bias_shape", "nothing"])
def test_state_dict_from_linears_errors(edit, message):
    sd = Old().state_dict()
    edit(sd)
    with pytest.raises(GroupedOpsError, match=re.escape("GroupedLinear.state_dict_from_linears: " + message)):
        GroupedLinear.state_dict_from_linears(sd, prefix="heads.")


def test_state_dict_to_linears_errors():
    with pytest.raises(GroupedOpsError, match=re.escape(
            "GroupedLinear.state_dict_to_linears: expected a 3-D tensor [n, out, in] at 'heads.weight', got nothing")):
        GroupedLinear.state_dict_to_linears(Old().state_dict(), prefix="heads.")
    sd = New().state_dict()
    sd["heads.bias"] = torch.zeros(4, 31)
    with pytest.raises(GroupedOpsError, match=re.escape("'heads.bias' must have shape (4, 32) [n, out]")):
        GroupedLinear.state_dict_to_linears(sd, prefix="heads.")


# ---- training ----------------------------------------------------------------------------------------

def test_training_step_matches_the_loop_of_modules():
    original = linears()
    layer = GroupedLinear.from_linears(original)
    x = torch.randn(32, 4, 16)
    target = torch.randn(32, 4, 32)
    loss_loop = sum(nn.functional.mse_loss(lin(x[:, g]), target[:, g]) for g, lin in enumerate(original)) / 4
    loss_grouped = nn.functional.mse_loss(layer(x), target)
    torch.testing.assert_close(loss_grouped, loss_loop)
    loss_loop.backward()
    loss_grouped.backward()
    torch.testing.assert_close(layer.weight.grad, torch.stack([lin.weight.grad for lin in original]))
    torch.testing.assert_close(layer.bias.grad, torch.stack([lin.bias.grad for lin in original]))


def test_a_few_sgd_steps_reduce_the_loss():
    torch.manual_seed(0)
    layer = GroupedLinear(4, 16, 8)
    teacher = GroupedLinear(4, 16, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(64, 4, 16)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_forced_impl_is_used_and_never_tunes():
    layer = GroupedLinear(4, 16, 32, impl="loop")
    x = torch.randn(8, 4, 16)
    layer(x)
    assert grouped_ops.lookup("grouped_linear", x, layer.weight, layer.bias) is None


# ---- docs/adoption.md ----------------------------------------------------------------------------

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "adoption.md"


def _run_doc(monkeypatch, backend):
    if backend is not None:
        # Inductor compiles cost ~20 s on a small CPU; the behaviour the page shows does not depend
        # on the backend, and tests/test_compile.py covers inductor itself.
        real = torch.compile

        def compile_with_backend(*args, **kwargs):
            kwargs.setdefault("backend", backend)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "compile", compile_with_backend)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 10
    namespace: dict = {}
    torch._dynamo.reset()
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    finally:
        torch._dynamo.reset()


def test_adoption_doc_runs(monkeypatch):
    _run_doc(monkeypatch, backend="aot_eager")


@pytest.mark.slow
def test_adoption_doc_runs_with_inductor(monkeypatch):
    _run_doc(monkeypatch, backend=None)
