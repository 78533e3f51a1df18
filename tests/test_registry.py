"""The registry: each op's ordered implementations, what each supports, the tolerance table and the
output contract every implementation keeps."""

from __future__ import annotations

import pytest
import torch
from helpers import gl_sig

from grouped_ops import GroupedOpsError
from grouped_ops.ops import SPECS
from grouped_ops.registry import TOLERANCE, Implementation, Registry, fresh_contiguous, tolerance


def _impl(name: str, **kw) -> Implementation:
    return Implementation(name, lambda x: x, **kw)


# ---- lookup and order ---------------------------------------------------------------------------------

def test_an_unknown_name_is_an_error_naming_the_op_and_the_valid_options():
    registry = Registry("my_op", [_impl("fast"), _impl("slow")], version=1)
    with pytest.raises(GroupedOpsError, match=r"my_op: unknown impl 'fats'; valid options are \['auto', 'fast', 'slow'\]"):
        registry["fats"]


def test_membership_of_an_unknown_name_is_false_not_an_error():
    registry = Registry("my_op", [_impl("fast")], version=1)
    assert "fast" in registry and "fats" not in registry and 3 not in registry


def test_order_is_the_order_given_and_is_the_preference_order():
    registry = Registry("my_op", [_impl("b"), _impl("a"), _impl("c")], version=7)
    assert list(registry) == ["b", "a", "c"] and len(registry) == 3 and registry.version == 7
    assert [impl.name for impl in registry.values()] == ["b", "a", "c"]


def test_the_shipped_registries_list_the_plain_batched_matmul_first():
    for op, spec in SPECS.items():
        assert spec.registry.op == op
        # ragged groups (see test_ragged) and the un-permuting combine (a gather first) have no plain
        # batched matmul
        if op not in ("grouped_linear_ragged", "unpermute_combine"):
            assert next(iter(spec.registry)) == "bmm"  # the default when nothing is tuned
        assert all(spec.registry[name].name == name for name in spec.registry)


# ---- what an implementation supports ------------------------------------------------------------------

def test_unsupported_device_dtype_and_check_reasons_are_all_given():
    impl = _impl("cuda_only", devices=frozenset({"cuda"}), dtypes=frozenset({torch.float32}),
                 check=lambda sig: [f"in={sig.dim('in')} is odd"] if sig.dim("in") % 2 else [])
    assert impl.not_supported_reasons(gl_sig(device="cuda:0", dtype=torch.float32)) == []
    assert impl.supports(gl_sig(device="cuda:0", dtype=torch.float32))
    reasons = impl.not_supported_reasons(gl_sig(**{"in": 15}, device="cpu", dtype=torch.bfloat16))
    assert reasons == ["device 'cpu' not in ['cuda']", "dtype bfloat16 not in ['float32']", "in=15 is odd"]
    assert not impl.supports(gl_sig(**{"in": 15}))


# ---- the tolerance table ------------------------------------------------------------------------------

def test_the_tolerance_of_a_listed_dtype_comes_from_the_table_and_others_get_a_loose_default():
    for dtype, tol in TOLERANCE.items():
        assert tolerance(dtype) is tol
    other = tolerance(torch.complex64)
    assert other not in TOLERANCE.values()
    assert other.agree >= tolerance(torch.float32).agree


def test_lower_precision_dtypes_are_allowed_more_error():
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    for field in ("agree", "rtol", "atol"):
        values = [getattr(tolerance(d), field) for d in order]
        assert values == sorted(values), field


# ---- the output contract ------------------------------------------------------------------------------

def test_a_non_contiguous_result_is_copied_to_a_contiguous_one():
    y = torch.randn(4, 6).t()
    out = fresh_contiguous(y)
    assert out.is_contiguous() and torch.equal(out, y) and out.data_ptr() != y.data_ptr()


def test_a_contiguous_view_is_relabelled_without_a_copy():
    base = torch.randn(4, 6)
    y = base.view(2, 12)
    assert y._is_view()
    out = fresh_contiguous(y)
    assert not out._is_view() and out.data_ptr() == base.data_ptr() and torch.equal(out, y)


def test_a_fresh_contiguous_result_is_returned_as_it_is():
    y = torch.randn(4, 6)
    assert fresh_contiguous(y) is y


def test_calling_an_implementation_keeps_the_contract():
    impl = Implementation("transposing", lambda x: x.t())
    out = impl(torch.randn(3, 5))
    assert out.shape == (5, 3) and out.is_contiguous() and not out._is_view()
