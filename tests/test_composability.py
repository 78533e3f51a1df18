"""The ops inside the rest of PyTorch: first calls (signatures never tuned) in every context users
run them in, and the caller's state left as it was.

Each context: the result is right, what the tuning needs is done in a clean context or not at all,
and the user's cache holds nothing tuned inside a context where timings mean nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import grouped_ops
from grouped_ops import GroupedLinear, GroupedOpsError, dispatch, grouped_linear, weighted_combine
from grouped_ops.tuning import store

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def fake_timer(name, fn, number):  # deterministic, fast: bmm always wins
    return {"bmm": 1e-5}.get(name, 2e-5)


def disk_impls() -> list[str]:
    return sorted(e["impl"] for e in store.DiskStore().entries())


def gl_args(batch=6, n=3, inn=5, out=4, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n, inn, generator=g, dtype=dtype), torch.randn(n, out, inn, generator=g, dtype=dtype),
            torch.randn(n, out, generator=g, dtype=dtype))


def gl_ref(x, w, b):
    return torch.stack([F.linear(x[..., i, :], w[i], b[i]) for i in range(w.shape[0])], -2)


def wc_args(batch=6, k=3, f=5, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, k, f, generator=g, dtype=dtype), torch.softmax(torch.randn(batch, k, generator=g, dtype=dtype), -1)


def wc_ref(xs, w):
    return (xs * w[..., None]).sum(1)


# ---- torch.func ------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev", "jvp", "functional_call"])
def test_grouped_linear_first_call_inside_torch_func(transform):
    x, w, b = gl_args()
    W = torch.stack([w, 2 * w])
    layer = GroupedLinear(3, 5, 4, dtype=F64)
    rng = torch.get_rng_state()
    if transform == "vmap":
        got, want = vmap(lambda w_: grouped_linear(x, w_, b))(W), torch.stack([gl_ref(x, w_, b) for w_ in W])
    elif transform == "grad":
        got = grad(lambda w_: grouped_linear(x, w_, b).pow(2).sum())(w)
        want = grad(lambda w_: gl_ref(x, w_, b).pow(2).sum())(w)
    elif transform == "jacrev":
        got, want = jacrev(lambda x_: grouped_linear(x_, w, b))(x[:2]), jacrev(lambda x_: gl_ref(x_, w, b))(x[:2])
    elif transform == "jvp":
        t = 0.5 * x.flip(0)
        got = jvp(lambda x_: grouped_linear(x_, w, b), (x,), (t,))[1]
        want = jvp(lambda x_: gl_ref(x_, w, b), (x,), (t,))[1]
    else:
        params = {"weight": w, "bias": b}
        got, want = functional_call(layer, params, (x,)), gl_ref(x, w, b)
    torch.testing.assert_close(got, want)
    assert torch.equal(torch.get_rng_state(), rng)
    if transform != "functional_call":  # (functional_call is a plain call: it may tune and store)
        assert disk_impls() == []  # nothing was timed inside the transform, so nothing is stored


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev", "jvp"])
def test_weighted_combine_first_call_inside_torch_func(transform):
    xs, w = wc_args()
    if transform == "vmap":
        XS, WS = torch.stack([xs, xs + 1]), torch.stack([w, w.flip(0)])
        got, want = vmap(weighted_combine)(XS, WS), vmap(wc_ref)(XS, WS)
    elif transform == "grad":
        got = grad(lambda w_: weighted_combine(list(xs.unbind(1)), w_).pow(2).sum())(w)
        want = grad(lambda w_: wc_ref(xs, w_).pow(2).sum())(w)
    elif transform == "jacrev":
        got, want = jacrev(lambda w_: weighted_combine(xs, w_))(w), jacrev(lambda w_: wc_ref(xs, w_))(w)
    else:
        t = torch.randn_like(xs)
        got, want = jvp(lambda a: weighted_combine(a, w), (xs,), (t,))[1], jvp(lambda a: wc_ref(a, w), (xs,), (t,))[1]
    torch.testing.assert_close(got, want)
    assert disk_impls() == []


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_every_implementation_works_under_vmap_grad_and_double_backward(op):
    args, ref = (gl_args(), gl_ref) if op == "grouped_linear" else (wc_args(), wc_ref)
    fn = getattr(grouped_ops, op)
    for impl in grouped_ops.implementations(op):
        try:
            fn(*args, impl=impl)
        except GroupedOpsError:
            continue  # declared unsupported for float64 here (grouped_mm)
        batched = torch.stack([args[0], 2 * args[0]])
        torch.testing.assert_close(vmap(lambda a, impl=impl: fn(a, *args[1:], impl=impl))(batched),
                                   vmap(lambda a: ref(a, *args[1:]))(batched), msg=impl)
        torch.testing.assert_close(grad(lambda a, impl=impl: fn(a, *args[1:], impl=impl).pow(3).sum())(args[0]),
                                   grad(lambda a: ref(a, *args[1:]).pow(3).sum())(args[0]), msg=impl)
        a = args[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(a, *args[1:], impl=impl).pow(3).sum(), a, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), a)
        a2 = args[0].clone().requires_grad_()
        (g2,) = torch.autograd.grad(ref(a2, *args[1:]).pow(3).sum(), a2, create_graph=True)
        torch.testing.assert_close(gg, torch.autograd.grad(g2.sum(), a2)[0], msg=impl)


def _ragged_ref(x, w, b, offsets):
    rows, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        rows.append(F.linear(x[start:end], w[g], b[g]))
        start = end
    rows.append(x[start:] @ w[0].t() * 0)  # rows past the last offset: zero
    return torch.cat(rows)


@pytest.mark.parametrize("impl", ["auto", *grouped_ops.implementations("grouped_linear_ragged")])
def test_every_ragged_implementation_works_under_torch_func(impl):
    # an empty group and a row past the last offset; float32: grouped_mm takes no float64
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(7, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, generator=g)
    offsets = torch.tensor([2, 2, 6])

    def op(x_, w_, b_):
        return grouped_linear(x_, w_, b_, offsets=offsets, impl=impl)

    for argnums in (0, 1, 2):
        torch.testing.assert_close(grad(lambda *a: op(*a).pow(2).sum(), argnums)(x, w, b),
                                   grad(lambda *a: _ragged_ref(*a, offsets).pow(2).sum(), argnums)(x, w, b), msg=impl)
    torch.testing.assert_close(jacrev(op, 1)(x, w, b), jacrev(lambda *a: _ragged_ref(*a, offsets), 1)(x, w, b))
    t = torch.randn(3, 4, 8, generator=g)
    torch.testing.assert_close(jvp(lambda w_: op(x, w_, b), (w,), (t,))[1],
                               jvp(lambda w_: _ragged_ref(x, w_, b, offsets), (w,), (t,))[1], msg=impl)
    xs = torch.stack([x, 2 * x])
    torch.testing.assert_close(vmap(lambda x_: op(x_, w, b))(xs), vmap(lambda x_: _ragged_ref(x_, w, b, offsets))(xs))
    wr = w.clone().requires_grad_()  # vmap over the input of a weight autograd records (torch.func's ensembling)
    vmap(lambda x_: op(x_, wr, b))(xs).pow(2).sum().backward()
    wr2 = w.clone().requires_grad_()
    vmap(lambda x_: _ragged_ref(x_, wr2, b, offsets))(xs).pow(2).sum().backward()
    torch.testing.assert_close(wr.grad, wr2.grad, msg=impl)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("lead", [(), (6,), (2, 3)])
def test_bmm_eager_training_function_has_every_first_and_second_derivative(layout, lead):
    # bmm's eager training path for nn.Linear's layout is an autograd.Function of its own
    # (_BmmLinear): its backward must give every gradient, for any leading dims, and be
    # differentiable; a weight stored [n, in, out] takes autograd's own bmm graph
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 3, 5, dtype=F64, generator=g).requires_grad_()
    w = torch.randn(3, 4, 5, dtype=F64, generator=g) if layout == "out_in" else \
        torch.randn(3, 5, 4, dtype=F64, generator=g).transpose(1, 2)
    w.requires_grad_()
    b = torch.randn(3, 4, dtype=F64, generator=g, requires_grad=True)
    assert grouped_linear(x, w, b, impl="bmm").grad_fn.name().startswith("_BmmLinear") == (layout == "out_in")
    fn = lambda x_, w_, b_: grouped_linear(x_, w_, b_, impl="bmm")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(lambda x_, w_: grouped_linear(x_, w_, None, impl="bmm"), (x, w))


def test_bmm_eager_training_function_detects_an_input_changed_before_backward():
    x, w, b = (t.requires_grad_() for t in gl_args())
    y = grouped_linear(x, w, b, impl="bmm")
    assert y.grad_fn.name().startswith("_BmmLinear")
    with torch.no_grad():
        w.mul_(2)  # what an optimizer step between forward and backward would do
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- tracing and scripting ---------------------------------------------------------------------------

def test_jit_trace_of_both_ops_generalises_to_other_batch_sizes():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = GroupedLinear(3, 8, 8).requires_grad_(False)

        def forward(self, x, w):
            return weighted_combine(self.layer(x), w)

    model = Model().eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(5, 3, 8), torch.softmax(torch.randn(5, 3), -1)))
        x, w = torch.randn(11, 3, 8), torch.softmax(torch.randn(11, 3), -1)
        torch.testing.assert_close(traced(x, w), model(x, w))


def test_jit_script_of_grouped_linear_says_what_to_use_instead():
    with pytest.raises(GroupedOpsError, match=r"torch.jit.script.*torch.jit.trace"):
        torch.jit.script(GroupedLinear(2, 3, 4))


EXPORT_LOAD = textwrap.dedent("""
    import sys, torch
    import grouped_ops  # registers the custom ops the program calls
    ep = torch.export.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    torch.testing.assert_close(ep.module()(x), torch.load(sys.argv[3]))
    print("ok")
""")


def test_export_with_a_dynamic_batch_saves_and_loads_in_a_fresh_process(tmp_path):
    class Mixture(nn.Module):  # both ops: heads, then a per-sample mix of the heads
        def forward(self, h):
            return weighted_combine(h, torch.softmax(h.mean(-1), -1))

    torch.manual_seed(0)
    model = nn.Sequential(GroupedLinear(3, 8, 6), nn.ReLU(), GroupedLinear(3, 6, 4), Mixture()).eval()
    x = torch.randn(5, 3, 8)
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch}})
    torch.export.save(ep, tmp_path / "model.pt2")
    other = torch.randn(17, 3, 8)
    torch.save(other, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(other), tmp_path / "y.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", EXPORT_LOAD, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ---- checkpointing, modes, inference, anomaly, profiler -------------------------------------------

@pytest.mark.parametrize("reentrant", [False, True])
def test_first_training_call_inside_activation_checkpointing(reentrant):
    x, w, b = gl_args()
    xs, cw = wc_args()
    w.requires_grad_()
    cw.requires_grad_()
    x.requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad

    def block(x_, w_, cw_):
        h = grouped_linear(x_, w_, b)
        return weighted_combine(h, cw_)

    with dispatch.use_timer(fake_timer):
        y = checkpoint(block, x, w, cw, use_reentrant=reentrant)
        y.pow(2).sum().backward()
    w_ref, cw_ref = w.detach().clone().requires_grad_(), cw.detach().clone().requires_grad_()
    wc_ref(gl_ref(x.detach(), w_ref, b), cw_ref).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    torch.testing.assert_close(cw.grad, cw_ref.grad)
    assert disk_impls()  # tuned, in a clean context, and stored


class CountingDispatchMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class CountingFunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_modes_around_a_first_call_see_only_the_users_op(op):
    args = gl_args(dtype=torch.float32) if op == "grouped_linear" else wc_args(dtype=torch.float32)
    fn = getattr(grouped_ops, op)
    with dispatch.use_timer(fake_timer):
        with CountingDispatchMode() as cold_d, CountingFunctionMode() as cold_f:
            fn(*args)  # first call: tunes
        with CountingDispatchMode() as warm_d, CountingFunctionMode() as warm_f:
            fn(*args)  # decided: just the op
    assert cold_d.ops == warm_d.ops and cold_f.calls == warm_f.calls
    assert disk_impls()


def test_flop_counter_counts_exactly_the_users_flops_on_a_first_call():
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = gl_args(batch=8, n=4, inn=16, out=32, dtype=torch.float32)
    with dispatch.use_timer(fake_timer), FlopCounterMode(display=False) as counter:
        grouped_linear(x, w, b)
    assert counter.get_total_flops() == 2 * 8 * 4 * 16 * 32  # bmm wins the fake timing


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_first_call_in_inference_mode_and_anomaly_mode(op):
    make, ref = (gl_args, gl_ref) if op == "grouped_linear" else (wc_args, wc_ref)
    fn = getattr(grouped_ops, op)
    with dispatch.use_timer(fake_timer):
        with torch.inference_mode():
            y = fn(*make())
        assert y.is_inference()
        torch.testing.assert_close(y, ref(*make()))
        args = make(batch=9)
        args[1].requires_grad_()
        with torch.autograd.detect_anomaly():
            fn(*args).sum().backward()
        assert torch.is_anomaly_enabled() is False
    assert len(disk_impls()) == 2  # anomaly mode is switched off for the tuning, so it is stored


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_profiler_shows_the_tuning_under_one_label_and_nothing_is_stored(op):
    from torch.profiler import ProfilerActivity, profile

    args = (gl_args if op == "grouped_linear" else wc_args)(dtype=torch.float32)
    fn = getattr(grouped_ops, op)
    with dispatch.use_timer(fake_timer):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*args)
        labels = [e.name for e in prof.events() if e.name.startswith("grouped_ops.tune")]
        assert len(labels) == 1 and op in labels[0]
        assert disk_impls() == []  # timed under the profiler: provisional
        assert grouped_ops.lookup(op, *args).provisional
        fn(*args)  # outside the profiler: tuned once more, and stored
    assert disk_impls() == ["bmm"]
    assert not grouped_ops.lookup(op, *args).provisional


def test_the_callers_state_is_unchanged_by_a_first_call():
    x, w, b = gl_args()
    w.requires_grad_()

    def call_with_hooks() -> list[torch.Size]:
        seen: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
            grouped_linear(x, w, b)
        return seen

    before = (torch.get_rng_state(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
    with dispatch.use_timer(fake_timer):
        cold = call_with_hooks()  # tunes
        warm = call_with_hooks()
    after = (torch.get_rng_state(), torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert cold == warm and cold  # the caller's hooks saw the user's call, not the tuning's runs


def test_deterministic_algorithms_give_the_default_rule_whatever_the_cache_holds():
    x, w, b = gl_args()
    with dispatch.use_timer(lambda name, fn, number: {"einsum": 1e-6}.get(name, 1e-4)):
        assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "einsum"
    torch.use_deterministic_algorithms(True)
    try:
        d = grouped_ops.lookup("grouped_linear", x, w, b)
        assert (d.impl, d.source) == ("bmm", "default")
        torch.testing.assert_close(grouped_linear(x, w, b), torch.ops.aten.bmm.default(
            x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1) + b)
    finally:
        torch.use_deterministic_algorithms(False)
    assert grouped_ops.lookup("grouped_linear", x, w, b).impl == "einsum"


# ---- overrides take effect on the next call -----------------------------------------------------

def test_exclusions_and_env_overrides_apply_to_calls_already_remembered(monkeypatch, ran):
    x, w, b = gl_args()
    timer = {"masked_dense": 1e-6, "einsum": 2e-6}
    with dispatch.use_timer(lambda name, fn, number: timer.get(name, 1e-4)):
        grouped_linear(x, w, b)
    ran.clear()
    grouped_linear(x, w, b)
    with grouped_ops.exclude_impls("masked_dense"):
        grouped_linear(x, w, b)
        assert grouped_ops.lookup("grouped_linear", x, w, b).impl == "einsum"
    monkeypatch.setenv("GROUPED_OPS_EXCLUDE", "grouped_linear=masked_dense,einsum")
    grouped_linear(x, w, b)
    monkeypatch.delenv("GROUPED_OPS_EXCLUDE")
    monkeypatch.setenv("GROUPED_OPS_IMPL", "loop")
    grouped_linear(x, w, b)
    assert grouped_ops.lookup("grouped_linear", x, w, b).impl == "loop"
    monkeypatch.delenv("GROUPED_OPS_IMPL")
    grouped_linear(x, w, b)
    assert ran == [f"grouped_linear.{name}" for name in ("masked_dense", "einsum", "bmm", "loop", "masked_dense")]


def test_a_misspelt_exclusion_is_an_error():
    with pytest.raises(GroupedOpsError, match="unknown impl 'masked'"), grouped_ops.exclude_impls("masked"):
        pass
    with pytest.raises(GroupedOpsError, match="unknown op"), grouped_ops.exclude_impls(grouped=["bmm"]):
        pass


# ---- non-finite values stay in their group ----------------------------------------------------------

# Which implementations keep a non-finite value inside its group (grouped_linear) or sample
# (weighted_combine). Every one does in the backward; in the forward masked_dense multiplies the
# zero blocks by every input, so 0 * inf = nan reaches the other groups (docs say so).
SPREADS_FORWARD = {"masked_dense"}


@pytest.mark.parametrize("impl", grouped_ops.implementations("grouped_linear"))
def test_grouped_linear_non_finite_values_stay_in_their_group(impl):
    x, w, b = gl_args(dtype=torch.float32)
    x.requires_grad_()
    try:
        y = grouped_linear(x, w, b, impl=impl)
    except GroupedOpsError:
        pytest.skip(f"{impl} does not run here")
    g = torch.randn_like(y)
    g[2, 0] = float("nan")
    y.backward(g)
    assert (~torch.isfinite(x.grad)).sum().item() == x.shape[-1]  # only x.grad[2, 0]
    x_bad = x.detach().clone()
    x_bad[2, 0, 0] = float("inf")
    bad = ~torch.isfinite(grouped_linear(x_bad, w, b, impl=impl))
    spread = bad[2, 1:].any().item() or bad[[0, 1, 3, 4, 5]].any().item()
    assert spread == (impl in SPREADS_FORWARD)


@pytest.mark.parametrize("impl", grouped_ops.implementations("weighted_combine"))
def test_weighted_combine_non_finite_values_stay_in_their_sample(impl):
    xs, w = wc_args(dtype=torch.float32)
    xs.requires_grad_()
    w.requires_grad_()
    y = weighted_combine(xs, w, impl=impl)
    g = torch.randn_like(y)
    g[2] = float("nan")
    y.backward(g)
    assert torch.isfinite(xs.grad[[0, 1, 3, 4, 5]]).all() and torch.isfinite(w.grad[[0, 1, 3, 4, 5]]).all()
    xs_bad = xs.detach().clone()
    xs_bad[2, 0, 0] = float("inf")
    spread = not torch.isfinite(weighted_combine(xs_bad, w.detach(), impl=impl)[[0, 1, 3, 4, 5]]).all()
    assert spread == (impl in SPREADS_FORWARD)


# ---- recording then prewarm ----------------------------------------------------------------------------

def test_record_tunes_nothing_and_prewarm_then_decides_as_the_cli_does(tmp_path):
    x, w, b = gl_args()
    with dispatch.use_timer(fake_timer):
        with grouped_ops.record() as rec:
            y = grouped_linear(x, w, b)
        torch.testing.assert_close(y, gl_ref(x, w, b))
        assert disk_impls() == [] and grouped_ops.lookup("grouped_linear", x, w, b) is None
        (d,) = rec.prewarm()
    assert (d.impl, d.source) == ("bmm", "tuned") and disk_impls() == ["bmm"]


# ---- bounded memory, one tuning at a time ------------------------------------------------------------

def _many_batch_sizes(count: int) -> None:
    w = torch.randn(2, 3, 4)
    x = torch.randn(count + 50, 2, 4)
    for batch in range(1, count + 1):
        grouped_linear(x[:batch], w)


@pytest.mark.parametrize("buckets", ["pow2", "exact"])
def test_many_distinct_batch_sizes_keep_every_table_bounded(buckets, monkeypatch):
    from grouped_ops.dispatch import resolve

    monkeypatch.setenv("GROUPED_OPS_BUCKETS", buckets)
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")  # nothing timed or written: only the tables grow
    # small limits, so a short run crosses each of them many times
    monkeypatch.setattr(dispatch, "MEMO_LIMIT", 50)
    monkeypatch.setattr(resolve, "DECISIONS_LIMIT", 20)
    monkeypatch.setattr(resolve, "FAMILY_LIMIT", 5)
    _many_batch_sizes(1500)
    sizes = resolve.table_sizes()
    assert len(dispatch._MEMO) <= 50 and sizes["decisions"] <= 20 and sizes["families"] <= 20
    assert sizes["family_batches"] <= 5 and sizes["tune_locks"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("buckets", ["pow2", "exact"])
def test_100_000_batch_sizes_keep_every_table_bounded(buckets, monkeypatch):
    from grouped_ops.dispatch import resolve

    monkeypatch.setenv("GROUPED_OPS_BUCKETS", buckets)
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    _many_batch_sizes(100_000)
    sizes = resolve.table_sizes()
    assert len(dispatch._MEMO) <= dispatch.MEMO_LIMIT and sizes["decisions"] <= resolve.DECISIONS_LIMIT
    assert sizes["families"] <= resolve.DECISIONS_LIMIT and sizes["family_batches"] <= resolve.FAMILY_LIMIT


def test_concurrent_first_calls_tune_one_at_a_time():
    import threading
    import time

    active, overlaps = [0], []
    lock = threading.Lock()

    def timer(name, fn, number):
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        time.sleep(0.001)
        with lock:
            active[0] -= 1
        return {"bmm": 1e-5}.get(name, 2e-5)

    threads = [threading.Thread(target=grouped_linear, args=gl_args(batch=b, dtype=torch.float32))
               for b in (3, 6, 12, 24)]
    with dispatch.use_timer(timer):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert overlaps and max(overlaps) == 1
    assert len(disk_impls()) == 4


def test_remembered_tuned_batch_sizes_are_bounded_per_family(monkeypatch):
    import dataclasses

    from grouped_ops.decision import Decision
    from grouped_ops.dispatch import resolve

    monkeypatch.setattr(resolve, "FAMILY_LIMIT", 5)
    monkeypatch.setattr(resolve, "DECISIONS_LIMIT", 20)
    with dispatch.use_timer(fake_timer):
        sig = grouped_ops.prewarm("grouped_linear", *gl_args()).signature
    for batch in range(1, 200):
        resolve.remember(Decision("bmm", "tuned", {"bmm": 1e-5}, {}, dataclasses.replace(sig).with_dim("batch", batch)))
    sizes = resolve.table_sizes()
    assert sizes["family_batches"] == 5 and sizes["decisions"] == 20


def test_eager_compiled_prewarm_and_lookup_all_ask_the_one_resolve_function(monkeypatch):
    from grouped_ops.dispatch import resolve

    asked = []
    real = resolve.decide

    def counting(spec, sig, *a, **k):
        asked.append(k.get("guess", True))
        return real(spec, sig, *a, **k)

    monkeypatch.setattr(resolve, "decide", counting)
    args = gl_args(dtype=torch.float32)
    with dispatch.use_timer(fake_timer):
        grouped_linear(*args)  # eager
        assert len(asked) == 1
        grouped_ops.lookup("grouped_linear", *args)
        assert len(asked) == 2 and asked[-1] is False
        grouped_ops.prewarm("grouped_linear", *gl_args(batch=40, dtype=torch.float32))
        assert len(asked) == 3
        torch._dynamo.reset()
        compiled = torch.compile(grouped_linear, backend="eager", fullgraph=True, dynamic=True)
        compiled(*gl_args(batch=200, dtype=torch.float32))  # planned at trace time, run by the custom op
        assert len(asked) >= 4
