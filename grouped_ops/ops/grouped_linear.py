"""grouped_linear: n independent linear layers in one call.

``input [..., n, in]`` x ``weight [n, out, in]`` (+ ``bias [n, out]``) -> ``[..., n, out]``.
Each implementation is a plain function over validated arguments; ``REGISTRY`` lists them in
preference order (ties in tuning go to the earlier one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import Implementation, Registry
from ..signature import Signature, bucket
from ._common import check_dtypes_devices, fail, is_contiguous, random_like, tensor_meta
from ._spec import OpSpec

OP = "grouped_linear"
Tensor = torch.Tensor


def _split(x: Tensor, w: Tensor) -> tuple[tuple[int, ...], int, int, int, int]:
    lead = tuple(x.shape[:-2])
    n, out, inn = w.shape
    return lead, math.prod(lead), n, out, inn


# ---- implementations -----------------------------------------------------------------------------

def einsum(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # torch.einsum hands contraction-order planning to opt_einsum when it is installed.
    y = torch.einsum("...ni,noi->...no", x, w)
    return y if b is None else y + b


def bmm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    lead, rows, n, out, inn = _split(x, w)
    xt = x.reshape(rows, n, inn).transpose(0, 1)  # [n, rows, in]
    wt = w.transpose(1, 2)  # [n, in, out]: a view, no copy
    y = torch.bmm(xt, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xt, wt)
    return y.transpose(0, 1).reshape(*lead, n, out)


def masked_dense(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # Seed 000's "partitioned linear": one dense matmul over a block-diagonal [n*out, n*in] weight.
    # Built by an indexed write into zeros (not a multiply by a mask) so inf/nan in one group's
    # weight cannot leak into another group as 0*inf; the write is differentiable w.r.t. w.
    lead, rows, n, out, inn = _split(x, w)
    block = w.new_zeros(n, out, n, inn)
    groups = torch.arange(n, device=w.device)
    block[groups, :, groups, :] = w
    y = F.linear(x.reshape(rows, n * inn), block.reshape(n * out, n * inn),
                 None if b is None else b.reshape(n * out))
    return y.reshape(*lead, n, out)


def loop(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    n = w.shape[0]
    if n == 0:  # nothing to stack; bmm's empty result stays in the autograd graph
        return bmm(x, w, b)
    # unbind, not x[..., i, :] / w[i]: indexing's backward builds a full-size gradient per group
    # (measured 14x slower backward at batch 1, n=32, 1024 per group).
    biases = b.unbind(0) if b is not None else (None,) * n
    return torch.stack(
        [F.linear(xi, wi, bi) for xi, wi, bi in zip(x.unbind(-2), w.unbind(0), biases, strict=True)],
        dim=-2,
    )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward
    rejects the stride-0 gradients that ``.sum()`` and ``expand`` produce."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _aligned(t: Tensor) -> Tensor:
    # On CUDA grouped_mm refuses data pointers that are not 16-byte aligned, which a view into a
    # flat buffer (or a slice) can have while its strides look fine; copy those. (The check uses
    # storage_offset, not data_ptr, so that it traces under torch.compile.)
    if t.is_cuda and (t.storage_offset() * t.element_size()) % 16:
        return t.clone()
    return t


def grouped_mm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    lead, rows, n, out, inn = _split(x, w)
    if 0 in (rows, n, out, inn):  # grouped_mm's stride checks reject empty operands, forward and backward
        return bmm(x, w, b)
    xt = x.reshape(rows, n, inn).transpose(0, 1).contiguous()  # grouped_mm wants [n, rows, in] row-major
    y = _ContiguousGrad.apply(F.grouped_mm(_aligned(xt), _aligned(w.transpose(1, 2))))  # [n, rows, out]
    if b is not None:
        y = y + b.unsqueeze(1)
    return y.transpose(0, 1).reshape(*lead, n, out)


# ---- what each implementation supports -----------------------------------------------------------

def _grouped_mm_reasons(sig: Signature) -> list[str]:
    if not hasattr(F, "grouped_mm"):
        return [f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"]
    reasons = []
    if sig.device_type == "cuda":
        if sig.dtype != torch.bfloat16:
            reasons.append("on CUDA only bfloat16 is supported")
        index = sig.device.index if sig.device.index is not None else 0
        if torch.cuda.is_available() and torch.cuda.get_device_capability(index) < (8, 0):
            reasons.append("needs a CUDA device of compute capability 8.0 or newer")
    if sig.layout_of("weight") == "strided":
        reasons.append("weight must be contiguous [n, out, in] or a transposed [n, in, out]")
    align = 16 // sig.dtype.itemsize
    for name in ("in", "out"):
        if sig.dim(name) % align:
            reasons.append(f"{name}={sig.dim(name)} is not a multiple of {align} (16-byte aligned strides)")
    return reasons


def _block_bytes(sig: Signature) -> int:
    # the [n*out, n*in] block-diagonal weight, and its gradient when training
    n = sig.dim("n")
    return n * n * sig.dim("out") * sig.dim("in") * sig.dtype.itemsize * (2 if sig.needs_grad else 1)


REGISTRY = Registry(OP, [
    Implementation("bmm", bmm),
    Implementation("einsum", einsum),
    Implementation("grouped_mm", grouped_mm, dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                   check=_grouped_mm_reasons),
    Implementation("loop", loop),
    Implementation("masked_dense", masked_dense, extra_memory=_block_bytes,
                   work_factor=lambda sig: float(sig.dim("n"))),
], version=2)  # v2: training timed with AccumulateGrad's layout copies


# ---- validation, signature, private inputs -------------------------------------------------------

def meta(input: Any, weight: Any, bias: Any = None) -> tuple[Any, ...] | None:
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return None
    if bias is None:
        b_meta: Any = None
        b_grad = False
    elif isinstance(bias, Tensor):
        b_meta, b_grad = (bias.shape, bias.dtype, bias.device), bias.requires_grad
    else:
        return None
    grad = torch.is_grad_enabled() and (input.requires_grad, weight.requires_grad, b_grad)
    return (tensor_meta(input), tensor_meta(weight), b_meta, grad)


def validate(input: Any, weight: Any, bias: Any = None) -> None:
    shapes = {"input": input, "weight": weight, "bias": bias}
    for name, value in shapes.items():
        if not (isinstance(value, Tensor) or (name == "bias" and value is None)):
            raise fail(OP, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.dim() < 2:
        raise fail(OP, "input must have at least 2 dims [..., n, in]", **shapes)
    if weight.dim() != 3:
        raise fail(OP, "weight must be 3-D [n, out, in] (nn.Linear's layout per group)", **shapes)
    n, out, inn = weight.shape
    if input.shape[-2] != n:
        raise fail(OP, f"weight has {n} groups but input has {input.shape[-2]}", **shapes)
    if input.shape[-1] != inn:
        raise fail(OP, f"weight takes {inn} input features per group but input has {input.shape[-1]}", **shapes)
    if bias is not None and tuple(bias.shape) != (n, out):
        raise fail(OP, f"bias must have shape ({n}, {out}) [n, out]", **shapes)
    named = {"input": input, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_dtypes_devices(OP, named, shapes)


def _weight_layout(shape: torch.Size, stride: tuple[int, ...]) -> str:
    n, out, inn = shape
    if (out <= 1 or stride[1] == inn) and (inn <= 1 or stride[2] == 1):
        return "contiguous"
    if (out <= 1 or stride[1] == 1) and (inn <= 1 or stride[2] == out):
        return "transposed"
    return "strided"


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    (x_shape, x_stride, dtype, device), (w_shape, w_stride, _, _), b_meta, grad = m
    n, out, inn = w_shape
    rows = math.prod(x_shape[:-2])
    x_layout = "contiguous" if is_contiguous(x_shape, x_stride) else "strided"
    names = [name for name, g in zip(("input", "weight", "bias"), grad or (), strict=False) if g]
    return Signature(
        op=OP,
        dims=(("batch", bucket(rows) if bucketed else rows), ("n", n), ("in", inn), ("out", out)),
        dtype=dtype,
        device=device,
        layout=(("input", x_layout), ("weight", _weight_layout(w_shape, w_stride)),
                ("bias", "no" if b_meta is None else "yes")),
        grad=tuple(names),
    )


def make_inputs(sig: Signature, generator: torch.Generator) -> tuple[Any, ...]:
    rows, n, inn, out = (sig.dim(k) for k in ("batch", "n", "in", "out"))
    dt, dev = sig.dtype, sig.device
    if sig.layout_of("input") == "contiguous":
        x = random_like((rows, n, inn), dt, dev, generator)
    else:  # a permuted view, as from x.transpose(0, 1)
        x = random_like((n, rows, inn), dt, dev, generator).transpose(0, 1)
    layout = sig.layout_of("weight")
    scale = 1.0 / max(inn, 1) ** 0.5
    if layout == "contiguous":
        w = random_like((n, out, inn), dt, dev, generator) * scale
    elif layout == "transposed":  # TabM / rtdl store [n, in, out]
        w = (random_like((n, inn, out), dt, dev, generator) * scale).transpose(1, 2)
    else:
        w = (random_like((n, out, 2 * inn), dt, dev, generator) * scale)[..., ::2]
    b = random_like((n, out), dt, dev, generator) if sig.layout_of("bias") == "yes" else None
    for name, t in (("input", x), ("weight", w), ("bias", b)):
        if t is not None and name in sig.grad:
            t.requires_grad_(True)
    return (x, w, b)


def grad_args(sig: Signature, args: tuple[Any, ...]) -> list[Tensor]:
    return [t for name, t in zip(("input", "weight", "bias"), args, strict=False) if name in sig.grad]


def default_impl(sig: Signature) -> str:
    # bmm: one library call, no extra memory, never far from the best in our sweeps (docs/guide.md).
    return "bmm"


SPEC = OpSpec(OP, REGISTRY, meta, validate, signature, make_inputs, default_impl, grad_args)
