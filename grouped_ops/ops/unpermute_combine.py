"""unpermute_combine: un-permute rows and take each token's weighted sum, in one call.

``out[t] = sum_j weights[t, j] * rows[inverse[t, j]]``: ``rows [N, d]`` are the outputs of a
mixture-of-experts layer's experts in expert order (``N = T * k`` rows, or more: rows no token
points at are ignored), ``inverse [T, k]`` says where token ``t``'s ``j``-th choice landed, and
``weights [T, k]`` are the routing weights. :func:`grouped_ops.moe_routing` returns ``inverse``.

It is its own op rather than a keyword of ``weighted_combine``: its arguments (an index), its
implementations (gathers, ``embedding_bag``), its key and its gradient (a scatter into distinct
rows) all differ; docs/moe.md says more.

Deterministic everywhere: the forward gathers by ``inverse`` and sums over ``k``; the gradient of
``rows`` adds into each referenced row once when ``inverse`` holds distinct rows, as the inverse of
a permutation does (no ``index_add_`` with repeated indices, whose CUDA order varies).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..registry import Implementation, Registry
from ..signature import Signature, bucket
from ._common import (
    check_dtypes_devices,
    fail,
    is_contiguous,
    may_write_into,
    plain_tensors,
    random_like,
    tensor_meta,
)
from ._spec import Arg, Cli, Flag, OpSpec

OP = "unpermute_combine"
Tensor = torch.Tensor
_INDEX = (torch.int32, torch.int64)


def _gathered(rows: Tensor, inverse: Tensor) -> Tensor:
    t, k = inverse.shape
    return rows.index_select(0, inverse.reshape(-1)).view(t, k, rows.shape[1])


# ---- implementations -----------------------------------------------------------------------------

def gather_bmm(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """One gather of the ``T*k`` rows, then one ``[T, 1, k] @ [T, k, d]`` bmm (float32
    accumulation in the matmul for reduced-precision rows)."""
    t, d = weights.shape[0], rows.shape[1]
    g = _gathered(rows, inverse)
    if not may_write_into(rows, weights):
        return torch.bmm(weights.unsqueeze(1), g).view(t, d)
    out = rows.new_empty(t, d)
    torch.bmm(weights.unsqueeze(1), g, out=out.view(t, 1, d))
    return out


def gather_sum(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """One gather, a broadcast multiply by the weights and a sum over ``k`` (as transformers'
    backends write it)."""
    return (_gathered(rows, inverse) * weights.unsqueeze(-1)).sum(1)


def loop(inputs_rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """k gathers of ``[T, d]``, each added in with ``addcmul``: no ``[T, k, d]`` buffer."""
    k = inverse.shape[1]
    if k == 0:
        return gather_bmm(inputs_rows, inverse, weights)
    out = inputs_rows.index_select(0, inverse[:, 0]) * weights[:, :1]
    for j in range(1, k):
        out = out.addcmul(inputs_rows.index_select(0, inverse[:, j]), weights[:, j:j + 1])
    return out


def embedding_bag(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """``F.embedding_bag(inverse, rows, per_sample_weights=weights, mode="sum")``: the gather and
    the weighted sum fused in one kernel."""
    if inverse.shape[1] == 0 or inverse.shape[0] == 0:  # embedding_bag refuses empty bags' weights
        return gather_bmm(rows, inverse, weights)
    return F.embedding_bag(inverse, rows, per_sample_weights=weights, mode="sum")


def prepare_embedding_bag(m: tuple[Any, ...], implementation: Any) -> Any:
    """:func:`embedding_bag` for the calls described by ``m`` (the op's meta), for the dispatcher's
    memo (``Implementation.prepare``): torch's kernel called directly with the bags' offsets made
    once, where ``F.embedding_bag``'s wrapper makes them and reshapes on every call (measured, CPU,
    one thread, 8 rows of 256 in bfloat16, through the public function: 38 -> 19 us a call; with
    float32 routing weights and ``out_dtype``, 50 -> 20 us). None for empty bags."""
    _, (i_shape, _, i_dtype, i_device), _, _ = m
    t, k = i_shape
    if t == 0 or k == 0 or i_device.type == "meta":
        return None
    offsets = torch.arange(0, t * k, k, dtype=i_dtype, device=i_device)  # read only

    def run(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
        if not plain_tensors(rows, inverse, weights):
            return implementation(rows, inverse, weights)
        return torch.embedding_bag(rows, inverse.reshape(-1), offsets, False, 0, False, weights.reshape(-1),
                                   False, None)[0]
    return run


def _gather_bytes(sig: Signature) -> int:
    return sig.dim("batch") * sig.dim("k") * sig.dim("features") * sig.dtype.itemsize


def _embedding_bag_check(sig: Signature) -> list[str]:
    # its backward to rows is a dense [N, d] gradient; forward-mode AD and float16 on CPU are missing
    return ["float16 on CPU"] if sig.dtype == torch.float16 and sig.device_type == "cpu" else []


REGISTRY = Registry(OP, [
    Implementation("gather_bmm", gather_bmm, extra_memory=_gather_bytes),
    Implementation("gather_sum", gather_sum, extra_memory=lambda sig: 2 * _gather_bytes(sig)),
    Implementation("loop", loop),
    Implementation("embedding_bag", embedding_bag, check=_embedding_bag_check, forward_ad=False,
                   prepare=prepare_embedding_bag),
], version=1)


# ---- validation, signature, private inputs -------------------------------------------------------

def meta(rows: Any, inverse: Any, weights: Any) -> tuple[Any, ...] | None:
    if not (isinstance(rows, Tensor) and isinstance(inverse, Tensor) and isinstance(weights, Tensor)):
        return None
    grad = torch.is_grad_enabled() and (rows.requires_grad, False, weights.requires_grad)
    return (tensor_meta(rows), tensor_meta(inverse), tensor_meta(weights), grad)


def validate(rows: Any, inverse: Any, weights: Any) -> None:
    shapes = {"rows": rows, "inverse": inverse, "weights": weights}
    for name, value in shapes.items():
        if not isinstance(value, Tensor):
            raise fail(OP, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if rows.dim() != 2 or inverse.dim() != 2 or weights.dim() != 2:
        raise fail(OP, "rows must be [N, d], inverse [T, k] and weights [T, k]", **shapes)
    if inverse.shape != weights.shape:
        raise fail(OP, f"inverse {tuple(inverse.shape)} and weights {tuple(weights.shape)} must have one shape "
                       "[T, k]", **shapes)
    if inverse.dtype not in _INDEX:
        raise fail(OP, f"inverse must be int64 or int32 row indices, got {str(inverse.dtype).removeprefix('torch.')}",
                   **shapes)
    if inverse.device != rows.device:
        raise fail(OP, f"inverse is on {inverse.device} but rows on {rows.device}", **shapes)
    check_dtypes_devices(OP, {"rows": rows, "weights": weights}, shapes)


def check_rows(rows: Tensor, inverse: Tensor) -> None:
    """Refuses indices outside ``rows``, where that costs no sync: on the CPU (a CUDA check would
    read the device). The public function calls it on every call (it reads values, which a memoised
    ``validate`` never sees again)."""
    if inverse.device.type == "cpu" and inverse.numel() and inverse.dtype in _INDEX and rows.dim() == 2 \
            and not torch.compiler.is_compiling():  # (wrong kinds of arguments: validate explains)
        low, high = (int(v) for v in torch.aminmax(inverse))
        if low < 0 or high >= rows.shape[0]:
            raise fail(OP, f"inverse holds rows {low}..{high} but rows has {rows.shape[0]}",
                       rows=rows, inverse=inverse)


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    (r_shape, r_stride, dtype, device), _, (w_shape, _, _, _), grad = m
    t, k = (int(v) for v in w_shape)
    names = [name for name, g in zip(("rows", "inverse", "weights"), grad or (), strict=False) if g]
    return Signature(
        op=OP,
        dims=(("batch", bucket(t) if bucketed else t), ("k", k), ("features", int(r_shape[1]))),
        dtype=dtype, device=device,
        layout=(("rows", "contiguous" if is_contiguous(r_shape, r_stride) else "strided"),),
        grad=tuple(names),
    )


def make_inputs(sig: Signature, generator: torch.Generator) -> tuple[Any, ...]:
    t, k, d = sig.dim("batch"), sig.dim("k"), sig.dim("features")
    dt, dev = sig.dtype, sig.device
    if sig.layout_of("rows") == "contiguous":
        rows = random_like((t * k, d), dt, dev, generator)
    else:
        rows = random_like((d, t * k), dt, dev, generator).t()
    if dev.type == "meta":
        inverse = torch.empty((t, k), dtype=torch.int64, device=dev)
    else:
        inverse = torch.randperm(t * k, generator=generator).view(t, k).to(dev)
    weights = torch.softmax(random_like((t, k), dt, dev, generator), dim=-1)
    rows.requires_grad_("rows" in sig.grad)
    weights.requires_grad_("weights" in sig.grad)
    return (rows, inverse, weights)


def default_impl(sig: Signature) -> str:
    # the fused kernel: 5-10x the others on a 2-core CPU from T=16 on (docs/moe.md)
    return "gather_bmm" if _embedding_bag_check(sig) else "embedding_bag"


# ---- the definition, the custom op's fake and backward, what tests and the CLI need --------------

def reference(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """The definition: gather each token's rows, multiply by the weights, sum over k."""
    return (rows[inverse] * weights.unsqueeze(-1)).sum(1)


def fake(rows: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    return rows.new_empty(weights.shape[0], rows.shape[1])


def backward(args: tuple[Any, ...], needs: tuple[bool, ...], grad: Tensor, again: Any) -> tuple[Any, ...]:
    rows, inverse, weights = args
    t, k = weights.shape
    g_rows = g_w = None
    if needs[0]:
        # index_add_ into distinct rows adds once per row: the same bits in any order (and correct
        # sums, if a caller does repeat a row)
        parts = (grad.unsqueeze(1) * weights.unsqueeze(-1)).reshape(t * k, rows.shape[1])
        g_rows = rows.new_zeros(rows.shape).index_add_(0, inverse.reshape(-1), parts)
    if needs[2]:
        g_w = torch.bmm(_gathered(rows, inverse), grad.unsqueeze(-1)).squeeze(-1)
    return g_rows, None, g_w


def reduction_lengths(args: tuple[Any, ...]) -> dict[str, int]:
    return {"forward": args[2].shape[1], "weights": args[0].shape[1]}


CLI = Cli("rows [batch*k, features] in expert order, inverse [batch, k], weights [batch, k]", (
    Flag(("--k",), "choices per token (top-k)", dim="k"),
    Flag(("--features",), "features of one row", dim="features"),
    Flag(("--strided",), "rows are a transposed view", layout="rows", switch=("contiguous", "strided")),
    Flag(("--grad",), "training: rows and weights need gradients", grad=("rows", "weights")),
))
ARGUMENTS = (Arg("rows"), Arg("inverse"), Arg("weights"))
SPEC = OpSpec(OP, REGISTRY, meta, validate, signature, make_inputs, default_impl, arguments=ARGUMENTS,
              fake=fake, backward=backward, reference=reference, reduction_lengths=reduction_lengths, cli=CLI)
