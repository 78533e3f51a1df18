"""grouped_ops.integrations: the transformers experts backend against transformers' own ``eager``, on
experts blocks built from config objects (nothing downloaded), and the PyG HeteroLinear re-route
against HeteroLinear. CI installs both extras (``bash scripts/install.sh test``), so nothing here
skips there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")  # an extra: CI installs it (scripts/install.sh test)
torch_geometric = pytest.importorskip("torch_geometric")
np = pytest.importorskip("numpy")  # (both extras require it)

from torch_geometric.nn import HeteroLinear  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssExperts  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts  # noqa: E402

from grouped_ops import GroupedOpsError  # noqa: E402
from grouped_ops.integrations import pyg  # noqa: E402
from grouped_ops.integrations import transformers as gt  # noqa: E402
from grouped_ops.registry import tolerance  # noqa: E402

H, F, E, K = 16, 24, 6, 2


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    # the numbers are the subject here, not the choice: every implementation of the ragged op is
    # checked against float64 in tests/test_ragged_property.py
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
BLOCKS = {
    "mixtral": lambda: MixtralExperts(MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                                                    num_experts_per_tok=K)),
    "qwen3_moe": lambda: Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E,
                                                        num_experts_per_tok=K)),
    "olmoe": lambda: OlmoeExperts(OlmoeConfig(hidden_size=H, intermediate_size=F, num_experts=E,
                                              num_experts_per_tok=K)),
    "gpt_oss": lambda: GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                                                  num_experts_per_tok=K)),
}


def _block(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    block = BLOCKS[name]().to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def _run(block, impl, x, idx, w):
    block.config._experts_implementation = impl
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    for p in block.parameters():
        p.grad = None
    y = block(x, idx, w)
    (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
    return y, [x.grad, w.grad, *(p.grad for p in block.parameters())]


def test_register_returns_the_name_and_transformers_knows_it():
    name = gt.register()
    assert name == "grouped_ops"
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS[name] is gt.experts_forward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_outputs_and_gradients_match_eager(name, dtype, tokens):
    gt.register()
    block = _block(name, dtype)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    logits = torch.randn(tokens, E, generator=g)
    w, idx = torch.topk(logits.softmax(-1), K)  # float32 routing weights, even for a bfloat16 model
    w = w.to(torch.float64) if dtype == torch.float64 else w
    y_ref, g_ref = _run(block, "eager", x, idx, w)
    y, grads = _run(block, "grouped_ops", x, idx, w)
    assert y.dtype == y_ref.dtype == dtype
    tol = tolerance(dtype)
    # eager rounds each expert's weighted output to the model dtype and adds in it (index_add_);
    # the backend accumulates in float32: in bfloat16 both are a few roundings from float64
    rtol, atol = (tol.rtol, tol.atol) if dtype != torch.bfloat16 else (0.05, 0.05)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    names = ["input", "routing weights", *(n for n, _ in block.named_parameters())]
    for n, a, b in zip(names, grads, g_ref, strict=True):
        assert a is not None and a.dtype == b.dtype, n
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, scale), msg=lambda m, n=n: f"{n}: {m}")


def test_experts_no_expert_hit_and_expert_parallel_sentinels():
    gt.register()
    block = _block("mixtral", torch.float64)
    x = torch.randn(4, H, dtype=torch.float64)
    idx = torch.tensor([[0, E], [1, E + 3], [0, 1], [E, E + 1]])  # ids >= E: other ranks' tokens
    w = torch.rand(4, 2, dtype=torch.float64)
    w = w.masked_fill(idx >= E, 0.0)
    block._is_expert_parallel = True
    y, grads = _run(block, "grouped_ops", x, idx, w)
    ref_idx = idx.clamp(max=E - 1)
    block._is_expert_parallel = False
    y_ref, _ = _run(block, "eager", x, ref_idx, w)  # zero weight on the clamped sentinels
    torch.testing.assert_close(y, y_ref)
    assert grads[1][idx >= E].abs().sum() == 0  # no router gradient through a sentinel
    assert torch.equal(y[3], torch.zeros(H, dtype=torch.float64))


def _decodes_counted(monkeypatch) -> list:
    """A list that grows by one at each call of the decode path's per-token function."""
    taken = []
    one_token = gt._one_token
    monkeypatch.setattr(gt, "_one_token", lambda *a: taken.append(1) or one_token(*a))
    return taken


def _inference_inputs(tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, top-K ids and routing weights (float32, float64 with float64 hidden states)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g).to(dtype)
    w, idx = torch.topk(torch.randn(tokens, E, generator=g).softmax(-1), K)
    return x, idx, w.to(torch.float64) if dtype == torch.float64 else w


def _eager_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) against eager: the dtype's, and 0.05 in bfloat16 (eager rounds in another order)."""
    return (0.05, 0.05) if dtype == torch.bfloat16 else (tolerance(dtype).rtol, tolerance(dtype).atol)


def _assert_matches_eager_in_inference(block, x, ids, w, dtype):
    with torch.no_grad():
        block.config._experts_implementation = "eager"
        y_ref = block(x, ids.long(), w)  # (eager takes int64 ids only)
        block.config._experts_implementation = "grouped_ops"
        y = block(x, ids, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype
    rtol, atol = _eager_tolerance(dtype)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_one_token_inference_takes_the_decode_path_and_matches_eager(name, dtype, monkeypatch):
    gt.register()
    block = _block(name, dtype)
    taken = _decodes_counted(monkeypatch)
    x, idx, w = _inference_inputs(1, dtype, seed=3)
    for ids in (idx, idx.int(), idx.flip(1)):  # int32 ids too; the choices' order does not matter
        _assert_matches_eager_in_inference(block, x, ids, w, dtype)
    assert len(taken) == 3
    # expert-parallel sentinels (ids >= E) are skipped; all sentinels give zeros; a bad id is refused
    block._is_expert_parallel = True
    with torch.no_grad():
        block.config._experts_implementation = "grouped_ops"
        y_one = block(x, torch.tensor([[1, E + 2]]), w)
        y_all = block(x, torch.tensor([[E, E + 1]]), w)
        block.config._experts_implementation = "eager"
        block._is_expert_parallel = False
        y_ref = block(x, torch.tensor([[1, 1]]), w * torch.tensor([[1.0, 0.0]], dtype=w.dtype))
    rtol, atol = _eager_tolerance(dtype)
    torch.testing.assert_close(y_one, y_ref, rtol=rtol, atol=atol)
    assert torch.equal(y_all, torch.zeros_like(y_all)) and len(taken) == 5
    block.config._experts_implementation = "grouped_ops"
    with torch.no_grad(), pytest.raises(GroupedOpsError, match="num_experts"):
        block(x, torch.tensor([[0, E]]), w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_two_tokens_take_the_decode_path_in_float32_and_match_eager(name, dtype, monkeypatch):
    # two tokens in inference: each token's experts in turn in float32/float64 (gt.decode_tokens),
    # the general path in bfloat16; the same numbers as eager either way, shared experts included
    gt.register()
    block = _block(name, dtype)
    taken = _decodes_counted(monkeypatch)
    x, idx, w = _inference_inputs(2, dtype, seed=4)
    shared = idx.clone()
    shared[1] = shared[0]  # both tokens choose the same experts
    for ids in (idx, idx.flip(1), shared, shared.int()):
        _assert_matches_eager_in_inference(block, x, ids, w, dtype)
    assert len(taken) == (0 if dtype == torch.bfloat16 else 8)


def test_one_token_decode_path_refuses_what_the_general_path_refuses():
    # the decode path must not accept inputs the routing refuses: hidden_states and top_k_index of
    # different row counts (one row of hidden states with two of ids returned [2, H] silently, and
    # two with one [1, H]), non-floating routing weights, a hidden size or a bias dtype the weights
    # do not take (torch's RuntimeError there, where the general path says GroupedOpsError)
    gt.register()
    block = _block("mixtral", torch.float32)
    block.config._experts_implementation = "grouped_ops"
    x = torch.randn(1, H)
    with torch.no_grad():
        for hidden, ids in ((x, torch.tensor([[2, 5], [1, 3]])), (torch.randn(2, H), torch.tensor([[2, 5]])),
                            (x, torch.zeros(0, 2, dtype=torch.long))):
            with pytest.raises(GroupedOpsError, match=r"the same T; hidden_states.shape=\(\d, 16\)"):
                block(hidden, ids, torch.rand(ids.shape))
        with pytest.raises(GroupedOpsError, match="floating-point"):
            block(x, torch.tensor([[2, 5]]), torch.tensor([[1, 2]]))
        with pytest.raises(GroupedOpsError, match="input features"):
            block(torch.randn(1, H + 1), torch.tensor([[2, 5]]), torch.rand(1, 2))
        assert block(torch.randn(0, H), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)).shape == (0, H)
    oss = _block("gpt_oss", torch.bfloat16)
    oss.config._experts_implementation = "grouped_ops"
    oss.gate_up_proj_bias.data = oss.gate_up_proj_bias.data.float()
    with torch.no_grad(), pytest.raises(GroupedOpsError, match="dtype"):
        oss(torch.randn(1, H, dtype=torch.bfloat16), torch.tensor([[2, 5]]), torch.rand(1, 2))


def test_a_whole_model_switches_in_one_line():
    gt.register()
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                        max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).double()
    ids = torch.randint(0, 50, (2, 7))
    model.set_experts_implementation("eager")
    ref = model(ids, labels=ids)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_experts_implementation("grouped_ops")
    out = model(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    for a, b in zip((p.grad for p in model.parameters()), ref_grads, strict=True):
        torch.testing.assert_close(a, b)


# ---- PyG -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_sorted", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_rerouted_hetero_linear_gives_the_same_numbers(is_sorted, bias, dtype):
    torch.manual_seed(0)
    lin = HeteroLinear(12, 10, num_types=5, is_sorted=is_sorted, bias=bias).to(dtype)
    with torch.no_grad():
        if lin.bias is not None:
            lin.bias.normal_()
    types = torch.randint(0, 5, (40,))
    types[types == 3] = 2  # an empty type
    if is_sorted:
        types = types.sort().values
    x = torch.randn(40, 12, dtype=dtype, requires_grad=True)
    ref = lin(x, types)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *lin.parameters()])
    pyg.reroute(lin)
    out = lin(x, types)
    grads = torch.autograd.grad(out.square().sum(), [x, *lin.parameters()])
    tol = tolerance(dtype)
    torch.testing.assert_close(out, ref, rtol=tol.rtol, atol=tol.atol)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tol.rtol * 10, atol=tol.atol * 10)
    assert torch.equal(grads[1][3], torch.zeros_like(grads[1][3]))  # the empty type: exactly zero
    pyg.undo(lin)
    assert "forward" not in lin.__dict__


def test_hetero_linear_function_and_reroute_errors():
    w, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)
    out = pyg.hetero_linear(x, w, b, offsets)
    ref = torch.cat([x[:2] @ w[0] + b[0], x[2:] @ w[2] + b[2]])
    torch.testing.assert_close(out, ref)
    with pytest.raises(Exception, match="no torch_geometric.nn.HeteroLinear"):
        pyg.reroute(torch.nn.Linear(2, 2))
    lin = pyg.reroute(torch.nn.Sequential(HeteroLinear(4, 5, num_types=3)))
    with pytest.raises(Exception, match=r"type_vec holds types 0\.\.3 but num_types=3"):
        lin[0](x, torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    # one integer type per row of x, as HeteroLinear itself requires: no silently short or float type_vec
    for is_sorted in (False, True):
        lin[0].is_sorted = is_sorted
        with pytest.raises(GroupedOpsError, match=r"one type per row of x; x.shape=\(7, 4\), type_vec.shape=\(5,\)"):
            lin[0](x, torch.tensor([0, 0, 1, 2, 2]))
        with pytest.raises(GroupedOpsError, match="dtype float32"):
            lin[0](x, torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0]))
    # shapes named as the caller gave them ([K, in, out]), not as the ragged op reads them
    with pytest.raises(GroupedOpsError, match=r"weight \[K, in, out\].*x_sorted.shape=\(7, 4\), weight.shape=\(3, 5, 4\)"):
        pyg.hetero_linear(x, w.transpose(1, 2).contiguous(), b, offsets)
    with pytest.raises(GroupedOpsError, match=r"bias.shape=\(3, 4\)"):
        pyg.hetero_linear(x, w, b[:, :4], offsets)


def _twins(num_types: int, is_sorted: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A re-routed HeteroLinear and PyG's own, with the same float64 parameters (random bias)."""
    ref = HeteroLinear(6, 4, num_types=num_types, is_sorted=is_sorted).double()
    with torch.no_grad():
        ref.bias.normal_()
    lin = HeteroLinear(6, 4, num_types=num_types, is_sorted=is_sorted).double()
    lin.load_state_dict(ref.state_dict())
    return pyg.reroute(lin), ref


@pytest.mark.parametrize("is_sorted", [True, False])
def test_rerouted_hetero_linear_makes_the_offsets_again_when_type_vec_changes(is_sorted):
    # the re-routed forward keeps the last type_vec's offsets: a type_vec written in place by any
    # road (torch, a view, NumPy, .data, whose writes move no version counter), another tensor, a
    # shorter one at the same address, a changed is_sorted, and calls in and after inference mode
    # must all give PyG's numbers
    torch.manual_seed(0)
    lin, ref = _twins(3, is_sorted)
    x = torch.randn(9, 6, dtype=torch.float64)
    first = [0, 0, 0, 1, 1, 2, 2, 2, 2] if is_sorted else [2, 0, 1, 2, 0, 2, 1, 0, 2]
    second = [0, 1, 1, 1, 1, 1, 2, 2, 2] if is_sorted else [1, 1, 1, 0, 0, 0, 2, 2, 0]

    def agree(t, rows=9):
        torch.testing.assert_close(lin(x[:rows], t), ref(x[:rows], t.contiguous()))
    types = torch.tensor(first)
    agree(types)
    agree(types)  # from the memo
    types[:] = torch.tensor(second)
    agree(types)
    agree(types.clone())
    types.view(3, 3)[0, 0] = 1 if is_sorted else 0  # through a view
    agree(types)
    array = np.array(first)
    types = torch.from_numpy(array)
    agree(types)
    array[:] = second  # behind torch's back: no version counter moves
    agree(types)
    types.data[:] = torch.tensor(first)
    agree(types)
    types.data = types.data[:5]  # the same address, fewer rows
    agree(types, rows=5)
    types = torch.tensor(second)
    with torch.inference_mode():
        agree(types)
        agree(types)
    # nothing made in inference mode was kept: a training step after it saves the offsets and the
    # permutation for backward
    xr = x.clone().requires_grad_()
    out, out_ref = lin(xr, types), ref(xr, types)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), [xr, *lin.parameters()]),
                               torch.autograd.grad(out_ref.square().sum(), [xr, *ref.parameters()]))
    lin.is_sorted = ref.is_sorted = False
    shuffled = types[torch.randperm(9)]
    agree(shuffled)
    torch.utils.swap_tensors(shuffled, torch.tensor(first))  # the memo holds no weak reference to it
    agree(shuffled)


@pytest.mark.parametrize("is_sorted", [True, False])
def test_rerouted_hetero_linear_refuses_types_out_of_range_wherever_they_are(is_sorted):
    lin, _ = _twins(3, is_sorted)
    x = torch.randn(7, 6, dtype=torch.float64)
    for bad, low, high in (([0, 0, 3, 1, 1, 2, 2], 0, 3), ([0, 0, -5, 1, 1, 2, 2], -5, 2), ([0, 0, 1, 1, 2, 2, -1], -1, 2)):
        with pytest.raises(GroupedOpsError, match=rf"type_vec holds types {low}\.\.{high} but num_types=3"):
            lin(x, torch.tensor(bad))


@pytest.mark.parametrize("is_sorted", [True, False])
def test_rerouted_hetero_linear_takes_small_integer_type_vecs_with_many_types(is_sorted):
    # an int8 type_vec with 200 types: the types' range was made in its dtype and overflowed
    lin = pyg.reroute(HeteroLinear(6, 4, num_types=200, is_sorted=is_sorted).double())
    x = torch.randn(3, 6, dtype=torch.float64)
    types = torch.tensor([0, 2, 127] if is_sorted else [2, 127, 0])
    torch.testing.assert_close(lin(x, types.to(torch.int8)), lin(x, types))


@pytest.mark.parametrize("is_sorted", [True, False])
def test_rerouted_hetero_linear_compiles_whole(is_sorted):
    torch.manual_seed(0)
    lin, ref = _twins(3, is_sorted)
    x = torch.randn(9, 6, dtype=torch.float64)
    types = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2] if is_sorted else [2, 0, 1, 2, 0, 2, 1, 0, 2])
    torch._dynamo.reset()
    compiled = torch.compile(lin, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, types), ref(x, types))


def test_a_rerouted_model_saves_loads_and_copies_whole():
    # torch.save(model) pickles the re-routed forward with its module (a bound method's pickle looked
    # up an attribute the module does not have, and the load failed)
    import copy
    import io

    torch.manual_seed(0)
    lin, ref = _twins(3, False)
    model = torch.nn.Sequential(lin)
    x, types = torch.randn(5, 6, dtype=torch.float64), torch.tensor([2, 0, 1, 0, 2])
    out = model[0](x, types)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert back[0].forward.module is back[0]  # its own module, not the original's
        torch.testing.assert_close(back[0](x, types), out)
        pyg.undo(back)
        assert "forward" not in back[0].__dict__
        torch.testing.assert_close(back[0](x, types), ref(x, types))


def test_import_grouped_ops_imports_neither_client():
    code = ("import sys, grouped_ops, grouped_ops.integrations\n"
            "bad = [m for m in ('transformers', 'torch_geometric') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
