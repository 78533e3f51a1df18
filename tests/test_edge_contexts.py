"""Contexts found by trying to break the ops (each was a failure once): forward-mode AD, exported
programs of decided signatures, torch.jit.trace's own check, autocast with float64, checkpointing
after a provisional decision, recording in one thread while another runs, inference mode with grad
enabled, meta tensors under autocast."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import group_major
from torch import nn
from torch.func import jvp
from torch.utils.checkpoint import checkpoint

import grouped_ops
from grouped_ops import GroupedLinear, GroupedOpsError, dispatch, grouped_linear, weighted_combine

REPO = Path(__file__).resolve().parents[1]


def winner(name: str):
    return lambda impl, fn, number: 1e-6 if impl == name else 1e-4


def gl_args(batch=8, grad=False):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, 16, generator=g), torch.randn(3, 8, 16, generator=g).requires_grad_(grad),
            torch.randn(3, 8, generator=g))


def wc_args(batch=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 5, generator=g), torch.softmax(torch.randn(batch, 3, generator=g), -1)


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_dual_tensors_work_with_every_implementation_and_auto(op):
    args = gl_args() if op == "grouped_linear" else wc_args()
    fn = getattr(grouped_ops, op)
    tangent = torch.randn_like(args[1])
    want = jvp(lambda w: fn(args[0], w, *args[2:], impl="loop"), (args[1],), (tangent,))[1]
    for impl in ("auto", *grouped_ops.implementations(op)):
        with fwAD.dual_level():
            try:
                y = fn(args[0], fwAD.make_dual(args[1], tangent), *args[2:], impl=impl)
            except GroupedOpsError as e:  # grouped_mm: no forward AD in torch, and it says so
                assert "forward-mode AD" in str(e) and impl == "grouped_mm"
                continue
            torch.testing.assert_close(fwAD.unpack_dual(y).tangent, want, msg=impl)


def test_jvp_avoids_a_remembered_grouped_mm_and_a_forced_one_explains():
    x, w, b = gl_args()
    with dispatch.use_timer(winner("grouped_mm")):
        grouped_linear(x, w, b)
    assert grouped_ops.lookup("grouped_linear", x, w, b).impl == "grouped_mm"
    got = jvp(lambda a: grouped_linear(a, w, b), (x,), (x,))[1]
    torch.testing.assert_close(got, grouped_linear(x, w, None, impl="loop"))
    with pytest.raises(GroupedOpsError, match="impl 'grouped_mm'.*forward-mode AD"):
        jvp(lambda a: grouped_linear(a, w, b, impl="grouped_mm"), (x,), (x,))


LOAD = textwrap.dedent("""
    import sys, torch
    import grouped_ops
    ep = torch.export.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    torch.testing.assert_close(ep.module()(x), torch.load(sys.argv[3]))
    print("ok")
""")


@pytest.mark.parametrize("how", ["tuned", "forced-masked_dense", "forced-einsum"])
def test_an_exported_program_of_a_decided_signature_loads_in_a_fresh_process(tmp_path, how):
    impl = "auto" if how == "tuned" else how.partition("-")[2]
    layer = GroupedLinear(3, 16, 8, impl=impl)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            h = self.layer(x)
            return weighted_combine(h, torch.softmax(h.mean(-1), -1), impl="masked_dense" if impl != "auto" else "auto")

    model = Model()
    x = torch.randn(6, 3, 16)
    with dispatch.use_timer(winner("bmm")):
        model(x).sum().backward()  # decided (and, for auto, tuned) eagerly first
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", min=2, max=64)}})
    assert not [n for n in program.graph.nodes if "out" in str(n.target).split(".")[-1:]]  # no out= ops
    torch.export.save(program, tmp_path / "p.pt2")
    other = torch.randn(9, 3, 16)
    torch.save(other, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(other), tmp_path / "y.pt")
    out = subprocess.run([sys.executable, "-c", LOAD, *(str(tmp_path / f) for f in ("p.pt2", "x.pt", "y.pt"))],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    # the exported module runs with gradients too (an out= op inside would refuse)
    program.module()(torch.randn(5, 3, 16, requires_grad=True)).sum().backward()


def test_jit_trace_with_its_own_check_and_grad_enabled():
    layer = GroupedLinear(3, 16, 8)
    traced = torch.jit.trace(layer, torch.randn(4, 3, 16))  # check_trace re-runs under no_grad
    x = torch.randn(7, 3, 16)
    y = traced(x)
    torch.testing.assert_close(y, layer(x))
    assert group_major(y) and y.stride() == layer(x).stride()
    xs, w = wc_args()
    traced_wc = torch.jit.trace(lambda a, b: weighted_combine(a, b, impl="einsum"), (xs, w))
    out = traced_wc(*wc_args(batch=3))
    assert not out._is_view()


def test_autocast_with_float64_weights_promotes_as_multiply_and_sum_does():
    xs, w = wc_args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = weighted_combine(xs, w.double())
        want = (xs * w.double()[..., None]).sum(1)
    assert got.dtype == want.dtype == torch.float64


def test_checkpoint_recompute_runs_what_the_forward_ran_after_a_provisional_decision():
    x, w, b = gl_args(grad=True)
    x.requires_grad_()
    state = {"winner": "loop"}
    with dispatch.use_timer(lambda impl, fn, number: 1e-6 if impl == state["winner"] else 1e-3):
        with torch.profiler.profile():
            y = checkpoint(lambda *a: grouped_linear(*a).sin(), x, w, b, use_reentrant=False)
        state["winner"] = "masked_dense"  # a second tuning would now pick another implementation
        y.sum().backward()  # the recompute must not tune again
    assert x.grad is not None


def test_recording_in_one_thread_does_not_touch_another_threads_calls():
    inside, done = threading.Event(), threading.Event()
    noted = []

    def recorder():
        with grouped_ops.record() as rec:
            inside.set()
            done.wait()
        noted.extend(rec.signatures)

    t = threading.Thread(target=recorder)
    t.start()
    inside.wait()
    with dispatch.use_timer(winner("einsum")):
        grouped_linear(*gl_args())  # this thread is not recording: it tunes
    done.set()
    t.join()
    assert noted == [] and grouped_ops.lookup("grouped_linear", *gl_args()).impl == "einsum"


class _Combine(nn.Module):
    def __init__(self, impl: str) -> None:
        super().__init__()
        self.impl, self.logits = impl, nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return weighted_combine(x, self.logits.softmax(-1), impl=self.impl)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize(("op", "impl", "layout"),
                         [("grouped_linear", i, layout) for i in grouped_ops.implementations("grouped_linear")
                          if i != "grouped_mm" for layout in ("out_in", "in_out")]
                         + [("weighted_combine", i, None) for i in grouped_ops.implementations("weighted_combine")])
def test_an_exported_module_keeps_its_gradients(op, impl, layout, strict):
    # strict export records a custom autograd.Function with grad mode off, so an implementation
    # that runs one (masked_dense; bmm's training Function under tracing) would export a module
    # whose result has no gradient; under export they run plain differentiable ops
    torch.manual_seed(0)
    if op == "grouped_linear":
        module = GroupedLinear(4, 8, 6, impl=impl, weight_layout=layout).double()
        x = torch.randn(5, 4, 8, dtype=torch.float64)
    else:
        module, x = _Combine(impl), torch.randn(3, 4, 5, dtype=torch.float64)
    exported = torch.export.export(module, (x,), strict=strict).module()
    got, want = exported(x), module(x)
    assert got.requires_grad
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(y.square().sum(), list(module.parameters())) for y in (want,)]
    got_grads = torch.autograd.grad(got.square().sum(), list(exported.parameters()))
    for g, w in zip(got_grads, grads[0], strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("impl", ["bmm", "einsum"])
def test_inference_mode_with_grad_enabled_records_no_graph_before_or_after_training(impl):
    # bmm's training takes its own autograd Function (_BmmLinear); inference mode must
    # still give a plain inference tensor, on a first call and on one memoised by training
    x, w = torch.randn(4, 8, 64), torch.randn(8, 64, 64, requires_grad=True)
    expected = torch.einsum("rni,noi->rno", x.double(), w.detach().double())
    for train_first in (False, True):
        dispatch.clear_memory()
        if train_first:
            grouped_linear(x, w, impl=impl).sum().backward()
        for _ in range(2):
            with torch.inference_mode(), torch.enable_grad():
                y = grouped_linear(x, w, impl=impl)
            assert y.is_inference() and not y.requires_grad and y.grad_fn is None
            torch.testing.assert_close(y, expected.float())


def test_meta_tensors_under_cpu_autocast_give_a_meta_result():
    x, w = torch.randn(4, 8, 64, device="meta"), torch.randn(8, 32, 64, device="meta")
    for _ in range(2):  # a first call, then the memoised one
        with torch.autocast("cpu"):
            y = grouped_linear(x, w)
        assert y.device.type == "meta" and y.shape == (4, 8, 32)
