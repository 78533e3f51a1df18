"""GroupedLinear's weight storage ([n, in, out] behind the [n, out, in] contract): conversions and
checkpoints stay bit-exact, every way of moving or copying the module keeps the layout, optimizers
step it, and no way of changing the weight leaves a stale result behind."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import group_major
from torch import nn

from grouped_ops import GroupedLinear
from grouped_ops.nn import _empty_weight

N, D_IN, D_OUT = 4, 6, 5


def linears(bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(D_IN, D_OUT, bias=bias, dtype=dtype) for _ in range(N))


def stored_transposed(w: torch.Tensor) -> bool:
    """[n, out, in] whose storage is a contiguous [n, in, out]."""
    n, out, inn = w.shape
    return w.stride() == (out * inn, 1, out) and w.transpose(1, 2).is_contiguous()


def reference(layers, x):
    return torch.stack([lin(x[..., g, :]) for g, lin in enumerate(layers)], dim=-2)


# ---- the layout and conversions ------------------------------------------------------------------

def test_the_default_layout_is_nn_linears_because_in_out_breaks_code_written_for_it():
    # Issue 22, decision 3 (docs/adoption.md, "Parameter layout"): these are the facts it rests on.
    default, in_out = GroupedLinear(N, D_IN, D_OUT), GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    assert default.weight.is_contiguous() and default.weight_layout == "out_in"
    with torch.no_grad():
        nn.init.orthogonal_(default.weight)  # writes through weight.view(n, out * in)
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            nn.init.orthogonal_(in_out.weight)
        for init in (nn.init.kaiming_uniform_, nn.init.xavier_normal_, nn.init.trunc_normal_):
            init(in_out.weight)  # elementwise initialisers take either layout
            init(default.weight)
    assert default.weight.view(N, -1).shape == (N, D_OUT * D_IN)


@pytest.mark.parametrize("make", ["init", "from_linears", "meta_then_to_empty"])
def test_weight_is_stored_in_out_with_the_linear_shape(make):
    if make == "init":
        layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    elif make == "from_linears":
        layer = GroupedLinear.from_linears(linears(), weight_layout="in_out")
    else:
        layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out", device="meta").to_empty(device="cpu")
    assert layer.weight.shape == (N, D_OUT, D_IN)
    assert stored_transposed(layer.weight)
    assert layer.weight.is_leaf and isinstance(layer.weight, nn.Parameter)


@pytest.mark.parametrize("bias", [True, False])
def test_init_draws_nn_linears_values_in_nn_linears_order(bias):
    torch.manual_seed(7)
    layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out", bias=bias)
    torch.manual_seed(7)
    expected = nn.ModuleList(nn.Linear(D_IN, D_OUT, bias=bias) for _ in range(N))
    for g, lin in enumerate(expected):
        assert torch.equal(layer.weight[g], lin.weight)
        if bias:
            assert torch.equal(layer.bias[g], lin.bias)
    torch.manual_seed(7)
    layer.reset_parameters()  # redraws the same values, into the same storage
    assert torch.equal(layer.weight[0], expected[0].weight) and stored_transposed(layer.weight)


def test_conversion_round_trip_is_bit_exact_and_gives_linears_their_own_layout():
    original = linears()
    layer = GroupedLinear.from_linears(original, weight_layout="in_out")
    back = layer.to_linears()
    for a, b in zip(original, back, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert b.weight.is_contiguous()  # nn.Linear's [out, in], not a strided slice
    again = GroupedLinear.from_linears(back, weight_layout="in_out")
    assert torch.equal(again.weight, layer.weight) and stored_transposed(again.weight)


def test_forward_result_is_fresh_and_group_major_and_matches_the_linears():
    original = linears(dtype=torch.float64)
    layer = GroupedLinear.from_linears(original, impl="bmm", weight_layout="in_out")
    x = torch.randn(3, 2, N, D_IN, dtype=torch.float64)
    y = layer(x)
    assert group_major(y)
    torch.testing.assert_close(y, reference(original, x))


# ---- checkpoints ---------------------------------------------------------------------------------

def test_state_dict_round_trip_through_a_file_is_bit_exact():
    layer = GroupedLinear.from_linears(linears(), weight_layout="in_out")
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.bias, layer.bias)
    assert stored_transposed(other.weight)


def test_a_contiguous_checkpoint_loads_into_the_fast_layout():
    torch.manual_seed(0)
    state = {"weight": torch.randn(N, D_OUT, D_IN), "bias": torch.randn(N, D_OUT)}  # an older save
    layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    layer.load_state_dict(state)
    assert torch.equal(layer.weight, state["weight"]) and stored_transposed(layer.weight)
    assigned = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out", device="meta")
    assigned.load_state_dict(state, assign=True)  # assign=True hands over the checkpoint's tensor
    assert torch.equal(assigned.weight, state["weight"]) and stored_transposed(assigned.weight)
    assert isinstance(assigned.weight, nn.Parameter) and assigned.weight.requires_grad


def test_a_modulelist_checkpoint_and_the_state_dict_helpers_stay_bit_exact():
    original = linears()
    layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    layer.load_state_dict(original.state_dict())
    assert stored_transposed(layer.weight)
    back = nn.ModuleList(nn.Linear(D_IN, D_OUT) for _ in range(N))
    back.load_state_dict(GroupedLinear.state_dict_to_linears(layer.state_dict()))
    for a, b in zip(original, back, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# ---- moving and copying the module ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["double", "to_float64", "to_cpu", "deepcopy", "pickle", "torch_save",
                                 "share_memory", "to_meta", "bfloat16"])
def test_moving_or_copying_the_module_keeps_the_layout_and_values(how):
    layer = GroupedLinear.from_linears(linears(), weight_layout="in_out")
    if how == "double":
        moved = copy.deepcopy(layer).double()
    elif how == "to_float64":
        moved = copy.deepcopy(layer).to(torch.float64)
    elif how == "to_cpu":
        moved = copy.deepcopy(layer).to("cpu")
    elif how == "deepcopy":
        moved = copy.deepcopy(layer)
    elif how == "pickle":
        moved = pickle.loads(pickle.dumps(layer))
    elif how == "torch_save":
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        moved = torch.load(buf, weights_only=False)
    elif how == "share_memory":
        moved = copy.deepcopy(layer).share_memory()
    elif how == "to_meta":
        moved = copy.deepcopy(layer).to("meta")
    else:
        moved = copy.deepcopy(layer).bfloat16()
    assert stored_transposed(moved.weight)
    if how not in ("to_meta",):
        assert torch.equal(moved.weight.float(), layer.weight.to(moved.weight.dtype).float())


def test_swap_module_params_on_conversion_keeps_the_layout():
    layer = GroupedLinear.from_linears(linears(), weight_layout="in_out")
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    assert stored_transposed(layer.weight) and layer.weight.dtype == torch.float64


# ---- training ------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
    "sgd_foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps_match_the_linears_and_keep_the_layout(name):
    original = linears(dtype=torch.float64)
    layer = GroupedLinear.from_linears(original, impl="bmm", weight_layout="in_out")
    opt_ours, opt_ref = OPTIMIZERS[name](layer.parameters()), OPTIMIZERS[name](original.parameters())
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(7, N, D_IN, dtype=torch.float64)
        for opt, y in ((opt_ours, layer(x)), (opt_ref, reference(original, x))):
            opt.zero_grad()
            y.square().sum().backward()
            opt.step()
        # bmm's backward gives the gradient in the parameter's own layout: AccumulateGrad keeps it
        assert layer.weight.grad.stride() == layer.weight.stride()
    assert stored_transposed(layer.weight)
    for g, lin in enumerate(original):
        torch.testing.assert_close(layer.weight[g], lin.weight)
        torch.testing.assert_close(layer.bias[g], lin.bias)


# ---- every way a weight changes is seen by the next call (nothing is cached) -----------------------

@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "data_copy", "data_assign",
                                    "no_grad_inplace", "param_assign"])
def test_every_change_of_the_weight_shows_in_the_next_output(change):
    torch.manual_seed(0)
    layer = GroupedLinear(N, D_IN, D_OUT, weight_layout="in_out")
    x = torch.randn(3, N, D_IN)
    with torch.no_grad():
        layer(x)  # a first call: decides (and would fill any cache)
    new = torch.randn(N, D_OUT, D_IN)
    if change == "optimizer":
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        layer(x).sum().backward()
        opt.step()
    elif change == "load_state_dict":
        layer.load_state_dict({"weight": new, "bias": layer.bias.detach().clone()})
    elif change == "data_copy":
        layer.weight.data.copy_(new)
    elif change == "data_assign":
        layer.weight.data = new.clone()  # a contiguous tensor: another layout, still correct
    elif change == "no_grad_inplace":
        with torch.no_grad():
            layer.weight.mul_(2.0)
    else:
        layer.weight = nn.Parameter(new.clone())
    with torch.no_grad():
        got = layer(x)
    expected = torch.einsum("bni,noi->bno", x, layer.weight.detach()) + layer.bias.detach()
    torch.testing.assert_close(got, expected)


# ---- bmm / einsum produce the output contract's layout without a copy ------------------------------

@pytest.mark.parametrize("fn", ["bmm", "einsum"])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("stored", ["n_out_in", "n_in_out"])
@pytest.mark.parametrize("grad", [False, True])
def test_bmm_and_einsum_return_a_fresh_group_major_result(fn, lead, stored, grad):
    from grouped_ops.ops import grouped_linear as ops  # noqa: PLC0415

    torch.manual_seed(0)
    x = torch.randn(*lead, N, D_IN, dtype=torch.float64)
    w = torch.randn(N, D_OUT, D_IN, dtype=torch.float64)
    if stored == "n_in_out":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    b = torch.randn(N, D_OUT, dtype=torch.float64)
    w.requires_grad_(grad)
    for bias in (b, None):
        raw = getattr(ops, fn)(x, w, bias)  # already group-major: the contract copies nothing
        assert raw.movedim(-2, 0).is_contiguous()
        y = ops.REGISTRY[fn](x, w, bias)
        assert group_major(y) and y.shape == (*lead, N, D_OUT)
        expected = torch.einsum("...ni,noi->...no", x, w) + (0 if bias is None else bias)
        torch.testing.assert_close(y, expected)
        assert y.requires_grad == grad


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own
@pytest.mark.parametrize("fn", ["bmm"])
def test_forward_mode_ad_through_bmm(fn):
    import torch.autograd.forward_ad as fwad  # noqa: PLC0415

    from grouped_ops.ops import grouped_linear as ops  # noqa: PLC0415

    torch.manual_seed(0)
    x, w, b = torch.randn(3, N, D_IN), torch.randn(N, D_OUT, D_IN), torch.randn(N, D_OUT)
    tangent = torch.randn_like(x)
    with fwad.dual_level():  # dual tensors need no requires_grad, but out= has no forward AD
        y = getattr(ops, fn)(fwad.make_dual(x, tangent), w, b)
        _, jvp = fwad.unpack_dual(y)
    torch.testing.assert_close(jvp, torch.einsum("bni,noi->bno", tangent, w))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("groups", [2, 8])
def test_bmm_computes_the_weights_gradient_in_the_weights_own_layout(layout, groups):
    # autograd's own bmm backward gives [n, in, out], which AccumulateGrad copies element by element
    # into nn.Linear's layout; bmm trains through _BmmLinear, which computes it in that layout (as
    # bmm_weight_left does)
    from grouped_ops.ops import SPECS

    registry = SPECS["grouped_linear"].registry
    x, b = torch.randn(5, groups, 64), torch.randn(groups, 64)
    w = _empty_weight(groups, 64, 64, layout).copy_(torch.randn(groups, 64, 64)).requires_grad_(True)
    grads = {}
    for name in ("bmm", "bmm_weight_left"):
        (grads[name],) = torch.autograd.grad(registry[name](x, w, b).sum(), w)
        torch.testing.assert_close(grads[name], grads["bmm"])
    through_function = registry["bmm"](x, w, b).grad_fn.name().startswith("_BmmLinear")
    assert through_function == (layout == "out_in")
    if through_function or layout == "in_out":
        assert grads["bmm"].stride() == w.stride()
    if layout == "out_in":
        assert grads["bmm_weight_left"].stride() == w.stride()
