"""A tuning's memory (issue 26): every implementation declares its workspace and the estimates hold
against measured peaks; a candidate is timed only within a multiple of the leanest's footprint;
free memory as the kernel means it; out of memory recognised on every device and never stored as a
full decision; the leanest implementation runs when nothing fits."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FakeTimer, gl_args, replace_impl, wc_args

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.cli.explain import explain_table
from grouped_ops.ops import SPECS
from grouped_ops.tuning import harness, memory, store
from grouped_ops.tuning import settings as settings_mod

GL, WC = SPECS["grouped_linear"], SPECS["weighted_combine"]
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)")


def _sig(spec, *args):
    return spec.signature(spec.meta(*args), True)


# ---- the call's bytes, by arithmetic -------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "chunked", "shared", "strided"])
def test_call_bytes_match_the_private_inputs(grad, layout):
    """The arithmetic agrees with the tensors make_inputs makes (storages, result, gradients)."""
    sig = _sig(GL, *gl_args(batch=6, n=3, inn=8, out=4, grad=grad))
    sig = sig.__class__(sig.op, sig.dims, sig.dtype, sig.device,
                        tuple((k, layout if k == "weight" else v) for k, v in sig.layout), sig.grad)
    args = GL.make_inputs(sig, torch.Generator().manual_seed(0))
    operands = sum(t.untyped_storage().nbytes() for t in args if t is not None)
    grads = sum(t.numel() * t.element_size() for t in GL.grad_args(sig, args)) if grad else 0
    result = GL.fake(*args).nbytes
    assert tuple(GL.call_bytes(sig)) == (operands, result, grads)


@pytest.mark.parametrize("as_list", [False, True])
def test_call_bytes_of_weighted_combine(as_list):
    inputs, weights = wc_args(batch=5, k=3, f=7, as_list=as_list)
    sig = _sig(WC, inputs, weights)
    args = WC.make_inputs(sig, torch.Generator().manual_seed(0))
    flat = [*(args[0] if isinstance(args[0], tuple) else (args[0],)), args[1]]
    assert WC.call_bytes(sig) == (sum(t.untyped_storage().nbytes() for t in flat), WC.fake(*args).nbytes, 0)


def test_a_first_call_loads_no_dynamo():
    """The estimate needs no meta tensors (they load torch._dynamo: ~85 MB of RSS, 800 modules)."""
    code = ("import sys, torch, grouped_ops as go\n"
            "go.grouped_linear(torch.randn(4, 3, 8), torch.randn(3, 8, 8))\n"
            "go.weighted_combine(torch.randn(4, 3, 8), torch.softmax(torch.randn(4, 3), -1))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                         env=_private_env()).stdout
    assert out.split()[-1] == "False"


def _private_env(tmp: Path | None = None) -> dict[str, str]:
    import tempfile

    return dict(os.environ, GROUPED_OPS_CACHE_DIR=str(tmp or tempfile.mkdtemp()),
                GROUPED_OPS_SHIPPED_DIR=tempfile.mkdtemp(), OMP_NUM_THREADS="1")


# ---- the estimates against measured peaks (scripts/workspace_check.py) ----------------------------

FAST_CASES = [
    {"op": "grouped_linear", "impl": "einsum", "dims": {"batch": 512, "n": 8, "in": 512, "out": 512}, "grad": False},
    {"op": "grouped_linear", "impl": "loop", "dims": {"batch": 64, "n": 8, "in": 512, "out": 512}, "grad": True},
    {"op": "weighted_combine", "impl": "broadcast", "dims": {"batch": 256, "k": 4, "features": 4096}, "grad": True,
     "layout": {"inputs": "list"}},
]


def _check(cases):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from workspace_check import run_cases
    finally:
        sys.path.remove(str(SCRIPTS))
    results = run_cases(cases)
    bad = [r for r in results if not r["estimate"] / 1.5 <= r["peak"] <= r["estimate"] * 1.5]
    assert not bad, json.dumps(bad, indent=1)


def test_estimates_hold_against_measured_peaks_a_few():
    _check(FAST_CASES)


@pytest.mark.slow
def test_estimates_hold_against_measured_peaks_every_implementation():
    """Every implementation of both ops, forward and training, on calls of 8 MB and more."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from workspace_check import cases
    finally:
        sys.path.remove(str(SCRIPTS))
    big = [c for c in cases() if memory.footprint(*_spec_sig(c), c["impl"]) >= 8 << 20]
    _check(big)


def _spec_sig(case):
    sys.path.insert(0, str(SCRIPTS))
    try:
        from workspace_check import _sig
    finally:
        sys.path.remove(str(SCRIPTS))
    return _sig(case["op"], case["dims"], case["grad"], case.get("layout", {}), case.get("dtype", "float32"))


# ---- what a tuning may time ----------------------------------------------------------------------

def test_every_implementation_declares_its_workspace():
    x, w, b = gl_args(batch=64, n=8, inn=64, out=64)
    sig = _sig(GL, x, w, b)
    assert b is not None  # einsum's bias add writes the sum beside its product
    assert all(GL.registry[n].extra_memory(sig) > 0 for n in ("bmm_weight_left", "einsum", "loop", "masked_dense"))
    # their products are the group-major result itself
    assert GL.registry["bmm"].extra_memory(sig) == GL.registry["grouped_mm"].extra_memory(sig) == 0


def test_masked_dense_is_not_timed_beyond_the_multiple_and_a_setting_raises_it(monkeypatch):
    # batch 1, 64 groups of 64->64: a 64 MiB block-diagonal weight against a 16 KiB result
    args = (torch.randn(1, 64, 64), torch.randn(64, 64, 64), None)
    timer = FakeTimer({"masked_dense": 1e-9})
    with dispatch.use_timer(timer), torch.no_grad():
        d = grouped_ops.prewarm("grouped_linear", *args)
    assert "masked_dense" not in timer.calls and "GROUPED_OPS_TUNE_MEMORY_MULTIPLE" in d.skipped["masked_dense"]
    assert "and over the 16 MiB always allowed" in d.skipped["masked_dense"]  # the floor set the bound here
    assert d.partial == ""  # a rule, not the memory free now: the decision is full
    dispatch.clear_memory()
    store.DiskStore().clear()
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_MULTIPLE", "inf")
    with dispatch.use_timer(timer), torch.no_grad():
        d = grouped_ops.prewarm("grouped_linear", *args)
    assert d.impl == "masked_dense"


def test_small_calls_time_every_candidate():
    """Under the floor (16 MiB) the multiple does not apply: masked_dense wins only at small sizes."""
    timer = FakeTimer({"masked_dense": 1e-9})
    with dispatch.use_timer(timer), torch.no_grad():
        d = grouped_ops.prewarm("grouped_linear", *gl_args(batch=1, n=8, inn=8, out=8))
    assert d.impl == "masked_dense"


def test_when_nothing_fits_the_leanest_runs_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "1")
    monkeypatch.setattr(memory, "_WARNED", set())
    x, w, b = gl_args(batch=64, n=8, inn=64, out=64)
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), torch.no_grad():
        grouped_ops.grouped_linear(x, w, b)
        grouped_ops.grouped_linear(x, w, b)
        d = grouped_ops.lookup("grouped_linear", x, w, b)
    assert d.impl == "bmm"  # writes the group-major result directly: no workspace
    assert d.partial.startswith("out of memory: ") and "bmm" in d.partial
    assert len([r for r in caplog.records if "running the leanest" in r.getMessage()]) == 1


def test_the_nothing_fits_decision_is_stored_so_a_new_process_does_not_tune_again(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "1")
    with torch.no_grad():
        grouped_ops.grouped_linear(*gl_args(batch=64, n=8, inn=64, out=64))
    (entry,) = list(store.DiskStore().entries())
    assert entry["impl"] == "bmm" and entry["partial"].startswith("out of memory")

    # A later process under the same limit uses it without tuning; one with room re-tunes it once.
    from grouped_ops.dispatch import resolve

    tunings = []
    real = harness.measure
    monkeypatch.setattr(harness, "measure", lambda *a, **k: tunings.append(1) or real(*a, **k))
    for budget, expected in (("1", 0), ("1e12", 1), ("1e12", 1)):
        monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", budget)
        dispatch.clear_memory()
        monkeypatch.setattr(resolve, "STARTED", time.time() + 2)  # started after the entry was written
        with dispatch.use_timer(FakeTimer({})), torch.no_grad():
            grouped_ops.grouped_linear(*gl_args(batch=64, n=8, inn=64, out=64))
        assert len(tunings) == expected, budget
    (entry,) = list(store.DiskStore().entries())
    assert entry["tunings"] == 2 and not entry.get("partial")


# ---- out of memory, on every device --------------------------------------------------------------

@pytest.mark.parametrize("error, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (CPU_OOM, True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("can't allocate memory"), False),
])
def test_out_of_memory_is_recognised_on_every_device(error, oom):
    assert harness._is_oom(error) is oom


@pytest.mark.parametrize("grad", [False, True])
def test_a_cpu_allocation_failure_while_tuning_is_never_stored_as_a_full_decision(monkeypatch, grad):
    def failing(*args):
        raise CPU_OOM

    replace_impl(monkeypatch, "grouped_linear", "einsum", failing)
    args = gl_args(grad=grad)
    with dispatch.use_timer(FakeTimer({"einsum": 1e-9})):
        y = grouped_ops.grouped_linear(*args)
        d = grouped_ops.lookup("grouped_linear", *args)
    assert y.shape == (8, 4, 8) and d.impl != "einsum"
    assert d.partial == "out of memory: einsum"
    assert all(e.get("partial") for e in store.DiskStore().entries())  # nothing stored as full


def test_an_oom_in_every_candidate_runs_the_leanest(monkeypatch):
    def failing(*args):
        raise CPU_OOM

    for name in GL.registry:
        replace_impl(monkeypatch, "grouped_linear", name, failing)
    decision, persist = harness.measure(GL, _sig(GL, *gl_args()), settings_mod.settings(), timer=FakeTimer())
    assert decision.source == "default" and not persist and decision.partial.startswith("out of memory: bmm")
    assert decision.impl == memory.leanest(GL, decision.signature, [n for n in GL.registry
                                                                      if GL.registry[n].supports(decision.signature)])


# ---- free memory as the kernel means it ----------------------------------------------------------

def test_available_memory_is_memavailable(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 600 kB\n")
    assert settings_mod.available_memory(tmp_path / "meminfo") == 600 * 1024
    assert settings_mod.available_memory(tmp_path / "missing") > 0  # sysconf's free pages


def test_the_address_space_left_under_rlimit_as(tmp_path, monkeypatch):
    import resource

    (tmp_path / "status").write_text("Name: python\nVmSize:  2048 kB\nVmRSS: 10 kB\n")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (10 << 20, resource.RLIM_INFINITY))
    assert settings_mod.address_space_left(tmp_path / "status") == (10 << 20) - 2048 * 1024
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert settings_mod.address_space_left(tmp_path / "status") is None


def test_free_memory_is_the_tightest_of_available_address_space_and_cgroup(monkeypatch):
    monkeypatch.setattr(settings_mod, "available_memory", lambda: 5000.0)
    monkeypatch.setattr(settings_mod, "address_space_left", lambda: 3000.0)
    monkeypatch.setattr(settings_mod, "cgroup_free", lambda root: None)
    assert settings_mod.free_memory(torch.device("cpu")) == 3000
    monkeypatch.setattr(settings_mod, "cgroup_free", lambda root: 1000.0)
    assert settings_mod.free_memory(torch.device("cpu")) == 1000


# ---- memory in the numbers users read ------------------------------------------------------------

def test_explain_shows_every_candidates_workspace():
    x, w, b = gl_args(batch=64, n=8, inn=64, out=64)
    sig = _sig(GL, x, w, b)
    table = explain_table(GL, sig, None, 1e12)
    for name in ("bmm", "einsum", "loop", "masked_dense"):
        row = next(line for line in table.splitlines() if f" {name} " in line)
        assert "workspace" in row, row


def test_the_tuning_timer_releases_heap_pages_only_where_its_samples_grew_the_free_heap(monkeypatch):
    # Released pages still count as free in mallinfo2: a process that holds more than the floor
    # free before tuning (one that freed a few large tensors) must not release after every sample,
    # or every sample faults its buffers in again (gather_bmm timed 5x slow, grouped_mm picked).
    from grouped_ops.tuning import memory as tuning_memory

    if tuning_memory._malloc_trim() is None or tuning_memory._heap_free() is None:
        pytest.skip("needs glibc's malloc_trim and mallinfo2")
    free = [100 << 20]
    released = []
    monkeypatch.setattr(tuning_memory, "_heap_free", lambda: free[0])
    monkeypatch.setattr(tuning_memory, "release_freed", lambda device: released.append(free[0]))
    timed = tuning_memory.guarded(lambda name, fn, number: 1e-3, torch.device("cpu"))
    for _ in range(5):
        timed("a", None, 1)
    assert released == []  # free as before the tuning: nothing of ours to hand back
    free[0] += tuning_memory.FLOOR_BYTES + 1  # a sample left its buffers free on top
    timed("b", None, 1)
    timed("b", None, 1)
    assert released == [free[0]]  # once: the second sample's free heap is the same
    free[0] += tuning_memory.FLOOR_BYTES + 1
    timed("c", None, 1)
    assert len(released) == 2
