"""torch.compile and CUDA graphs: warm (chosen implementation inlined), cold (one custom op, tuned at
its first real run), training, dynamic batch sizes, forced implementations and ``use_impl``.

Most tests use the ``eager``/``aot_eager`` backends (fast on CPU) with a backend that records the
FX graphs dynamo hands over, so the tests can say what was traced.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import grouped_ops
from grouped_ops import GroupedLinear, GroupedOpsError, dispatch, grouped_linear, weighted_combine
from grouped_ops.ops import SPECS
from grouped_ops.tuning import harness

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A dynamo backend that keeps each graph it is given (and, with ``aot=True``, the forward and
    backward graphs AOTAutograd makes of it) and runs it eagerly."""

    def __init__(self, aot: bool = False) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.aot_graphs: list[torch.fx.GraphModule] = []
        self._aot = aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep) if aot else None

    def _keep(self, gm, example_inputs):
        self.aot_graphs.append(gm)
        return make_boxed_func(gm.forward)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self._aot(gm, example_inputs) if self._aot else gm.forward

    def names(self, aot: bool = False) -> list[str]:
        """What each call node of the graphs calls: function names, methods, op overloads."""
        out = []
        for gm in self.aot_graphs if aot else self.graphs:
            for node in gm.graph.nodes:
                if node.op in ("call_function", "call_method"):
                    t = node.target
                    out.append(t if isinstance(t, str) else str(t) if isinstance(t, torch._ops.OpOverload)
                               else getattr(t, "__name__", str(t)))
        return out

    def custom_ops(self, aot: bool = False) -> set[str]:
        return {n for n in self.names(aot) if n.startswith("grouped_ops.")}


def favour(winner: str):
    """A fake tuning timer under which ``winner`` is the fastest candidate."""
    def timer(name, fn, number):
        return 1e-6 if name == winner else 1e-3
    return timer


def both_ops(x, w, b, branches, gates):
    y = grouped_linear(x, w, b)
    return torch.relu(y).sum(-1) + weighted_combine(branches, gates).sum(-1, keepdim=True)


def make_args(batch=8, n=4, d_in=16, d_out=32, k=3, f=6, stacked=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, n, d_in, generator=g, dtype=dtype)
    w = torch.randn(n, d_out, d_in, generator=g, dtype=dtype) / d_in**0.5
    b = torch.randn(n, d_out, generator=g, dtype=dtype)
    branches = torch.randn(batch, k, f, generator=g, dtype=dtype)
    gates = torch.softmax(torch.randn(batch, k, generator=g, dtype=dtype), -1)
    return x, w, b, (branches if stacked else list(branches.unbind(1))), gates


def lookups(x, w, b, branches, gates):
    return (grouped_ops.lookup("grouped_linear", x, w, b), grouped_ops.lookup("weighted_combine", branches, gates))


# ---- warm and cold ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_warm_inlines_the_chosen_implementations(stacked):
    args = make_args(stacked=stacked)
    with dispatch.use_timer(favour("loop")):
        assert grouped_ops.prewarm("grouped_linear", *args[:3]).impl == "loop"
    with dispatch.use_timer(favour("broadcast")):
        assert grouped_ops.prewarm("weighted_combine", *args[3:]).impl == "broadcast"
    rec = Recorder()
    got = torch.compile(both_ops, backend=rec, fullgraph=True)(*args)
    torch.testing.assert_close(got, both_ops(*args))
    assert len(rec.graphs) == 1
    assert rec.custom_ops() == set()  # nothing opaque: the compiler sees plain torch ops
    names = rec.names()
    assert names.count("linear") == 4, names  # loop: one F.linear per group ...
    assert "bmm" not in names and "baddbmm" not in names  # ... and neither op's bmm
    assert "sum" in names  # broadcast's reduction over k


def test_cold_compiles_whole_and_tunes_at_first_run():
    args = make_args()
    assert lookups(*args) == (None, None)
    rec = Recorder()
    compiled = torch.compile(both_ops, backend=rec, fullgraph=True)
    with dispatch.use_timer(favour("bmm")):  # a choice that can be inlined (grouped_mm float32 cannot)
        got = compiled(*args)
    assert len(rec.graphs) == 1
    assert rec.custom_ops() == {"grouped_ops.grouped_linear_auto.default", "grouped_ops.weighted_combine_auto.default"}
    gl, wc = lookups(*args)  # decided (and tuned) by the compiled code's first real run
    assert gl is not None and wc is not None
    assert gl.timings and wc.timings  # really timed, not a fallback
    assert gl.signature.grad == () and wc.signature.grad == ()
    torch.testing.assert_close(got, both_ops(*args))
    # Compiling again now that the choices are known: warm, the custom ops are gone.
    torch._dynamo.reset()
    rec2 = Recorder()
    torch.testing.assert_close(torch.compile(both_ops, backend=rec2, fullgraph=True)(*args), got)
    assert rec2.custom_ops() == set()


def test_cold_inside_no_grad_tunes_the_inference_signature():
    x, w, b, branches, gates = make_args()
    w.requires_grad_(True)
    with torch.no_grad():
        torch.compile(both_ops, backend="eager", fullgraph=True)(x, w, b, branches, gates)
        assert all(d is not None for d in lookups(x, w, b, branches, gates))
    assert grouped_ops.lookup("grouped_linear", x, w, b) is None  # the training one is kept apart


class Mixture(nn.Module):
    """k experts in one GroupedLinear, mixed per sample by a softmax gate."""

    def __init__(self, k: int = 4, d: int = 16, h: int = 24, stacked: bool = True) -> None:
        super().__init__()
        self.experts = GroupedLinear(k, d, h)
        self.gate = nn.Linear(d, k)
        self.k, self.stacked = k, stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.experts(x.unsqueeze(1).expand(-1, self.k, -1)))
        gates = torch.softmax(self.gate(x), -1)
        return weighted_combine(y if self.stacked else list(y.unbind(1)), gates)


def train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_training_through_compiled_grouped_linear_matches_eager(warm, stacked):
    torch.manual_seed(0)
    model = Mixture(stacked=stacked)
    reference = copy.deepcopy(model)
    x = torch.randn(8, 16)
    if warm:
        with dispatch.use_timer(favour("bmm")):  # a choice that can be inlined (grouped_mm float32 cannot)
            train_step(copy.deepcopy(model), x)  # eager training step: tunes the training signatures
    rec = Recorder(aot=True)
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    got = train_step(compiled, x)
    assert bool(rec.custom_ops()) != warm
    assert_same_step(got, train_step(reference, x))
    # the backward graph is traced too: no graph break, and warm means nothing opaque in it either
    assert len(rec.graphs) == 1 and len(rec.aot_graphs) == 2
    assert bool(rec.custom_ops(aot=True)) != warm
    # a second step reuses the compiled code
    model.experts.weight.data.add_(0.01)
    reference.experts.weight.data.add_(0.01)
    assert_same_step(train_step(compiled, x), train_step(reference, x))
    assert len(rec.graphs) == 1


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_compiled_training_computes_the_weight_gradient_in_the_weights_layout(layout):
    # Warm bmm under torch.compile trains through _BmmLinear for nn.Linear's layout (traced into
    # the graph), so the compiled backward gives the weight's gradient as [n, out, in] and no
    # transposing copy follows; a weight stored [n, in, out] keeps autograd's own bmm graph.
    torch.manual_seed(0)
    layer = GroupedLinear(4, 8, 6, weight_layout=layout).double()
    reference = copy.deepcopy(layer)
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    with grouped_ops.use_impl("bmm"):
        rec = Recorder(aot=True)
        compiled = torch.compile(layer, backend=rec, fullgraph=True, dynamic=False)
        xs = (x.clone().requires_grad_(), x.clone().requires_grad_())
        compiled(xs[0]).square().sum().backward()
        reference(xs[1]).square().sum().backward()
    assert ("autograd_function_apply" in rec.names()) == (layout == "out_in")
    assert layer.weight.grad.stride() == layer.weight.stride()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(reference, name).grad)


def test_cold_training_tunes_forward_and_backward_with_the_callers_grad_mode():
    torch.manual_seed(0)
    layer = GroupedLinear(4, 16, 24)
    x = torch.randn(8, 4, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    found = grouped_ops.lookup("grouped_linear", x, layer.weight, layer.bias)
    assert found is not None
    assert found.signature.grad == ("input", "weight", "bias")
    # every candidate was timed forward + backward (inside the custom op autograd must be re-enabled)
    assert set(found.timings) >= {"bmm", "einsum", "loop"}, found.table()
    assert not any(why.startswith("raised") for why in found.skipped.values()), found.table()
    with torch.no_grad():
        assert grouped_ops.lookup("grouped_linear", x, layer.weight, layer.bias) is None


# ---- dynamic shapes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_dynamic_batch_compiles_once_and_matches_eager(how, stacked):
    rec = Recorder()
    compiled = torch.compile(both_ops, backend=rec, fullgraph=True, dynamic=True if how == "dynamic=True" else None)
    for batch in (8, 5, 13, 64):
        args = make_args(batch=batch, stacked=stacked)
        if how == "mark_dynamic":
            for t in (args[0], args[4], *([args[3]] if stacked else args[3])):
                torch._dynamo.mark_dynamic(t, 0)
        torch.testing.assert_close(compiled(*args), both_ops(*args))
        # the choice is made per (bucketed) batch size when the compiled code runs
        assert all(d is not None for d in lookups(*args))
    assert len(rec.graphs) == 1
    assert rec.custom_ops() == {"grouped_ops.grouped_linear_auto.default", "grouped_ops.weighted_combine_auto.default"}


def test_dynamic_batch_training_matches_eager():
    torch.manual_seed(0)
    model = Mixture(stacked=False)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (8, 3, 17):
        x = torch.randn(batch, 16)
        assert_same_step(train_step(compiled, x), train_step(reference, x))


def test_automatic_dynamic_recompile_after_a_new_batch_size():
    # Without dynamic=, dynamo first specialises, then recompiles with a symbolic batch: that second
    # graph must also be whole (it used to fail converting the symbolic sizes to constants).
    rec = Recorder()
    compiled = torch.compile(both_ops, backend=rec, fullgraph=True)
    for batch in (8, 5, 11):
        args = make_args(batch=batch)
        torch.testing.assert_close(compiled(*args), both_ops(*args))
    assert len(rec.graphs) == 2


# ---- forcing an implementation ----------------------------------------------------------------------

def forced_ops(x, w, b, branches, gates):
    y = grouped_linear(x, w, b, impl="loop")
    return torch.relu(y).sum(-1) + weighted_combine(branches, gates, impl="broadcast").sum(-1, keepdim=True)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_forced_impl_is_inlined_and_never_tunes(dynamic):
    rec = Recorder()
    compiled = torch.compile(forced_ops, backend=rec, fullgraph=True, dynamic=dynamic)
    for batch in (8, 5):
        args = make_args(batch=batch)
        got = compiled(*args)
        assert lookups(*args) == (None, None)
        with grouped_ops.use_impl(grouped_linear="loop", weighted_combine="broadcast"):
            torch.testing.assert_close(got, both_ops(*args))
    assert rec.custom_ops() == set()
    assert rec.names().count("linear") == 4 * len(rec.graphs)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_use_impl_scope_is_honoured_while_tracing(dynamic):
    rec = Recorder()
    with grouped_ops.use_impl(grouped_linear="loop", weighted_combine="broadcast"):
        compiled = torch.compile(both_ops, backend=rec, fullgraph=True, dynamic=dynamic)
        for batch in (8, 5):
            args = make_args(batch=batch)
            torch.testing.assert_close(compiled(*args), both_ops(*args))
    assert lookups(*args) == (None, None)
    assert rec.custom_ops() == set()
    names = rec.names()
    assert names.count("linear") == 4 * len(rec.graphs) and "bmm" not in names


def test_env_impl_is_honoured_under_compile(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_IMPL", "grouped_linear=loop,weighted_combine=broadcast")
    rec = Recorder()
    args = make_args()
    torch.testing.assert_close(torch.compile(both_ops, backend=rec, fullgraph=True)(*args), both_ops(*args))
    assert rec.custom_ops() == set() and rec.names().count("linear") == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_implementation_compile_cannot_trace_runs_inside_the_custom_op(dtype):
    """torch's meta kernel of grouped_mm takes bfloat16 only while its CPU kernel runs float32 too,
    so a float32 grouped_mm (tuned or forced) cannot be inlined: it runs eagerly in the custom op."""
    x, w, b = make_args(dtype=dtype)[:3]
    w.requires_grad_(True)
    if not SPECS["grouped_linear"].registry["grouped_mm"].supports(
            SPECS["grouped_linear"].signature(SPECS["grouped_linear"].meta(x, w, b), True)):
        pytest.skip("grouped_mm does not run here")
    with dispatch.use_timer(favour("grouped_mm")):
        assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "grouped_mm"
    expected = grouped_linear(x, w, b)
    expected.sum().backward()
    expected_grad, w.grad = w.grad, None
    inlined = dtype == torch.bfloat16
    for impl in ("auto", "grouped_mm"):
        torch._dynamo.reset()
        rec = Recorder(aot=True)
        got = torch.compile(lambda x, w, b, impl=impl: grouped_linear(x, w, b, impl=impl), backend=rec,
                            fullgraph=True)(x, w, b)
        assert bool(rec.custom_ops()) != inlined, impl
        torch.testing.assert_close(got, expected)
        got.sum().backward()
        torch.testing.assert_close(w.grad, expected_grad)
        w.grad = None


def test_bad_arguments_raise_our_error_under_compile():
    x, w, b, branches, gates = make_args()
    bad = torch.randn(8, 5, 16)
    # Without fullgraph, dynamo falls back to eager for the frame and our error reaches the caller.
    with pytest.raises(GroupedOpsError, match=r"grouped_linear: weight has 4 groups but input has 5"):
        torch.compile(both_ops, backend="eager")(bad, w, b, branches, gates)
    torch._dynamo.reset()
    # With fullgraph, dynamo wraps it, keeping our message.
    with pytest.raises(Exception, match=r"weight has 4 groups but input has 5"):
        torch.compile(both_ops, backend="eager", fullgraph=True)(bad, w, b, branches, gates)
    torch._dynamo.reset()
    unsupported = [t.double() for t in (x, w, b)]
    with pytest.raises(GroupedOpsError, match=r"impl 'grouped_mm' does not support"):
        torch.compile(lambda x, w, b: grouped_linear(x, w, b, impl="grouped_mm"), backend="eager")(*unsupported)


# ---- the default backend -------------------------------------------------------------------------

def test_inductor_warm_and_cold_match_eager():
    torch.manual_seed(0)
    model = Mixture(stacked=True)
    x = torch.randn(8, 16)
    start = time.perf_counter()
    with torch.no_grad():
        cold = torch.compile(model, fullgraph=True)(x)  # cold: custom ops inside the inductor graph
        torch._dynamo.reset()
        warm = torch.compile(model, fullgraph=True)(x)  # warm now: inlined and fused
        expected = model(x)
    torch.testing.assert_close(cold, expected)
    torch.testing.assert_close(warm, expected)
    assert time.perf_counter() - start < 120  # a guard against a pathological compile


# ---- CUDA graphs (need a GPU) -----------------------------------------------------------------------

def cuda_args(batch=32):
    return [[t.cuda() for t in a] if isinstance(a, list) else a.cuda() for a in make_args(batch=batch)]


@pytest.fixture
def no_tuning_while_capturing(monkeypatch):
    """Fails the test if the tuner is entered while a CUDA graph is being captured."""
    calls = []
    real = harness.measure

    def spy(spec, sig, s, at=None, only=None, **kwargs):
        capturing = torch.cuda.is_current_stream_capturing()
        calls.append(capturing)
        assert not capturing, f"tuned {sig} during CUDA graph capture"
        return real(spec, sig, s, at, only, **kwargs)

    monkeypatch.setattr(harness, "measure", spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_cuda_graph_capture_never_tunes_or_synchronises(warm, no_tuning_while_capturing):
    args = cuda_args()
    x, w, b, branches, gates = args
    if warm:
        grouped_ops.prewarm("grouped_linear", x, w, b)
        grouped_ops.prewarm("weighted_combine", branches, gates)
    else:
        # Initialise cuBLAS and friends outside the capture without deciding anything.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            grouped_linear(x, w, b, impl="bmm")
            weighted_combine(branches, gates, impl="loop")
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call inside the capture raises
    try:
        with torch.cuda.graph(graph):
            out = both_ops(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if not warm:
        assert lookups(*args) == (None, None)  # nothing was tuned or remembered while capturing
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    with grouped_ops.use_impl(grouped_linear="loop", weighted_combine="loop"):
        torch.testing.assert_close(out, both_ops(*args))
    assert not any(no_tuning_while_capturing)


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_reduce_overhead_never_tunes_while_capturing(warm, no_tuning_while_capturing):
    torch.manual_seed(0)
    model = Mixture(stacked=False).cuda()
    x = torch.randn(32, 16, device="cuda")
    if warm:
        with torch.no_grad():
            model(x)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):  # warm-up run(s), the recording, then replays
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
    assert not any(no_tuning_while_capturing)


@pytest.mark.gpu
def test_reduce_overhead_training(no_tuning_while_capturing):
    torch.manual_seed(0)
    model = Mixture(stacked=True).cuda()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(32, 16, device="cuda")
    for _ in range(4):
        assert_same_step(train_step(compiled, x), train_step(reference, x))
    assert not any(no_tuning_while_capturing)
