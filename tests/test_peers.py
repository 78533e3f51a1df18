"""grouped_ops.peers: each peer layer, built from a ModuleList, computes what GroupedLinear does
(float64, forward and gradients), and run_peers / summarize return well-formed rows."""

from __future__ import annotations

import pytest
import torch

from grouped_ops import GroupedLinear, peers

SHAPE = peers.Shape(5, 3, 4, 6)


def _grads(module, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("name", ["tabm", "tabm_contiguous", "vmap", "loop", "compiled_loop"])
@pytest.mark.parametrize("bias", [True, False])
def test_peer_agrees_with_grouped_linear_in_float64(name, bias):
    linears = peers.make_linears(SHAPE, bias=bias, dtype=torch.float64)
    ours, peer = GroupedLinear.from_linears(linears), peers.build(name, linears)
    x = torch.randn(SHAPE.batch, SHAPE.n, SHAPE.inn, dtype=torch.float64)
    g = torch.randn(SHAPE.batch, SHAPE.n, SHAPE.out, dtype=torch.float64)
    y_ours, dx_ours = _grads(ours, x, g)
    y_peer, dx_peer = _grads(peer, x, g)
    if name.startswith("tabm"):  # TabM returns a transposed view; tabm_contiguous keeps our contract
        assert y_peer.is_contiguous() == (name == "tabm_contiguous")
    torch.testing.assert_close(y_peer, y_ours)
    torch.testing.assert_close(dx_peer, dx_ours)
    # the weight gradient, in GroupedLinear's [n, out, in] terms
    grads = [p.grad for p in peer.parameters()]
    if name.startswith("tabm"):
        dw = grads[0].transpose(1, 2)
    elif name == "vmap":
        dw = peer.stacked["weight"].grad
    else:
        mods = peer.linears if name == "loop" else peer._orig_mod.linears
        dw = torch.stack([lin.weight.grad for lin in mods])
    torch.testing.assert_close(dw, ours.weight.grad)


def test_the_peers_leave_the_modulelist_untouched_and_share_no_memory():
    linears = peers.make_linears(SHAPE)
    before = [p.detach().clone() for p in linears.parameters()]
    for name in ("grouped", "tabm", "vmap", "loop"):
        module = peers.build(name, linears)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
    for p, q in zip(linears.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_the_compiled_models_agree():
    linears = peers.make_linears(SHAPE, dtype=torch.float64)
    x = torch.randn(SHAPE.batch, SHAPE.n, SHAPE.inn, dtype=torch.float64)
    ours = peers.build("compiled_grouped_mlp", linears)(x)
    theirs = peers.build("compiled_tabm_mlp", linears)(x)
    torch.testing.assert_close(ours, theirs)


def test_run_peers_rows_and_summary():
    rows = peers.run_peers([(4, 2, 3, 5)], threads=(1,), passes=2, rounds=1, round_s=1e-4,
                           variants=("grouped", "tabm", "loop"))
    assert len(rows) == 2 * 3  # (fwd, train) x variants
    for r in rows:
        assert r["shape"] == [4, 2, 3, 5] and r["threads"] == 1 and r["mode"] in ("fwd", "train")
        assert len(r["passes_us"]) == 2 and r["us"] > 0
    summary = peers.summarize(rows)
    assert {s["mode"] for s in summary} == {"fwd", "train"}
    for s in summary:
        assert s["best_peer"] in ("tabm", "loop")
        assert s["speedup"] == pytest.approx(s["best_peer_us"] / s["ours_us"])
    assert peers.geomean([2.0, 0.5]) == pytest.approx(1.0)


def test_run_peers_gives_every_compiled_variant_room_to_compile_and_restores_dynamos_limit():
    # past dynamo's recompile limit (8 per code object) the compiled columns would time eager code
    import torch._dynamo

    config = torch._dynamo.config
    before = config.recompile_limit
    seen = []
    real_build = peers._build_cell

    def build(*args, **kwargs):
        seen.append(config.recompile_limit)
        return real_build(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peers, "_build_cell", build)
        peers.run_peers([(2, 2, 4, 4)], passes=1, rounds=1, round_s=1e-4, modes=("fwd",),
                        variants=("grouped", "compiled_loop"))
    assert seen and all(limit > before for limit in seen)
    assert config.recompile_limit == before
