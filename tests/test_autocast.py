"""Under torch.autocast both ops do what nn.Linear does: compute and return the autocast dtype
(CPU bfloat16/float16, CUDA float16/bfloat16), leave float64 alone, and give float32 parameters
float32 gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grouped_ops
from grouped_ops import GroupedLinear, grouped_linear, weighted_combine
from grouped_ops.ops import SPECS

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cpu", torch.float16, id="cpu-float16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=pytest.mark.gpu),
]


def gl_args(device, batch=16, n=4, d_in=32, d_out=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, d_in, generator=g)
    w = torch.randn(n, d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(n, d_out, generator=g)
    return x.to(device), w.to(device), b.to(device)


def linear_loop(x, w, b):
    return torch.stack([F.linear(x[..., g, :], w[g], b[g]) for g in range(w.shape[0])], dim=-2)


def assert_low_close(got, expected):
    """Equal up to two roundings of the low dtype at the output's scale: implementations round
    partial sums differently (einsum, a k-step loop), exactly as two float16 matmuls may."""
    eps = torch.finfo(expected.dtype).eps
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=2 * eps, atol=2 * eps * scale)


def supported(op, impl, *args):
    spec = SPECS[op]
    sig = spec.signature(spec.meta(*args), True)
    return spec.registry[impl].supports(sig)


@pytest.mark.parametrize("impl", ["auto", *SPECS["grouped_linear"].registry], ids=str)
@pytest.mark.parametrize("device, dtype", CASES)
def test_grouped_linear_follows_nn_linear(device, dtype, impl):
    x, w, b = gl_args(device)
    low = tuple(t.to(dtype) for t in (x, w, b))
    if impl != "auto" and not supported("grouped_linear", impl, *low):
        pytest.skip(f"{impl} does not run {dtype} on {device}")
    with torch.autocast(device, dtype=dtype):
        got = grouped_linear(x, w, b, impl=impl)
        expected = linear_loop(x, w, b)  # nn.Linear's own behaviour under the same autocast
    assert expected.dtype == dtype
    assert got.dtype == dtype
    assert_low_close(got, expected)
    if impl == "auto":  # the low-precision signature is what got decided
        assert grouped_ops.lookup("grouped_linear", *low) is not None


@pytest.mark.parametrize("device, dtype", CASES)
def test_grouped_linear_module_trains_like_nn_linear_under_autocast(device, dtype):
    torch.manual_seed(0)
    heads = nn.ModuleList(nn.Linear(32, 16) for _ in range(4)).to(device)
    layer = GroupedLinear.from_linears(heads)
    x = torch.randn(16, 4, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        got = layer(x)
        expected = torch.stack([h(x[:, g]) for g, h in enumerate(heads)], dim=1)
    assert got.dtype == expected.dtype == dtype
    assert_low_close(got, expected)
    got.float().square().mean().backward()
    expected.float().square().mean().backward()
    assert layer.weight.grad.dtype == torch.float32  # float32 master weights, float32 gradients
    torch.testing.assert_close(layer.weight.grad, torch.stack([h.weight.grad for h in heads]),
                               rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(layer.bias.grad, torch.stack([h.bias.grad for h in heads]),
                               rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
@pytest.mark.parametrize("impl", ["auto", *SPECS["weighted_combine"].registry], ids=str)
@pytest.mark.parametrize("device, dtype", CASES)
def test_weighted_combine_follows_a_matmul(device, dtype, impl, stacked):
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 3, 8, 5, generator=g).to(device)
    weights = torch.softmax(torch.randn(16, 3, generator=g), -1).to(device)
    given = inputs if stacked else list(inputs.unbind(1))
    with torch.autocast(device, dtype=dtype):
        got = weighted_combine(given, weights, impl=impl)
        # the same sum as one batched matmul, which autocast runs in the low dtype
        expected = torch.bmm(weights.unsqueeze(1), inputs.flatten(2)).reshape(16, 8, 5)
    assert expected.dtype == dtype
    assert got.dtype == dtype
    assert_low_close(got, expected)


@pytest.mark.parametrize("device, dtype", CASES)
def test_float64_is_left_alone_as_nn_linear_does(device, dtype):
    x, w, b = (t.double() for t in gl_args(device))
    plain = grouped_linear(x, w, b)
    with torch.autocast(device, dtype=dtype):
        got = grouped_linear(x, w, b)
        assert linear_loop(x, w, b).dtype == torch.float64
        combined = weighted_combine(x, torch.ones(16, 4, dtype=torch.float64, device=device))
    assert got.dtype == combined.dtype == torch.float64
    torch.testing.assert_close(got, plain)


def test_autocast_disabled_inside_is_respected():
    x, w, b = gl_args("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cpu", enabled=False):
        assert grouped_linear(x, w, b).dtype == torch.float32
        assert weighted_combine(x, torch.ones(16, 4)).dtype == torch.float32


def test_autocast_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = GroupedLinear(4, 32, 16)
    x = torch.randn(16, 4, 32)
    gates = torch.softmax(torch.randn(16, 4), -1)

    def fn(x, gates):
        return weighted_combine(torch.relu(layer(x)), gates)

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, gates)
            expected = fn(x, gates)
    finally:
        torch._dynamo.reset()
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_low_close(got, expected)
