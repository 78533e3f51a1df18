"""What of the CUDA paths a CPU can show (issue 14): each by simulation, with no GPU.

The timer's device context with a fake device index; the memory guard's CUDA arithmetic and cgroup
limits; the cache format change; grouped_mm's supported set against torch's own checks (which run on
CPU too), on torch without ``F.grouped_mm``, and under torch.func. What a decision's key holds is in
tests/test_signature.py; what needs a real GPU is in tests/test_gpu.py and scripts/gpu_check.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import gl_sig, group_major

import grouped_ops
from grouped_ops.ops import SPECS
from grouped_ops.ops import grouped_linear as gl
from grouped_ops.tuning import settings as settings_mod
from grouped_ops.tuning import store, timer

REPO = Path(__file__).resolve().parents[1]
GL = SPECS["grouped_linear"]


# ---- the timer's device ---------------------------------------------------------------------------

class _FakeCuda:
    """Records which device is current and which stream each event records on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, current: int = 0) -> None:
        self.current, self.log = current, []
        fake = self

        class Event:
            def __init__(self, enable_timing: bool = False) -> None:
                self.at = None

            def record(self, stream: Any = None) -> None:
                fake.log.append(("record", stream, fake.current))
                self.at = len(fake.log)

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, other: Any) -> float:
                return 2.0  # ms

        @contextlib.contextmanager
        def device(index: int):
            before, fake.current = fake.current, index
            try:
                yield
            finally:
                fake.current = before

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: f"stream-of-{index}")


def test_the_cuda_timer_records_on_the_tensors_device_stream(monkeypatch):
    fake = _FakeCuda(monkeypatch, current=0)
    t = timer.timer_for(torch.device("cuda:1"))
    launches = []
    seconds = t("bmm", lambda: launches.append(fake.current), 4)
    assert launches == [1, 1, 1, 1]  # the launches run with cuda:1 current
    assert fake.log == [("record", "stream-of-1", 1)] * 2  # both events on cuda:1's current stream
    assert fake.current == 0  # and the caller's current device is restored
    assert seconds == pytest.approx(2e-3 / 4)


def test_a_plain_cuda_device_binds_the_current_one_and_cpu_keeps_the_wall_clock(monkeypatch):
    _FakeCuda(monkeypatch, current=3)
    assert timer.timer_for(torch.device("cuda")).device == 3
    assert timer.timer_for(torch.device("cpu")) is timer.cpu_timer


# ---- the memory guard -----------------------------------------------------------------------------

def test_cuda_free_memory_counts_what_the_caching_allocator_holds_unused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 5000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 3000)
    assert settings_mod.free_memory(torch.device("cuda:0")) == 3000
    s = settings_mod.settings()
    assert settings_mod.memory_budget(torch.device("cuda:0"), s) == 3000 * s.memory_fraction


@pytest.mark.parametrize("files, expected", [
    ({"memory.max": "1000000", "memory.current": "400000"}, 600000),  # cgroup v2
    ({"memory.max": "max", "memory.current": "400000"}, None),
    ({"memory/memory.limit_in_bytes": "5000", "memory/memory.usage_in_bytes": "1000"}, 4000),  # v1
    ({"memory/memory.limit_in_bytes": str(1 << 62), "memory/memory.usage_in_bytes": "1"}, None),
    ({"memory.max": "1000", "memory.current": "5000"}, 0),  # over the limit already
    ({}, None),
])
def test_cgroup_limits(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert settings_mod.cgroup_free(tmp_path, tmp_path / "no-such-file") == expected


def test_the_processs_own_cgroup_counts_and_the_tightest_limit_wins(tmp_path):
    own = tmp_path / "slurm" / "job_7"
    own.mkdir(parents=True)
    (own / "memory.max").write_text("5000\n")
    (own / "memory.current").write_text("1000\n")
    (tmp_path / "memory.max").write_text("9000\n")
    (tmp_path / "memory.current").write_text("2000\n")
    (tmp_path / "self").write_text("0::/slurm/job_7\n")
    assert settings_mod.cgroup_free(tmp_path, tmp_path / "self") == 4000
    (own / "memory.max").write_text("max\n")
    assert settings_mod.cgroup_free(tmp_path, tmp_path / "self") == 7000


def test_the_cpu_budget_honours_a_cgroup_limit(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("3000\n")
    (tmp_path / "memory.current").write_text("1000\n")
    monkeypatch.setenv("GROUPED_OPS_CGROUP_ROOT", str(tmp_path))
    assert settings_mod.free_memory(torch.device("cpu")) == 2000
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_FRACTION", "0.5")
    assert settings_mod.memory_budget(torch.device("cpu"), settings_mod.settings()) == 1000


# ---- keys of the cache format ---------------------------------------------------------------------

def _key(*args: Any) -> str:
    return GL.signature(GL.meta(*args)).key()


def _args(w: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    return (torch.randn(8, 4, 16), torch.randn(4, 16, 16) if w is None else w)


# ---- the cache format -----------------------------------------------------------------------------

def _migration():
    spec = importlib.util.spec_from_file_location("migrate_cache_keys", REPO / "scripts" / "migrate_cache_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_tables_load_in_the_new_format():
    for path in sorted((REPO / "tuning_cache").glob("*.json")):
        assert json.loads(path.read_text())["format"] == store.FORMAT
        entries = store.read_table(path)
        assert entries and all(" math[" in e["key"] for e in entries)


def test_a_format_1_key_migrates_to_what_this_version_looks_up():
    new = _key(*_args())  # at torch's defaults, as format-1 entries were measured
    old = new.replace(" math[fp32=highest,det=0]", "")
    assert old != new
    migrated = _migration().migrate_entry({"key": old, "impl": "bmm", "signature": {"op": "grouped_linear"}})
    assert migrated["key"] == new and migrated["signature"]["numerics"] == {"fp32": "highest", "det": "0"}
    assert _migration().migrate_entry(migrated) == migrated


def test_old_user_cache_files_are_ignored_not_fatal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path))
    old = tmp_path / "v1"
    old.mkdir()
    key = _key(*_args()).replace(" math[fp32=highest,det=0]", "")
    (old / "0123.json").write_text(json.dumps({"key": key, "impl": "loop"}))
    table = tmp_path / "old-table.json"
    table.write_text(json.dumps({"format": 1, "entries": [{"key": key, "impl": "loop"}]}))
    with caplog.at_level(logging.WARNING, logger="grouped_ops"):
        assert store.read_table(table) == []
    assert "migrate_cache_keys.py" in caplog.text
    assert store.DiskStore().root == tmp_path / f"v{store.FORMAT}"
    assert list(store.DiskStore().entries()) == []
    y = grouped_ops.grouped_linear(*_args())  # decides afresh; the old file is left alone
    assert y.shape == (8, 4, 16) and (old / "0123.json").exists()


def test_the_cache_folder_needs_no_platformdirs(monkeypatch, tmp_path):
    monkeypatch.delenv("GROUPED_OPS_CACHE_DIR")
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import raises ImportError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert store.cache_dir() == tmp_path / "grouped_ops"


# ---- grouped_mm: torch's own checks, old torch, torch.func ----------------------------------------

def _runs_in_torch(layout: str, inn: int, out: int, dtype: torch.dtype, grad: bool) -> bool:
    x = torch.randn(3, 4, inn, dtype=dtype, requires_grad=grad)
    w = {"contiguous": lambda: torch.randn(4, out, inn),
         "transposed": lambda: torch.randn(4, inn, out).transpose(1, 2),
         "shared": lambda: torch.randn(out, inn).expand(4, out, inn),
         "chunked": lambda: torch.randn(4, 2 * out, inn)[:, :out]}[layout]().to(dtype)
    w.requires_grad_(grad)
    try:
        y = gl.grouped_mm(x, w, None)
        if grad:
            y.backward(torch.randn(3, 4, out, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "shared", "chunked"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_grouped_mm_reasons_match_what_torch_accepts(layout, grad):
    # torch's operand checks (GroupedMMUtils.h) run on every device, so the CPU shows them
    for inn, out, dtype in [(16, 16, torch.float32), (12, 16, torch.float32), (16, 12, torch.float32),
                            (8, 12, torch.bfloat16), (12, 8, torch.bfloat16), (24, 8, torch.float16)]:
        sig = gl_sig(**{"in": inn, "out": out}, dtype=dtype, weight=layout, grad=("weight",) if grad else ())
        reasons = gl._grouped_mm_reasons(sig)
        assert (not reasons) == _runs_in_torch(layout, inn, out, dtype, grad), (inn, out, dtype, reasons)


def _fake_cuda_capability(monkeypatch, cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("cap, dtype, n, expect", [
    ((9, 0), torch.bfloat16, 32, None),
    ((10, 0), torch.bfloat16, 1023, None),
    ((9, 0), torch.bfloat16, 1024, "refuses 1024 or more groups"),
    ((8, 0), torch.bfloat16, 32, "sm90/sm100 only"),
    ((12, 0), torch.bfloat16, 32, "sm90/sm100 only"),
    ((9, 0), torch.float16, 32, "bmm fallback"),
    ((9, 0), torch.float32, 32, "bmm fallback"),
])
def test_grouped_mm_on_cuda_follows_torchs_fast_path(monkeypatch, cap, dtype, n, expect):
    _fake_cuda_capability(monkeypatch, cap)
    reasons = gl._grouped_mm_reasons(gl_sig(n=n, dtype=dtype, device="cuda:0"))
    assert (reasons == []) if expect is None else any(expect in r for r in reasons), reasons


def test_grouped_mm_runs_through_torch_private_op_where_the_public_one_is_missing(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)  # torch 2.8 / 2.9
    x, w, b = torch.randn(5, 4, 16), torch.randn(4, 8, 16), torch.randn(4, 8)
    assert gl._grouped_mm_reasons(gl_sig()) == []
    torch.testing.assert_close(gl.grouped_mm(x, w, b), gl.bmm(x, w, b))
    monkeypatch.delattr(torch, "_grouped_mm")  # torch 2.7 and older
    assert "has neither" in gl._grouped_mm_reasons(gl_sig())[0]


def test_grouped_mm_without_a_cpu_kernel_says_so(monkeypatch):
    monkeypatch.setattr(gl, "_has_kernel", lambda key: False)  # torch 2.8: CUDA only
    assert any("no CPU kernel" in r for r in gl._grouped_mm_reasons(gl_sig()))


def test_grouped_mm_does_not_copy_a_contiguous_input(monkeypatch):
    seen = []
    real = gl._grouped_mm_op()
    monkeypatch.setattr(gl, "_grouped_mm_op", lambda: lambda a, b: seen.append(a) or real(a, b))
    x = torch.randn(5, 4, 16)
    gl.grouped_mm(x, torch.randn(4, 8, 16), None)
    assert seen[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "shared", "chunked"])
def test_grouped_mm_matches_bmm_forward_and_backward(layout):
    make = {"contiguous": lambda: torch.randn(4, 8, 16), "transposed": lambda: torch.randn(4, 16, 8).transpose(1, 2),
            "shared": lambda: torch.randn(8, 16).expand(4, 8, 16), "chunked": lambda: torch.randn(4, 16, 16)[:, 8:]}
    base = make[layout]()
    results = []
    for impl in (gl.bmm, gl.grouped_mm):
        x = torch.randn(2, 5, 4, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        w = base.detach().clone(memory_format=torch.preserve_format).requires_grad_() if layout != "shared" \
            else base.detach()[:1].clone().requires_grad_()
        weight = w.expand(4, 8, 16) if layout == "shared" else w
        y = impl(x, weight, None)
        y.sum().backward()  # a stride-0 gradient, as .sum() gives
        results.append((y, x.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_mm_under_torch_func():
    x, w = torch.randn(5, 4, 16), torch.randn(4, 8, 16)
    gx, gw = torch.func.grad(lambda x, w: gl.grouped_mm(x, w, None).square().sum(), argnums=(0, 1))(x, w)
    rx, rw = torch.func.grad(lambda x, w: gl.bmm(x, w, None).square().sum(), argnums=(0, 1))(x, w)
    torch.testing.assert_close((gx, gw), (rx, rw))
    wt = torch.randn(4, 6, 8).transpose(1, 2)  # [n, in, out]
    ys = torch.func.vmap(lambda xt: gl._GroupedLinearMM.apply(xt, wt, None, (5, 4, 6)))(torch.randn(3, 4, 5, 8))
    assert ys.shape == (3, 5, 4, 6)  # its own vmap rule


# ---- issue 14, review items 5, 7, 8: what the tuner times is what runs, and what it leaves --------

@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("grad_kind", ["dense", "sum"])
def test_grouped_mm_training_path_matches_a_float64_reference(bias, lead, grad_kind):
    # the bias add writes the final [..., n, out] layout in one pass (_GroupedLinearMM): forward and every
    # gradient against the nn.Linear loop in float64
    g = torch.Generator().manual_seed(0)
    n, inn, out = 4, 16, 8
    x0, w0 = torch.randn(*lead, n, inn, generator=g), torch.randn(n, out, inn, generator=g)
    b0 = torch.randn(n, out, generator=g) if bias else None
    upstream = torch.randn(*lead, n, out, generator=g)
    results = []
    for impl, dtype in ((gl.grouped_mm, torch.float32), (gl.loop, torch.float64)):
        x, w = x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
        b = None if b0 is None else b0.to(dtype, copy=True).requires_grad_()
        y = gl.REGISTRY[impl.__name__](x, w, b)
        assert group_major(y) and y.shape == (*lead, n, out)
        (y.sum() if grad_kind == "sum" else (y * upstream.to(dtype)).sum()).backward()
        results.append([t.double() for t in (y, x.grad, w.grad, *(() if b is None else (b.grad,)))])
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_grouped_mm_second_derivatives_match_a_float64_reference(bias, wrt):
    # a gradient penalty's shape: a first gradient with create_graph, then .sum() of it, whose
    # stride-0 gradient torch's grouped_mm backward formula rejects unless it is made to fit
    g = torch.Generator().manual_seed(0)
    x0, w0, b0 = torch.randn(6, 4, 16, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 8, generator=g)
    results = []
    for impl, dtype in ((gl.grouped_mm, torch.float32), (gl.loop, torch.float64)):
        x, w = x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
        b = b0.to(dtype, copy=True).requires_grad_() if bias else None
        first, = torch.autograd.grad(gl.REGISTRY[impl.__name__](x, w, b).pow(2).sum(), x if wrt == "input" else w,
                                     create_graph=True)
        results.append([t.double() for t in torch.autograd.grad(first.sum(), (x, w))])
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    hessian_vector = torch.func.grad(lambda x: torch.func.grad(
        lambda z: gl.grouped_mm(z, w0, b0).pow(3).sum())(x).sum())(x0)
    reference = torch.func.grad(lambda x: torch.func.grad(
        lambda z: gl.bmm(z, w0, b0).pow(3).sum())(x).sum())(x0)
    torch.testing.assert_close(hessian_vector, reference)


class _CudaLike:
    """Stands in for a CUDA tensor where only its address is read (``_offset_ok``)."""

    def __init__(self, offset: int, itemsize: int = 2) -> None:
        self.is_cuda, self.offset, self.itemsize = True, offset, itemsize

    def storage_offset(self) -> int:
        return self.offset

    def element_size(self) -> int:
        return self.itemsize


def test_a_misaligned_cuda_operand_runs_bmm_not_a_copy_per_call(monkeypatch):
    assert gl._offset_ok(torch.randn(9)[1:])  # CPU: no TMA, no alignment needed
    assert gl._offset_ok(_CudaLike(8)) and not gl._offset_ok(_CudaLike(1))  # bf16: 8 elements = 16 bytes
    # Simulated: the weight sits at a misaligned CUDA address (a view into a flat buffer). The tuner
    # timed grouped_mm on aligned private operands, so the call must not add a copy it never timed.
    x, w, b = torch.randn(5, 4, 16), torch.randn(4, 8, 16), torch.randn(4, 8)
    monkeypatch.setattr(gl, "_offset_ok", lambda t: t.data_ptr() != w.data_ptr())
    called = []
    monkeypatch.setattr(gl, "_grouped_mm_op", lambda: lambda *a: called.append(a))
    torch.testing.assert_close(gl.grouped_mm(x, w, b), gl.bmm(x, w, b))
    assert called == []  # no grouped_mm, and no clone of the weight either


class _FlushingCuda(_FakeCuda):
    """A fake clock on top of _FakeCuda: each candidate call takes 1 ms, the L2 flush 5 ms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch)
        fake, self.clock = self, 0.0
        base = torch.cuda.Event

        class Event(base):
            def record(self, stream: Any = None) -> None:
                super().record(stream)
                self.t = fake.clock

            def elapsed_time(self, other: Any) -> float:
                return other.t - self.t

        class Buffer:
            def zero_(self) -> None:
                fake.log.append("flush")
                fake.clock += 5.0

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(timer, "l2_buffer", lambda index: fake.log.append(("buffer", index)) or Buffer())

    def work(self) -> None:
        self.log.append("call")
        self.clock += 1.0


def test_the_l2_flush_runs_before_every_call_and_is_not_timed(monkeypatch):
    fake = _FlushingCuda(monkeypatch)
    t = timer.CudaTimer(torch.device("cuda:1"), flush_l2=True)
    assert t("bmm", fake.work, 3) == pytest.approx(1e-3)  # 1 ms a call: the 5 ms flushes not counted
    one = ["flush", ("record", "stream-of-1", 1), "call", ("record", "stream-of-1", 1)]
    assert fake.log == [("buffer", 1)] + one * 3
    fake.log.clear()  # the default: back to back, no flush (docs/gpu.md says why)
    assert timer.CudaTimer(torch.device("cuda:1"))("bmm", fake.work, 3) == pytest.approx(1e-3)
    assert "flush" not in fake.log and fake.log.count("call") == 3
    monkeypatch.setenv("GROUPED_OPS_TIMER_FLUSH_L2", "1")
    assert timer.timer_for(torch.device("cuda:1")).flush_l2
    monkeypatch.setenv("GROUPED_OPS_TIMER_FLUSH_L2", "0")
    assert not timer.timer_for(torch.device("cuda:1")).flush_l2


def test_the_l2_buffer_is_twice_the_devices_l2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"L2_cache_size": 1 << 20}))
    made = []
    monkeypatch.setattr(torch, "empty", lambda size, dtype, device: made.append((size, dtype, device)))
    timer.l2_buffer(2)
    assert made == [(2 << 20, torch.uint8, torch.device("cuda", 2))]
