"""What only a GPU can show (issue 14); every test here is `gpu`-marked and skipped without CUDA.

The CPU simulations of the same mechanisms are in tests/test_gpu_readiness.py; scripts/gpu_check.py
runs these together with its probes (docs/gpu.md).
"""

from __future__ import annotations

import time

import pytest
import torch

import grouped_ops
from grouped_ops.ops import SPECS
from grouped_ops.ops import grouped_linear as gl
from grouped_ops.signature import numerics
from grouped_ops.tuning import harness, timer
from grouped_ops.tuning.settings import free_memory, settings
from grouped_ops.tuning.timer import timer_for

pytestmark = pytest.mark.gpu
GL = SPECS["grouped_linear"]


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _sleep_work(ms: float):
    cycles = int(ms * 2e6)  # ~ms at ~2 GHz; only the ratio of two timings of it matters
    return lambda: torch.cuda._sleep(cycles)


def _wall(fn, number: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / number


@pytest.mark.parametrize("side", [False, True], ids=["default-stream", "side-stream"])
def test_the_timer_times_kernels_not_launches(side):
    work = _sleep_work(2.0)
    stream = torch.cuda.Stream() if side else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        work()
        measured = timer_for(torch.device("cuda"))("sleep", work, 5)
        wall = _wall(work, 5)
    assert 0.8 < measured / wall < 1.25, (measured, wall)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_timer_follows_the_tensors_device_not_the_current_one():
    with torch.cuda.device(0):
        work = _sleep_work(2.0)
        with torch.cuda.device(1):
            wall = _wall(work, 5)
        measured = timer_for(torch.device("cuda:1"))("sleep", lambda: work(), 5)
    assert measured > 0.5 * wall


def test_free_memory_counts_the_allocators_cache():
    t = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del t  # freed to torch's cache, not to the driver
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    assert cached >= 256 << 20
    assert free_memory(torch.device("cuda")) >= torch.cuda.mem_get_info()[0] + cached - (1 << 20)


def test_cuda_keys_name_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        off = dict(numerics("cuda"))
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dict(numerics("cuda"))["tf32"] != off["tf32"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _gl(n: int, batch: int = 64, d: int = 64, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, n, d, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, d, d, device="cuda", dtype=dtype, generator=g) / d**0.5
    return x, w, torch.randn(n, d, device="cuda", dtype=dtype, generator=g)


@pytest.mark.skipif(_capability()[0] not in (9, 10), reason="torch's grouped_mm fast path is sm90/sm100 only")
def test_grouped_mm_group_limit_is_torchs():
    ok = gl.grouped_mm(*_gl(1023))
    torch.cuda.synchronize()
    assert ok.shape == (64, 1023, 64)
    assert gl._grouped_mm_reasons(GL.signature(GL.meta(*_gl(1024))))  # declared unsupported ...
    with pytest.raises(RuntimeError, match="1024 groups"):  # ... because torch refuses it
        gl.grouped_mm(*_gl(1024))
        torch.cuda.synchronize()


@pytest.mark.skipif(_capability()[0] not in (9, 10), reason="torch's grouped_mm fast path is sm90/sm100 only")
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "shared", "chunked"])
def test_grouped_mm_fast_path_matches_bmm_on_every_weight_layout(layout):
    x, w, b = _gl(32)
    w = {"contiguous": w, "transposed": w.transpose(1, 2).contiguous().transpose(1, 2),
         "shared": w[:1].expand_as(w), "chunked": torch.cat([w, w], 1)[:, :64]}[layout]
    x.requires_grad_(True)
    y = gl.grouped_mm(x, w, b)  # the input goes in as a view: groups `in` apart (TMA offsets)
    ref = gl.bmm(x.detach().float(), w.float(), b.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all()


def test_cached_calls_do_not_synchronise():
    x, w, b = _gl(8, dtype=torch.float32)
    grouped_ops.prewarm("grouped_linear", x, w, b)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for impl in ("auto", "bmm", "einsum", "loop"):
            grouped_ops.grouped_linear(x, w, b, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_a_prewarmed_call_captures_in_a_cuda_graph():
    x, w, b = _gl(8, dtype=torch.float32)
    grouped_ops.prewarm("grouped_linear", x, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grouped_ops.grouped_linear(x, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_ops.grouped_linear(x, w, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, gl.bmm(x, w, b))


# ---- issue 14, review items 5, 7, 8 (their CPU simulations: tests/test_gpu_readiness.py, test_harness.py)

def test_a_tuning_leaves_no_workspace_reserved():
    # masked_dense's block-diagonal weight here is 32*32*256*256*4 B = 256 MiB, a one-off of the tuning
    x = torch.randn(64, 32, 256, device="cuda")
    w, b = torch.randn(32, 256, 256, device="cuda") / 16, torch.randn(32, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    d, _ = harness.measure(GL, GL.signature(GL.meta(x, w, b)), settings(), only={"bmm", "masked_dense"})
    assert "masked_dense" in d.timings, d
    assert torch.cuda.max_memory_reserved() - before >= 200 << 20  # the workspace really was made ...
    assert torch.cuda.memory_reserved() - before < 64 << 20  # ... and handed back


def test_the_l2_flush_is_not_timed():
    work = _sleep_work(1.0)
    work()
    flushed = timer.CudaTimer(torch.device("cuda"), flush_l2=True)("sleep", work, 5)
    plain = timer.CudaTimer(torch.device("cuda"))("sleep", work, 5)
    assert 0.8 < flushed / plain < 1.25, (flushed, plain)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert timer.l2_buffer(torch.cuda.current_device()).numel() >= props.L2_cache_size > 0


def test_a_misaligned_weight_runs_bmm_without_a_copy(monkeypatch):
    x, w, b = _gl(8)
    flat = torch.empty(w.numel() + 1, device="cuda", dtype=w.dtype)
    w2 = flat[1:].view_as(w).copy_(w)  # 2 bytes past a 16-byte boundary: a view into a flat buffer
    assert not gl._offset_ok(w2) and gl._offset_ok(w)
    called = []
    real = gl._grouped_mm_op()
    monkeypatch.setattr(gl, "_grouped_mm_op", lambda: lambda *a: called.append(1) or real(*a))
    torch.testing.assert_close(gl.grouped_mm(x, w2, b), gl.bmm(x, w2, b))
    assert called == []


def test_a_reduce_overhead_warmup_is_recognised():
    seen = []

    @torch.library.custom_op("grouped_ops_test::probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(harness.cudagraph_warmup(x.device))
        return x.clone()

    probe.register_fake(lambda x: torch.empty_like(x))
    f = torch.compile(lambda x: probe(x) * 2, mode="reduce-overhead")
    x = torch.randn(64, device="cuda")
    for _ in range(3):
        f(x)
    torch.cuda.synchronize()
    assert seen and seen[0] and not any(seen[1:]), seen  # warm-up, then recording (capture), then replays
    assert not harness.cudagraph_warmup(x.device)  # eager, after it
