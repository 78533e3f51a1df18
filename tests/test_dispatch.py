"""The dispatcher: when it may tune and when it must not (autotune off, compiling, meta and fake
tensors, CUDA graph capture), threads, decision sources and the verbose log."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import FakeTimer, disk_entries, gl_args, group_major, make_stale, wc_args

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.dispatch import resolve
from grouped_ops.ops import SPECS
from grouped_ops.ops import _bmm_linear as bl
from grouped_ops.registry import Implementation
from grouped_ops.tuning.settings import settings

GL, WC = SPECS["grouped_linear"], SPECS["weighted_combine"]


# ---- when tuning is not allowed ----------------------------------------------------------------------

def test_autotune_off_tunes_nothing_and_writes_nothing(monkeypatch, tmp_path, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    timer = FakeTimer()
    x, w, b = gl_args()
    with dispatch.use_timer(timer):
        y = grouped_ops.grouped_linear(x, w, b)
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
        wc = grouped_ops.prewarm("weighted_combine", *wc_args(as_list=True))
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop"))
    assert (d.impl, d.source) == ("bmm", "default")  # remembered from the call above, still a guess
    assert (wc.impl, wc.source) == ("loop", "default")  # the documented rule for lists
    assert not timer.calls and not count_tunings
    assert not (tmp_path / "cache").exists()
    dispatch.clear_memory()
    assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "default"


def test_autotune_off_uses_the_disk_cache_and_stale_entries(monkeypatch):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        assert grouped_ops.prewarm("grouped_linear", x, w, b).impl == "einsum"
    x2, w2, b2 = gl_args(n=2)
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        assert grouped_ops.prewarm("grouped_linear", x2, w2, b2).impl == "loop"
    make_stale(grouped_ops.lookup("grouped_linear", x2, w2, b2).signature.key())
    dispatch.clear_memory()
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        fresh = grouped_ops.prewarm("grouped_linear", x, w, b)
        stale = grouped_ops.prewarm("grouped_linear", x2, w2, b2)
    assert (fresh.impl, fresh.source) == ("einsum", "cache")
    assert (stale.impl, stale.source) == ("loop", "stale")  # better than a guess when we may not tune
    assert not timer.calls


def test_autotune_off_answers_a_new_batch_size_from_the_nearest_tuned_one(monkeypatch):
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.prewarm("grouped_linear", *gl_args(batch=64))
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    d = grouped_ops.prewarm("grouped_linear", *gl_args(batch=100))
    assert (d.impl, d.source) == ("einsum", "nearest")
    other = grouped_ops.prewarm("grouped_linear", *gl_args(batch=100, n=3))  # another family
    assert other.source == "default"


def test_never_tunes_while_compiling(monkeypatch, count_tunings):
    x, w, b = gl_args()
    timer = FakeTimer()
    with monkeypatch.context() as m, dispatch.use_timer(timer):
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        y = dispatch.call(GL, (x, w, b), "auto")
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop"))
    assert not timer.calls and not count_tunings
    assert grouped_ops.lookup("grouped_linear", x, w, b) is None  # a tracing-time answer is not kept
    assert disk_entries() == []


def test_torch_compile_does_not_tune_while_tracing():
    x, w, b = gl_args()
    timer = FakeTimer()

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, w, b):
        return grouped_ops.grouped_linear(x, w, b) * 2

    with dispatch.use_timer(timer):
        y = f(x, w, b)
    torch.testing.assert_close(y, grouped_ops.grouped_linear(x, w, b, impl="loop") * 2)
    assert not any(timer.compiling), "timed a candidate while dynamo was tracing"
    # cold: the compiled code's custom op decided when it really ran
    assert grouped_ops.lookup("grouped_linear", x, w, b) is not None


def test_never_tunes_on_meta_or_fake_tensors(count_tunings):
    from torch._subclasses.fake_tensor import FakeTensorMode

    timer = FakeTimer()
    with dispatch.use_timer(timer):
        x, w, b = (t.to("meta") for t in gl_args())
        # the dispatcher itself: the public functions trip over autocast on meta (see below)
        assert dispatch.call(GL, (x, w, b), "auto").shape == (8, 4, 8)
        assert dispatch.call(WC, tuple(t.to("meta") for t in wc_args()), "auto").shape == (8, 16)
        with FakeTensorMode():
            x, w, b = torch.empty(8, 4, 8), torch.empty(4, 8, 8), torch.empty(4, 8)
            assert grouped_ops.grouped_linear(x, w, b).shape == (8, 4, 8)
    assert not timer.calls and not count_tunings
    assert disk_entries() == []


def test_never_tunes_while_capturing_a_cuda_graph(monkeypatch):
    # No GPU needed: a CUDA signature is only a description; ask the rule itself.
    sig = dataclasses.replace(grouped_ops.prewarm("grouped_linear", *gl_args()).signature,
                              device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert resolve._tuning_blocker(sig, None, settings(), True) == ("capturing a CUDA graph", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert resolve._tuning_blocker(sig, None, settings(), True) == (None, False)


def test_public_ops_run_on_meta_tensors():
    timer = FakeTimer()
    with dispatch.use_timer(timer):
        x, w, b = (t.to("meta") for t in gl_args())
        assert grouped_ops.grouped_linear(x, w, b).shape == (8, 4, 8)
        assert grouped_ops.weighted_combine(*(t.to("meta") for t in wc_args())).shape == (8, 16)
    assert not timer.calls


# ---- threads -----------------------------------------------------------------------------------------

def test_threads_first_calling_one_signature_tune_it_once(monkeypatch, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_TUNE_REPS", "1")
    # sleep: widen the window in which a second tuning could start; bmm far ahead: no confirmation
    timer = FakeTimer({"bmm": 1e-6}, default=1e-3, sleep=0.005)
    barrier = threading.Barrier(8)
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    x, w, b = gl_args()

    def first_call() -> None:
        try:
            barrier.wait()
            results.append(grouped_ops.grouped_linear(x, w, b))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with dispatch.use_timer(timer):
        threads = [threading.Thread(target=first_call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert len(results) == 8 and all(torch.equal(r, results[0]) for r in results)
    assert list(count_tunings.values()) == [1]
    assert sum(timer.calls.values()) == len(GL.registry)  # each candidate timed once, by one thread


# ---- where a decision comes from, and saying so ------------------------------------------------------

def test_decision_sources():
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer()):
        assert grouped_ops.lookup("grouped_linear", x, w, b) is None
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "tuned"
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "cache"  # memory
        dispatch.clear_memory()
        assert grouped_ops.lookup("grouped_linear", x, w, b).source == "cache"  # disk
        assert grouped_ops.prewarm("grouped_linear", x, w, b).source == "cache"
    d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert str(d).startswith("bmm (cache) for grouped_linear(batch=8")
    assert "bmm" in d.table() and "*" in d.table()


def test_decisions_are_logged_and_printed_on_request(monkeypatch, capsys, caplog):
    monkeypatch.setenv("GROUPED_OPS_VERBOSE", "1")
    with caplog.at_level(logging.INFO, logger="grouped_ops"), dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        grouped_ops.grouped_linear(*gl_args())
    line = "-> einsum (tuned)"
    assert line in capsys.readouterr().err
    assert any(line in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


# ---- prepared functions on the hot path (Implementation.prepare) -------------------------------------

def _memoised(x, w, b, impl="bmm"):
    """What the hot path's memo holds for this call."""
    return dispatch._MEMO.get(dispatch._key(GL, GL.meta(x, w, b), impl))


def _fp64_linear(x, w, b):
    y = torch.einsum("...ni,noi->...no", x.double(), w.double())
    return y if b is None else y + b.double()


@pytest.mark.parametrize("impl", ["bmm"])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (0,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_a_decided_call_runs_its_prepared_function_with_the_implementations_bits(impl, lead, bias, layout):
    g = torch.Generator().manual_seed(0)
    n, inn, out = 4, 6, 5
    x = torch.randn(*lead, n, inn, generator=g)
    w = torch.randn(n, out, inn, generator=g) if layout == "out_in" else \
        torch.randn(n, inn, out, generator=g).transpose(1, 2)
    b = torch.randn(n, out, generator=g) if bias else None
    first = grouped_ops.grouped_linear(x, w, b, impl=impl)
    run = _memoised(x, w, b, impl)
    assert run is not None and not isinstance(run, Implementation)  # the prepared function
    second = grouped_ops.grouped_linear(x, w, b, impl=impl)
    with torch.no_grad():
        third = grouped_ops.grouped_linear(x, w, b, impl=impl)  # another key (grad mode off): prepared too
    expected = GL.registry[impl](x, w, b)
    for y in (first, second, third):
        assert torch.equal(y, expected) and y.shape == (*lead, n, out)
        assert group_major(y)  # the output contract
    torch.testing.assert_close(second, _fp64_linear(x, w, b).float())


@pytest.mark.parametrize("impl", ["bmm"])
def test_a_decided_training_call_goes_through_the_prepared_bmm_linear(monkeypatch, impl):
    x, w, b = gl_args(batch=3, n=4, inn=6, out=5, grad=True)
    x.requires_grad_()
    gy = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for functions in (("_BmmLinear", "_BmmLinear3d"), ("_BmmLinear3d",)):  # decided: the prepared (3-D) one
        y = grouped_ops.grouped_linear(x, w, b, impl=impl)
        assert type(y.grad_fn).__name__ in {f"{f}Backward" for f in functions} and group_major(y)
        grads.append(torch.autograd.grad(y, (x, w, b), gy))
    assert not isinstance(_memoised(x, w, b, impl), Implementation)
    assert all(torch.equal(p, q) for p, q in zip(*grads, strict=True))
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = torch.autograd.grad(_fp64_linear(x64, w64, b64), (x64, w64, b64), gy.double())
    for got, want in zip(grads[1], expected, strict=True):
        torch.testing.assert_close(got, want.float())
    assert grads[1][1].stride() == w.stride()  # the weight's gradient in the weight's layout


def test_a_prepared_function_hands_subclasses_and_autocast_over_to_the_implementation():
    x, w, b = gl_args()
    handed = []
    implementation = GL.registry["bmm"]

    def spy(*args):
        handed.append(type(args[0]))
        return implementation(*args)

    run = bl.prepare_bmm(GL.meta(x, w, b), spy)
    assert torch.equal(run(x, w, b), implementation(x, w, b)) and not handed

    class Marked(torch.Tensor):
        pass

    run(x.as_subclass(Marked), w, b)
    with torch.autocast("cpu"):
        run(x, w, b)
    assert handed == [Marked, torch.Tensor]


def test_only_plain_eager_calls_memoise_a_prepared_function():
    x, w, b = gl_args()
    with fwAD.dual_level():
        grouped_ops.grouped_linear(fwAD.make_dual(x, torch.ones_like(x)), w, b, impl="bmm")
    torch.func.vmap(lambda xi: grouped_ops.grouped_linear(xi, w, b, impl="bmm"))(x.unsqueeze(0).expand(2, -1, -1, -1))
    torch.jit.trace(lambda xi: grouped_ops.grouped_linear(xi, w, b, impl="bmm"), (x,), check_trace=False)
    assert dispatch._MEMO and all(isinstance(run, Implementation) for run in dispatch._MEMO.values())
    grouped_ops.grouped_linear(x, w, b, impl="bmm")
    assert not isinstance(_memoised(x, w, b), Implementation)
