"""A third op registered from one module (tests/toy_op.py) works on every path with no other file
edited: eager (auto and forced, forward and backward), torch.compile (cold: its custom op, tuned at
the first run; warm: inlined), prewarm and lookup (all asking the one resolve function), explain
and prewarm on the command line, and the testing helpers (strategies, agreement check)."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch
from hypothesis import given, settings

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch
from grouped_ops.cli import main
from grouped_ops.dispatch import resolve
from grouped_ops.ops import SPECS, Arg, Flag, OpSpec, register, unregister
from grouped_ops.testing import assert_implementations_agree, op_inputs


@pytest.fixture(scope="module")
def toy():
    module = importlib.import_module("toy_op")  # the import registers the op ...
    register(module.SPEC)  # ... and this again where an earlier run of this module unregistered it
    yield module
    unregister(module.OP)  # the rest of the suite sees the two built-in ops only


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def favour(winner):
    def timer(name, fn, number):
        return 1e-6 if name == winner else 1e-3
    return timer


def args(batch=8, n=4, f=6, grad=False):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, n, f, generator=g, requires_grad=grad)
    s = torch.randn(n, f, generator=g, requires_grad=grad)
    return x, s


def check_step(fn, x, s):
    """Forward and backward of ``fn`` against the definition."""
    out = fn(x, s)
    torch.testing.assert_close(out, x.detach() * s.detach())
    gx, gs = torch.autograd.grad(out.square().sum(), (x, s))
    g = 2 * out.detach()
    torch.testing.assert_close(gx, g * s.detach())
    torch.testing.assert_close(gs, (g * x.detach()).sum(0))


# ---- registration --------------------------------------------------------------------------------

def test_registration_makes_a_full_op(toy):
    assert SPECS[toy.OP] is toy.SPEC
    assert grouped_ops.implementations(toy.OP) == ("broadcast", "loop")
    assert hasattr(torch.ops.grouped_ops, f"{toy.OP}_auto")  # its custom op, for torch.compile/export
    assert toy.grouped_scale.__name__ == toy.OP
    register(toy.SPEC)  # the same spec again: nothing happens
    impostor = OpSpec(toy.OP, toy.REGISTRY, toy.meta, toy.validate, toy.signature, toy.make_inputs,
                      toy.default_impl, arguments=toy.SPEC.arguments, fake=toy.fake, backward=toy.backward)
    with pytest.raises(GroupedOpsError, match="another op is registered as 'grouped_scale'"):
        register(impostor)
    with pytest.raises(GroupedOpsError, match="needs arguments, fake and backward"):
        register(OpSpec("half_made", toy.REGISTRY, toy.meta, toy.validate, toy.signature, toy.make_inputs,
                        toy.default_impl))


@pytest.mark.parametrize(("names", "why"), [
    (("input", "input"), "distinct"), (("input", "impl"), "impl"), (("in", "scale"), "keywords"),
    (("input", "grad_mask"), "grad_mask"), (("input", "x_stacked"), "_stacked"),
])
def test_register_refuses_argument_names_the_call_or_the_custom_op_cannot_take(toy, names, why):
    arguments = tuple(dataclasses.replace(a, name=n) for a, n in zip(toy.SPEC.arguments, names, strict=True))
    with pytest.raises(GroupedOpsError, match="argument names must be distinct") as e:
        register(dataclasses.replace(toy.SPEC, name="odd_args", arguments=arguments))
    assert why in str(e.value) and "odd_args" not in SPECS


@pytest.mark.parametrize("name", ["gröup", "class", "two words"])
def test_register_refuses_an_op_name_torch_library_cannot_take(toy, name):
    with pytest.raises(GroupedOpsError, match="must be an ASCII Python identifier"):
        register(dataclasses.replace(toy.SPEC, name=name))


def test_registering_again_with_other_arguments_is_refused_not_a_broken_custom_op(toy):
    unregister(toy.OP)
    try:
        extra = (*toy.SPEC.arguments, Arg("offset", optional=True))
        with pytest.raises(GroupedOpsError, match="was defined with other arguments"):
            register(dataclasses.replace(toy.SPEC, arguments=extra))
        assert toy.OP not in SPECS
    finally:
        register(toy.SPEC)


def test_a_renamed_copy_reports_errors_under_its_own_name(toy):
    renamed = dataclasses.replace(toy.SPEC, name="scaled_copy")
    with pytest.raises(GroupedOpsError, match="scaled_copy"):
        renamed.normalize((), {}, "call")


def test_an_op_whose_cli_flags_clash_is_left_out_of_the_cli_and_the_others_still_work(toy, capsys):
    clashing = dataclasses.replace(toy.SPEC, name="clashing_flags", cli=dataclasses.replace(
        toy.SPEC.cli, flags=(*toy.SPEC.cli.flags, Flag(("--batch",), "again", dim="n"))))
    register(clashing)
    try:
        assert main(["explain", "grouped_linear", "--batch", "8", "--groups", "4", "--in", "8", "--out", "8",
                     "--no-tune"]) == 0
        assert "op 'clashing_flags' has no sub-command here: its flags clash" in capsys.readouterr().err
    finally:
        unregister("clashing_flags")


def test_the_cli_imports_a_module_of_ops_given_with_import(toy, capsys):
    unregister(toy.OP)  # as in a fresh process that has not imported it
    sys.modules.pop("toy_op")
    try:
        assert main(["--import", "toy_op", "explain", "grouped_scale", "--batch", "8", "--groups", "4",
                     "--features", "6", "--no-tune"]) == 0
        assert "grouped_scale" in capsys.readouterr().out
    finally:
        unregister(toy.OP)
        sys.modules["toy_op"] = toy
        register(toy.SPEC)
    assert main(["--import", "no_such_module_here", "cache", "path"]) == 2
    assert "--import: No module named 'no_such_module_here'" in capsys.readouterr().err


# ---- eager ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "broadcast", "loop"])
def test_eager_forward_and_backward(toy, impl):
    x, s = args(grad=True)
    with dispatch.use_timer(favour("loop")):
        check_step(lambda x, s: toy.grouped_scale(x, s, impl=impl), x, s)
    if impl == "auto":  # tuned on the first call, for the training signature
        assert grouped_ops.lookup(toy.OP, x, s).impl == "loop"
    with pytest.raises(GroupedOpsError, match=r"^grouped_scale: scale is \(3, 6\)"):
        toy.grouped_scale(x, s[:3])
    with grouped_ops.use_impl(grouped_scale="loop"), torch.no_grad():
        assert grouped_ops.lookup(toy.OP, x, s).source == "forced"


def test_autocast_and_keywords(toy):
    x, s = args()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = toy.grouped_scale(input=x, scale=s)
    assert out.dtype == torch.bfloat16
    with pytest.raises(GroupedOpsError, match=r"takes \(input, scale\)"):
        toy.grouped_scale(x, s, s)


# ---- torch.compile ---------------------------------------------------------------------------------

class Graphs:
    """A dynamo backend that keeps the names of what each graph calls, then runs it (aot_eager)."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, gm, example_inputs):
        self.names += [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    @property
    def custom_ops(self):
        return {n for n in self.names if n.startswith("grouped_ops.")}


def test_compiled_cold_then_warm_with_backward(toy):
    x, s = args(grad=True)
    assert grouped_ops.lookup(toy.OP, x, s) is None
    cold = Graphs()
    with dispatch.use_timer(favour("loop")):
        check_step(torch.compile(toy.grouped_scale, backend=cold, fullgraph=True), x, s)
    assert cold.custom_ops == {"grouped_ops.grouped_scale_auto.default"}  # nothing known: its custom op
    found = grouped_ops.lookup(toy.OP, x, s)  # decided at the compiled code's first real run
    assert found is not None and found.impl == "loop" and found.signature.grad == ("input", "scale")
    torch._dynamo.reset()
    warm = Graphs()
    check_step(torch.compile(toy.grouped_scale, backend=warm, fullgraph=True), x, s)
    assert warm.custom_ops == set() and "aten.stack" not in warm.names  # loop inlined: plain torch ops
    assert any("mul" in n for n in warm.names)


def test_compiled_forced_impl_and_dynamic_batch(toy):
    compiled = torch.compile(lambda x, s: toy.grouped_scale(x, s, impl="loop") + toy.grouped_scale(x, s),
                             backend="aot_eager", fullgraph=True, dynamic=True)
    for batch in (8, 5):
        x, s = args(batch=batch)
        torch.testing.assert_close(compiled(x, s), 2 * x * s)
        assert grouped_ops.lookup(toy.OP, x, s) is not None  # auto decided per batch at run time


# ---- prewarm, lookup and the one resolve function ------------------------------------------------

def test_eager_compiled_prewarm_and_lookup_all_ask_the_one_resolve_function(toy, monkeypatch):
    asked = []
    real = resolve.decide

    def counting(spec, sig, *a, **k):
        asked.append(spec.name)
        return real(spec, sig, *a, **k)

    monkeypatch.setattr(resolve, "decide", counting)
    with dispatch.use_timer(favour("broadcast")):
        toy.grouped_scale(*args())
        assert len(asked) == 1
        assert grouped_ops.lookup(toy.OP, *args()).impl == "broadcast"
        assert len(asked) == 2
        decision = grouped_ops.prewarm(toy.grouped_scale, *args(batch=40))  # the function names the op
        assert decision.impl == "broadcast" and decision.source == "tuned" and len(asked) == 3
        torch.compile(toy.grouped_scale, backend="eager", fullgraph=True, dynamic=True)(*args(batch=200))
        assert len(asked) >= 4
    assert set(asked) == {toy.OP}
    found = grouped_ops.lookup(toy.OP, *args(batch=40))
    assert (found.impl, found.source, found.timings) == ("broadcast", "cache", decision.timings)


# ---- the command line -------------------------------------------------------------------------------

def test_cli_explain_and_prewarm(toy, capsys):
    sizes = ["--groups", "4", "--features", "16"]
    with dispatch.use_timer(favour("loop")):
        assert main(["explain", toy.OP, "--batch", "8", *sizes]) == 0
        out = capsys.readouterr().out
        assert "grouped_scale(batch=8, n=4, f=16" in out and "decision:  loop (tuned" in out
        assert "broadcast" in out
        assert main(["prewarm", toy.OP, "--batch", "64", "100", *sizes, "--input-layout", "strided",
                     "--grad", "--single-opinion", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("-> loop (tuned)") == 2 and "grad=input,scale" in out
    x = torch.randn(4, 64, 16, requires_grad=True).transpose(0, 1)  # [64, 4, 16] as a strided view
    found = grouped_ops.lookup(toy.OP, x, torch.randn(4, 16, requires_grad=True))
    assert found is not None and found.impl == "loop"
    with pytest.raises(SystemExit):
        main(["explain", toy.OP, "--batch", "8", "--groups", "0", "--features", "1"])
    assert "must be a positive integer" in capsys.readouterr().err


# ---- the testing helpers -----------------------------------------------------------------------------

def test_strategies_and_the_agreement_check(toy):
    @settings(max_examples=25, deadline=None)
    @given(op_inputs(toy.OP))
    def agree(drawn):
        assert assert_implementations_agree(toy.grouped_scale, *drawn) == ("broadcast", "loop")

    agree()
    x, s = args(grad=True)
    with pytest.raises(AssertionError, match=r"grouped_scale: implementations disagree"):
        assert_implementations_agree(toy.OP, x, s, reference=lambda x, s: x * s * 1.01)
