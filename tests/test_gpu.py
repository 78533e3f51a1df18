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
from grouped_ops.tuning.settings import free_memory
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
