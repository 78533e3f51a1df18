"""Every kind of bad input is refused with a GroupedOpsError that names the op and quotes the shapes.

One case per kind of mistake. Each message must start with the op (``grouped_linear: ...``) and
contain the fragments listed, typically the offending shapes as ``name.shape=(...)``. Each bad call
is made twice, after a good warm-up call, so a cached fast path cannot let a bad input through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import grouped_ops
from grouped_ops import GroupedOpsError, grouped_linear, use_impl, weighted_combine

X = torch.randn(2, 3, 4)          # [batch, n=3, in=4]
W = torch.randn(3, 5, 4)          # [n=3, out=5, in=4]
B = torch.randn(3, 5)             # [n, out]
OUTS = [torch.randn(3, 4) for _ in range(2)]  # k=2 branches of [b=3, 4]
WTS = torch.rand(3, 2)            # [b=3, k=2]

GL_SHAPES = "input.shape=(2, 3, 4), weight.shape=(3, 5, 4)"


def _refused(call: Callable[[], Any], op: str, *fragments: str) -> str:
    """``call()`` raises a GroupedOpsError starting with ``op: `` and containing every fragment."""
    grouped_linear(X, W, B)  # warm the caches with a good call
    weighted_combine(OUTS, WTS)
    for _ in range(2):
        with pytest.raises(GroupedOpsError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{op}: "), message
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, ValueError)
    return message


def test_the_error_is_a_value_error():
    assert issubclass(GroupedOpsError, ValueError)


# ---- grouped_linear ------------------------------------------------------------------------------

def test_grouped_linear_input_of_rank_1():
    _refused(lambda: grouped_linear(torch.randn(4), W), "grouped_linear",
             "at least 2 dims", "input.shape=(4,)", "weight.shape=(3, 5, 4)")


def test_grouped_linear_scalar_input():
    _refused(lambda: grouped_linear(torch.tensor(1.0), W), "grouped_linear", "input.shape=()")


def test_grouped_linear_weight_of_rank_2():
    _refused(lambda: grouped_linear(X, torch.randn(5, 4)), "grouped_linear",
             "weight must be 3-D", "weight.shape=(5, 4)")


def test_grouped_linear_weight_of_rank_4():
    _refused(lambda: grouped_linear(X, torch.randn(1, 3, 5, 4)), "grouped_linear",
             "weight must be 3-D", "weight.shape=(1, 3, 5, 4)")


def test_grouped_linear_mismatched_groups():
    msg = _refused(lambda: grouped_linear(torch.randn(2, 5, 6), torch.randn(4, 3, 6)), "grouped_linear")
    # the example message of the issue, verbatim
    assert msg == ("grouped_linear: weight has 4 groups but input has 5 "
                   "(input.shape=(2, 5, 6), weight.shape=(4, 3, 6))")


def test_grouped_linear_mismatched_in_features():
    _refused(lambda: grouped_linear(X, torch.randn(3, 5, 7)), "grouped_linear",
             "7 input features", "but input has 4", "weight.shape=(3, 5, 7)")


def test_grouped_linear_weight_given_as_n_in_out():
    # TabM/rtdl store [n, in, out]; passing it untransposed is a shape error, not a silent answer
    _refused(lambda: grouped_linear(X, torch.randn(3, 4, 5)), "grouped_linear",
             "5 input features", "weight.shape=(3, 4, 5)")


def test_grouped_linear_bias_without_groups():
    _refused(lambda: grouped_linear(X, W, torch.randn(5)), "grouped_linear",
             "bias must have shape (3, 5)", "bias.shape=(5,)", GL_SHAPES)


def test_grouped_linear_bias_of_wrong_size():
    _refused(lambda: grouped_linear(X, W, torch.randn(3, 6)), "grouped_linear",
             "bias must have shape (3, 5)", "bias.shape=(3, 6)")


def test_grouped_linear_bias_with_extra_dim():
    _refused(lambda: grouped_linear(X, W, torch.randn(3, 5, 1)), "grouped_linear", "bias.shape=(3, 5, 1)")


def test_grouped_linear_mixed_dtypes():
    _refused(lambda: grouped_linear(X, W.double(), B), "grouped_linear",
             "one dtype", "weight=float64", "input=float32", GL_SHAPES)


def test_grouped_linear_bias_of_another_dtype():
    _refused(lambda: grouped_linear(X, W, B.to(torch.bfloat16)), "grouped_linear",
             "one dtype", "bias=bfloat16")


def test_grouped_linear_mixed_devices():
    # 'meta' stands in for a second device on a CPU-only machine
    _refused(lambda: grouped_linear(X, W.to("meta"), B), "grouped_linear",
             "one device", "weight=meta", "input=cpu", GL_SHAPES)


def test_grouped_linear_mixed_devices_input_elsewhere():
    # the autocast check looks at the input's device first: it must not trip over 'meta'
    _refused(lambda: grouped_linear(X.to("meta"), W, B), "grouped_linear", "one device", "input=meta")


def test_grouped_linear_integer_dtype():
    _refused(lambda: grouped_linear(X.long(), W.long()), "grouped_linear",
             "int64 is not supported", "floating-point", GL_SHAPES)


def test_grouped_linear_complex_dtype():
    _refused(lambda: grouped_linear(X.to(torch.complex64), W.to(torch.complex64)), "grouped_linear",
             "complex64 is not supported")


@pytest.mark.parametrize("op", ["grouped_linear", "weighted_combine"])
def test_float8_is_refused_with_the_supported_dtypes_not_a_kernel_error(op):
    # a floating-point dtype no implementation computes in: refused up front, also for impl="auto"
    f8 = torch.float8_e4m3fn
    call = ((lambda: grouped_linear(X.to(f8), W.to(f8))) if op == "grouped_linear" else
            (lambda: weighted_combine([t.to(f8) for t in OUTS], WTS.to(f8))))
    _refused(call, op, "float8_e4m3fn is not supported", "float16, bfloat16, float32 or float64")


def test_grouped_linear_input_not_a_tensor():
    _refused(lambda: grouped_linear(X.tolist(), W), "grouped_linear", "input must be a torch.Tensor", "list")


def test_grouped_linear_weight_not_a_tensor():
    _refused(lambda: grouped_linear(X, W.numpy()), "grouped_linear", "weight must be a torch.Tensor", "ndarray")


def test_grouped_linear_bias_not_a_tensor():
    _refused(lambda: grouped_linear(X, W, 0.0), "grouped_linear", "bias must be a torch.Tensor", "float")


def test_grouped_linear_unknown_impl():
    msg = _refused(lambda: grouped_linear(X, W, B, impl="fastest"), "grouped_linear", "unknown impl 'fastest'")
    listed = re.search(r"valid options are \[(.*)\]", msg)
    assert listed is not None
    assert set(re.findall(r"'(\w+)'", listed.group(1))) == {"auto", *grouped_ops.implementations("grouped_linear")}


def test_grouped_linear_forced_impl_without_float64():
    _refused(lambda: grouped_linear(X.double(), W.double(), B.double(), impl="grouped_mm"), "grouped_linear",
             "impl 'grouped_mm' does not support", "dtype float64 not in ['bfloat16', 'float16', 'float32']")


def test_grouped_linear_forced_impl_with_odd_in_features():
    x, w = torch.randn(2, 3, 5), torch.randn(3, 8, 5)
    _refused(lambda: grouped_linear(x, w, impl="grouped_mm"), "grouped_linear",
             "impl 'grouped_mm' does not support", "in=5 is not a multiple of 4")


def test_grouped_linear_forced_impl_on_strided_weight():
    x, w = torch.randn(2, 3, 8), torch.randn(3, 8, 16)[..., ::2]
    _refused(lambda: grouped_linear(x, w, impl="grouped_mm"), "grouped_linear",
             "impl 'grouped_mm' does not support", "weight must be contiguous")


def test_grouped_linear_use_impl_forcing_an_unsupported_impl():
    def call():
        with use_impl(grouped_linear="grouped_mm"):
            grouped_linear(X.double(), W.double())
    _refused(call, "grouped_linear", "impl 'grouped_mm' does not support", "float64")


# ---- weighted_combine ----------------------------------------------------------------------------

WC_LIST = "inputs.shape=[(3, 4), (3, 4)], weights.shape=(3, 2)"


def test_weighted_combine_weights_of_rank_1():
    _refused(lambda: weighted_combine(OUTS, torch.rand(3)), "weighted_combine",
             "weights must be 2-D", "weights.shape=(3,)", "inputs.shape=[(3, 4), (3, 4)]")


def test_weighted_combine_weights_of_rank_3():
    _refused(lambda: weighted_combine(OUTS, torch.rand(3, 2, 1)), "weighted_combine",
             "weights must be 2-D", "weights.shape=(3, 2, 1)")


def test_weighted_combine_stacked_inputs_of_rank_1():
    _refused(lambda: weighted_combine(torch.randn(3), WTS), "weighted_combine",
             "at least 2 dims", "inputs.shape=(3,)")


def test_weighted_combine_stacked_mismatched_batch():
    _refused(lambda: weighted_combine(torch.randn(4, 2, 5), WTS), "weighted_combine",
             "weights has batch 3 but inputs has batch 4", "inputs.shape=(4, 2, 5), weights.shape=(3, 2)")


def test_weighted_combine_stacked_mismatched_k():
    _refused(lambda: weighted_combine(torch.randn(3, 4, 5), WTS), "weighted_combine",
             "k=2", "has 4", "inputs.shape=(3, 4, 5)")


def test_weighted_combine_stacked_given_as_k_b():
    # [k, b, *f] instead of [b, k, *f]
    _refused(lambda: weighted_combine(torch.randn(2, 3, 5), WTS), "weighted_combine",
             "batch", "inputs.shape=(2, 3, 5)")


def test_weighted_combine_list_mismatched_k():
    _refused(lambda: weighted_combine([*OUTS, torch.randn(3, 4)], WTS), "weighted_combine",
             "k=2", "3 inputs", "inputs.shape=[(3, 4), (3, 4), (3, 4)]")


def test_weighted_combine_list_mismatched_batch():
    _refused(lambda: weighted_combine([torch.randn(4, 4)] * 2, WTS), "weighted_combine",
             "weights has batch 3", "batch 4", "inputs.shape=[(4, 4), (4, 4)]")


def test_weighted_combine_ragged_list():
    _refused(lambda: weighted_combine([torch.randn(3, 4), torch.randn(3, 5)], WTS), "weighted_combine",
             "one shape", "inputs[1]", "inputs.shape=[(3, 4), (3, 5)]")


def test_weighted_combine_ragged_list_ranks():
    _refused(lambda: weighted_combine([torch.randn(3, 4), torch.randn(3, 4, 1)], WTS), "weighted_combine",
             "one shape", "inputs.shape=[(3, 4), (3, 4, 1)]")


def test_weighted_combine_ragged_tuple():
    _refused(lambda: weighted_combine((torch.randn(3, 4), torch.randn(3, 2)), WTS), "weighted_combine",
             "one shape", "inputs.shape=[(3, 4), (3, 2)]")


def test_weighted_combine_empty_list():
    _refused(lambda: weighted_combine([], WTS), "weighted_combine", "empty list", "weights.shape=(3, 2)")


def test_weighted_combine_list_of_scalars():
    _refused(lambda: weighted_combine([torch.tensor(1.0)] * 2, WTS), "weighted_combine",
             "at least 1 dim", "inputs.shape=[(), ()]")


def test_weighted_combine_list_item_not_a_tensor():
    _refused(lambda: weighted_combine([OUTS[0], 5], WTS), "weighted_combine",
             "inputs[1] must be a torch.Tensor", "int")


def test_weighted_combine_inputs_not_a_tensor_or_list():
    _refused(lambda: weighted_combine({"a": OUTS[0]}, WTS), "weighted_combine", "inputs must be", "dict")


def test_weighted_combine_weights_not_a_tensor():
    _refused(lambda: weighted_combine(OUTS, WTS.tolist()), "weighted_combine",
             "weights must be a torch.Tensor", "list")


def test_weighted_combine_mixed_dtypes_in_list():
    _refused(lambda: weighted_combine([OUTS[0], OUTS[1].double()], WTS), "weighted_combine",
             "one dtype", "inputs[1]=float64", WC_LIST)


def test_weighted_combine_mixed_dtypes_promote_as_multiply_and_sum_does():
    # routing weights are usually float32 while branch outputs are bfloat16: torch's promotion rules
    for x_dtype, w_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                             (torch.float16, torch.bfloat16), (torch.float64, torch.float32)]:
        x, w = torch.randn(3, 2, 4, dtype=x_dtype), torch.softmax(torch.randn(3, 2), -1).to(w_dtype)
        want = (x * w[..., None]).sum(1)
        for inputs in (x, list(x.unbind(1))):
            for impl in ("auto", *grouped_ops.implementations("weighted_combine")):
                got = weighted_combine(inputs, w, impl=impl)
                assert got.dtype == want.dtype, (x_dtype, w_dtype, impl)
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_weighted_combine_integer_weights_are_refused():
    # the integer argument is named (casting the float inputs to int64 would not help)
    _refused(lambda: weighted_combine(torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.long)),
             "weighted_combine", "int64 is not supported (weights has it)", "floating-point", "inputs.shape=(3, 2, 4)")


def test_weighted_combine_mixed_devices_in_list():
    _refused(lambda: weighted_combine([OUTS[0], OUTS[1].to("meta")], WTS), "weighted_combine",
             "one device", "inputs[1]=meta", WC_LIST)


def test_weighted_combine_mixed_devices_stacked():
    _refused(lambda: weighted_combine(torch.randn(3, 2, 4, device="meta"), WTS), "weighted_combine",
             "one device", "inputs=meta", "weights=cpu")


def test_weighted_combine_mixed_devices_weights_elsewhere():
    # the autocast check looks at the weights' device first: it must not trip over 'meta'
    _refused(lambda: weighted_combine(OUTS, WTS.to("meta")), "weighted_combine", "one device", "weights=meta")


def test_weighted_combine_integer_dtype():
    _refused(lambda: weighted_combine([t.long() for t in OUTS], WTS.long()), "weighted_combine",
             "int64 is not supported", WC_LIST)


def test_weighted_combine_forced_impl_on_an_unsupported_device():
    # every weighted_combine implementation takes every dtype; 'meta' is a device none declares
    inputs, weights = torch.randn(3, 2, 4, device="meta"), torch.rand(3, 2, device="meta")
    _refused(lambda: weighted_combine(inputs, weights, impl="bmm"), "weighted_combine",
             "impl 'bmm' does not support", "device 'meta' not in ['cpu', 'cuda']")


def test_weighted_combine_unknown_impl():
    msg = _refused(lambda: weighted_combine(OUTS, WTS, impl="fused"), "weighted_combine", "unknown impl 'fused'")
    for name in ("auto", *grouped_ops.implementations("weighted_combine")):
        assert repr(name) in msg


# ---- names outside a call ------------------------------------------------------------------------

def test_use_impl_unknown_name():
    expected = r"^use_impl: unknown impl 'fastest'; valid options are \[.*'bmm'"
    with pytest.raises(GroupedOpsError, match=expected), use_impl("fastest"):
        pass


def test_use_impl_with_a_name_only_one_op_has():
    # not an error: weighted_combine has it, grouped_linear does not (a registry bug once made it one)
    with use_impl("broadcast"):
        assert grouped_linear(X, W, B).shape == (2, 3, 5)


def test_use_impl_unknown_name_for_one_op():
    expected = r"^grouped_linear: unknown impl 'fastest'; valid options"
    with pytest.raises(GroupedOpsError, match=expected), use_impl(grouped_linear="fastest"):
        pass


def test_use_impl_unknown_op():
    expected = r"^use_impl: unknown op 'conv'; valid ops are"
    with pytest.raises(GroupedOpsError, match=expected), use_impl(conv="bmm"):
        pass


def test_implementations_of_unknown_op():
    with pytest.raises(GroupedOpsError, match=r"^implementations: unknown op 'conv'; valid ops are"):
        grouped_ops.implementations("conv")


def test_an_untransposed_n_in_out_weight_is_told_to_transpose():
    # the shapes fit a [n, in, out] weight passed as is: the message says what to pass instead
    message = _refused(lambda: grouped_linear(X, torch.randn(3, 4, 5)), "grouped_linear",
                       "5 input features", "W.transpose(1, 2)", "[n, in, out] = [3, 4, 5]")
    assert grouped_linear(X, torch.randn(3, 4, 5).transpose(1, 2)).shape == (2, 3, 5)  # the advice works
    # shapes that do not fit that reading get no such advice
    assert "transpose" not in _refused(lambda: grouped_linear(X, torch.randn(3, 5, 7)), "grouped_linear",
                                       "7 input features")
    assert "but input has 4" in message
