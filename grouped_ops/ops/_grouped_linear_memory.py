"""grouped_linear's memory, by arithmetic on the signature: what a call holds (operands, result,
gradients: :func:`call_bytes`) and each implementation's workspace beyond that (``Implementation
.extra_memory``), forward and, when the signature needs gradients, backward.

A module of its own only to keep :mod:`grouped_ops.ops.grouped_linear` under the size limit; it
belongs to that op. The workspace is the peak of what an implementation allocates besides its
result and the gradients, counting what autograd saves for the backward, the backward's
temporaries and AccumulateGrad's copy of a gradient whose strides differ from its tensor's. The
estimates are checked against measured peaks (``scripts/workspace_check.py``,
``tests/test_memory.py``): within 1.5x on CPU.
"""

from __future__ import annotations

from ..signature import Signature
from ._bmm_linear import layout_copy_saved
from ._spec import Bytes


def _sizes(sig: Signature) -> tuple[int, int, int, int, int]:
    return sig.dim("batch"), sig.dim("n"), sig.dim("in"), sig.dim("out"), sig.dtype.itemsize


def call_bytes(sig: Signature) -> Bytes:
    """The operands as ``make_inputs`` lays them out, the result, and the gradients."""
    rows, n, inn, out, s = _sizes(sig)
    x, w, b, y = rows * n * inn * s, n * out * inn * s, n * out * s, rows * n * out * s
    storage = {"shared": w // max(n, 1), "chunked": 2 * w, "strided": 2 * w}.get(sig.layout_of("weight"), w)
    bias = b if sig.layout_of("bias") == "yes" else 0
    sizes = {"input": x, "weight": w, "bias": bias}
    return Bytes(x + storage + bias, y, sum(sizes[name] for name in sig.grad))


def _peak(sig: Signature, forward: int, backward: int = 0) -> int:
    """The workspace at the call's peak: ``forward``'s (freed before any gradient exists) or,
    training, ``backward``'s beside the gradients."""
    if not sig.needs_grad:
        return forward
    return max(forward - call_bytes(sig).grads, backward, 0)


def _copies(sig: Signature, weight: bool) -> int:
    # AccumulateGrad's copy of a gradient computed in another layout than its tensor's: the input's
    # ([n, rows, in] products), and the weight's where ``weight`` (computed as [n, in, out]).
    rows, n, inn, out, s = _sizes(sig)
    return (rows * n * inn * s if "input" in sig.grad else 0) + (n * out * inn * s if weight and "weight" in sig.grad else 0)


def _result(sig: Signature) -> int:
    return call_bytes(sig).result


def bmm(sig: Signature) -> int:
    # forward: the [n, rows, out] product is the group-major result (nothing else); training through
    # _BmmLinear the weight's gradient comes out in its layout, else as [n, in, out] and copied
    rows, n, inn, out, s = _sizes(sig)
    if not sig.needs_grad:
        return 0
    linear = layout_copy_saved("weight" in sig.grad,
                               1 if sig.layout_of("weight") in ("contiguous", "chunked", "shared") else 0, rows)
    return _peak(sig, 0, _copies(sig, weight=not linear and sig.layout_of("weight") != "transposed"))


def bmm_weight_left(sig: Signature) -> int:
    # the [n, out, rows] product, copied into the group-major result; the weight's gradient in its layout
    return _peak(sig, _result(sig), _copies(sig, weight=sig.layout_of("weight") == "transposed"))


def einsum(sig: Signature) -> int:
    # the [n, rows, out] product (the group-major result itself without bias), and with bias the sum
    # beside it
    y = _result(sig) if sig.layout_of("bias") == "yes" else 0
    return _peak(sig, y, _copies(sig, weight=sig.layout_of("weight") != "transposed"))


def grouped_mm(sig: Signature) -> int:
    # the [n, rows, out] product is the group-major result; gradients fitted to their layouts
    return _peak(sig, 0, _copies(sig, weight=False))


def loop(sig: Signature) -> int:
    # the n per-group results beside their stack; training, the per-group gradients beside theirs
    return _peak(sig, _result(sig), _copies(sig, weight=True))


def masked_dense(sig: Signature) -> int:
    # the [n*out, n*in] block-diagonal weight and the zeros it is built from (the weight's size);
    # its gradients go group by group (no block-sized gradient)
    rows, n, inn, out, s = _sizes(sig)
    return _peak(sig, n * n * out * inn * s + n * out * inn * s, _copies(sig, weight=False))
