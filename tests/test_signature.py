"""Signatures: what a decision's key holds (grad mode, weight layout, the batch bucket, the math
settings) and how a batch size folds into a bucket."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from helpers import FakeTimer, disk_entries, gl_args, gl_sig

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch
from grouped_ops.ops import SPECS
from grouped_ops.signature import (
    Signature,
    applied_numerics,
    bucket,
    bucketing_mode,
    device_name,
    numerics,
)

GL = SPECS["grouped_linear"]


# ---- the key -----------------------------------------------------------------------------------------

def test_grad_mode_is_part_of_the_key_and_training_is_timed_forward_and_backward():
    # The fake timer runs each candidate: a training run returns (output, *gradients).
    def timer(name, fn, number):
        result = fn()
        training = len(result) > 1
        seen.append((name, training, [tuple(t.shape) for t in result]))
        # in inference loop is fastest, in training einsum
        return {"loop": 1e-6 if not training else 1e-3, "einsum": 1e-6 if training else 1e-3}.get(name, 1e-4)

    seen: list[Any] = []
    x, w, b = gl_args(grad=True)
    with dispatch.use_timer(timer):
        with torch.no_grad():
            grouped_ops.grouped_linear(x, w, b)
        y = grouped_ops.grouped_linear(x, w, b)
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    with torch.no_grad():
        inference = grouped_ops.lookup("grouped_linear", x, w, b)
    training = grouped_ops.lookup("grouped_linear", x, w, b)
    assert inference.impl == "loop" and training.impl == "einsum"
    assert inference.signature.grad == () and training.signature.grad == ("weight", "bias")
    assert inference.signature.key() != training.signature.key()
    # the training decision timed forward + backward: output plus gradients of weight and bias
    assert any(t and shapes == [(8, 4, 8), (4, 8, 8), (4, 8)] for _, t, shapes in seen)
    assert {e["key"].rsplit(" grad=", 1)[1] for e in disk_entries()} == {"- batch=8", "weight,bias batch=8"}


def test_requires_grad_under_no_grad_is_inference():
    with dispatch.use_timer(FakeTimer()), torch.no_grad():
        d = grouped_ops.prewarm("grouped_linear", *gl_args(grad=True))
    assert d.signature.grad == ()


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_batch_sizes_1_to_512_tune_about_ten_times(op, count_tunings):
    with dispatch.use_timer(FakeTimer()):
        for batch in range(1, 513):
            if op == "grouped_linear":
                x = torch.randn(batch, 2, 4)
                grouped_ops.grouped_linear(x, torch.randn(2, 4, 4))
            else:
                grouped_ops.weighted_combine(torch.randn(batch, 2, 4), torch.randn(batch, 2))
    assert sum(count_tunings.values()) == 10  # 1, 2, 4, ..., 512
    assert len(disk_entries()) == 10


def test_exact_bucketing_mode(monkeypatch, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_BUCKETS", "exact")
    w = torch.randn(2, 4, 4)
    with dispatch.use_timer(FakeTimer()):
        for batch in range(1, 41):
            grouped_ops.grouped_linear(torch.randn(batch, 2, 4), w)
    assert sum(count_tunings.values()) == 40
    assert sorted(e["signature"]["dims"]["batch"] for e in disk_entries()) == list(range(1, 41))


def test_leading_dims_fold_into_one_batch(count_tunings):
    w = torch.randn(2, 4, 4)
    with dispatch.use_timer(FakeTimer()):
        grouped_ops.grouped_linear(torch.randn(4, 8, 2, 4), w)  # 32 rows
        grouped_ops.grouped_linear(torch.randn(32, 2, 4), w)
        grouped_ops.grouped_linear(torch.randn(2, 4), w)  # unbatched: 1 row
    assert sorted(e["signature"]["dims"]["batch"] for e in disk_entries()) == [1, 32]
    assert sum(count_tunings.values()) == 2


def test_weight_layout_is_part_of_the_key():
    x, w, b = gl_args()
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # the same values stored [n, in, out]
    with dispatch.use_timer(FakeTimer()):
        a = grouped_ops.prewarm("grouped_linear", x, w, b)
        t = grouped_ops.prewarm("grouped_linear", x, w_t, b)
    assert a.signature.layout_of("weight") == "contiguous"
    assert t.signature.layout_of("weight") == "transposed"
    assert a.signature.key() != t.signature.key()


# ---- the math settings, threads and weight layout in the key ---------------------------------------

def _key(*args: Any) -> str:
    return GL.signature(GL.meta(*args)).key()


def _args(w: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    return (torch.randn(8, 4, 16), torch.randn(4, 16, 16) if w is None else w)



@pytest.fixture
def restore_math():
    precision, det = torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    torch.use_deterministic_algorithms(det)
    torch.backends.cuda.matmul.allow_tf32 = tf32


def test_float32_matmul_precision_is_in_the_key(restore_math):
    before = _key(*_args())
    torch.set_float32_matmul_precision("high")
    assert _key(*_args()) != before and "math[fp32=high," in _key(*_args())


def test_deterministic_algorithms_are_in_the_key(restore_math):
    before = _key(*_args())
    torch.use_deterministic_algorithms(True)
    assert _key(*_args()) != before and "det=1]" in _key(*_args())


def test_cuda_keys_name_tf32_and_reduced_precision_reductions(restore_math):
    names = dict(numerics("cuda"))
    assert set(names) == {"fp32", "tf32", "bf16red", "fp16red", "det"}
    torch.backends.cuda.matmul.allow_tf32 = not torch.backends.cuda.matmul.allow_tf32
    assert dict(numerics("cuda"))["tf32"] != names["tf32"]
    assert set(dict(numerics("cpu"))) == {"fp32", "det"}  # cuBLAS switches do not touch CPU kernels


def test_the_cpu_thread_count_is_read_live():
    threads = torch.get_num_threads()
    try:
        before = _key(*_args())
        torch.set_num_threads(threads + 1)
        assert f" x{threads + 1}]" in _key(*_args()) and _key(*_args()) != before
        assert device_name(torch.device("cpu")).endswith(f"x{threads + 1}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout, make", [
    ("contiguous", lambda: torch.randn(4, 16, 16)),
    ("transposed", lambda: torch.randn(4, 16, 16).transpose(1, 2)),
    ("shared", lambda: torch.randn(16, 16).expand(4, 16, 16)),
    ("chunked", lambda: torch.randn(4, 48, 16).chunk(3, dim=1)[1]),
    ("strided", lambda: torch.randn(4, 16, 32)[..., ::2]),
])
def test_the_weights_group_stride_is_in_the_key_and_timed_as_such(layout, make):
    w = make()
    sig = GL.signature(GL.meta(torch.randn(8, 4, 16), w))
    assert sig.layout_of("weight") == layout
    x2, w2, _ = GL.make_inputs(sig, torch.Generator().manual_seed(0))  # the tuner's private inputs
    assert GL.signature(GL.meta(x2, w2)) == sig


def test_math_settings_round_trip_through_a_spec_and_can_be_applied(restore_math):
    sig = Signature.from_spec({**gl_sig().to_spec(), "numerics": {"fp32": "medium", "det": "0"}})
    assert dict(sig.numerics)["fp32"] == "medium" and Signature.from_spec(sig.to_spec()) == sig
    with applied_numerics(sig):
        assert torch.get_float32_matmul_precision() == "medium"
    assert torch.get_float32_matmul_precision() == "highest"


# ---- buckets and the spec round trip ------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [(0, 0), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (300, 512),
                                            (511, 512), (512, 512), (513, 1024)])
def test_bucket_is_the_power_of_two_at_or_above(size, expected):
    assert bucket(size) == expected


@pytest.mark.parametrize("value, mode", [("", "pow2"), ("pow2", "pow2"), (" EXACT ", "exact")])
def test_bucketing_mode_reads_the_environment(monkeypatch, value, mode):
    monkeypatch.setenv("GROUPED_OPS_BUCKETS", value)
    assert bucketing_mode() == mode


def test_an_unknown_bucketing_mode_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_BUCKETS", "log2")
    with pytest.raises(GroupedOpsError, match="GROUPED_OPS_BUCKETS must be 'pow2' or 'exact', got 'log2'"):
        bucketing_mode()


@pytest.mark.parametrize("kw", [{}, {"grad": ("weight",)}, {"weight": "transposed", "dtype": torch.float64},
                                {"batch": 512, "grad": ("weight", "bias")}])
def test_a_signature_round_trips_through_its_spec_and_json_with_the_same_key(kw):
    sig = gl_sig(**kw)
    again = Signature.from_spec(json.loads(json.dumps(sig.to_spec())))
    assert again == sig and hash(again) == hash(sig)
    assert again.key() == sig.key() and again.family_key() == sig.family_key()


def test_the_key_differs_by_batch_and_the_family_key_does_not():
    sig = gl_sig(batch=8)
    other = sig.with_dim("batch", 16)
    assert (other.dim("batch"), other.dim("n")) == (16, 4)
    assert other.key() != sig.key() and other.family_key() == sig.family_key()
    assert sig.key() == f"{sig.family_key()} batch=8"


@pytest.mark.parametrize("spec", [{}, {"op": "grouped_linear"}, {"op": "grouped_linear", "dims": {"batch": "x"}},
                                  {"op": "grouped_linear", "dims": [8]}])
def test_a_bad_spec_is_a_grouped_ops_error(spec):
    with pytest.raises(GroupedOpsError, match="not a signature spec"):
        Signature.from_spec(spec)


def test_a_spec_with_an_unknown_dtype_names_it():
    with pytest.raises(GroupedOpsError, match="unknown dtype 'float13'"):
        Signature.from_spec({"op": "grouped_linear", "dims": {"batch": 8}, "dtype": "float13"})
