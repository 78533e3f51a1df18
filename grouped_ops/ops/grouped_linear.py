"""grouped_linear: n independent linear layers in one call.

``input [..., n, in]`` x ``weight [n, out, in]`` (+ ``bias [n, out]``) -> ``[..., n, out]``.
Each implementation is a plain function over validated arguments; ``REGISTRY`` lists them in
preference order (ties in tuning go to the earlier one).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import Implementation, Registry, group_major, group_major_strides
from ..signature import Signature, bucket
from . import _bmm_linear
from . import _grouped_linear_memory as _memory
from ._block_diagonal_linear import (
    _block_diagonal_linear,
    _BlockDiagonalLinear,
    _BlockDiagonalLinearWithJvp,
)
from ._bmm_linear import _BmmLinear, _split, own_group_major, takes_bmm_linear, written
from ._common import (
    apply_function,
    bias_operand,
    check_dtypes_devices,
    fail,
    is_contiguous,
    may_write_into,
    plain_eager,
    random_like,
    tensor_meta,
)
from ._spec import Arg, Cli, Flag, OpSpec

OP = "grouped_linear"
Tensor = torch.Tensor


# ---- implementations -----------------------------------------------------------------------------

def einsum(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # torch.einsum hands contraction-order planning to opt_einsum when it is installed. Its result
    # is a permuted view of a [n, rows, out] product: the contract's group-major layout already
    # (re-labelled as a tensor of its own, no copy); the bias add writes a fresh tensor in it too.
    y = torch.einsum("...ni,noi->...no", x, w)
    return y if b is None else y + b


def bmm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # A weight stored [n, in, out] (GroupedLinear's, TabM's) makes wt a contiguous operand, which
    # CPU BLAS runs ~1.3x faster than nn.Linear's [n, out, in] passed transposed.
    lead, rows, n, out, inn = _split(x, w)
    plain = plain_eager(x, w, b)
    recording = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
    if recording and takes_bmm_linear(x, w, b, rows, plain):
        return _BmmLinear.apply(x, w, b)
    xt = (x if len(lead) == 1 else x.reshape(rows, n, inn)).transpose(0, 1)  # [n, rows, in]
    wt = w.transpose(1, 2)  # [n, in, out]: a view, no copy
    if plain and not recording:  # the gemms write the result's group-major layout with out=
        return written(xt, wt, b, lead)
    # The product [n, rows, out] is the result's group-major memory: a view of it in the result's
    # shape, which the contract re-labels as a tensor of its own (no copy).
    if b is not None and torch.compiler.is_compiling():
        # traced: inductor fuses this add into the gemm's epilogue or one pass (baddbmm would fill
        # the bias in a pass of its own)
        y = torch.bmm(xt, wt) + bias_operand(b, rows, 1)
    elif b is not None:
        y = torch.baddbmm(bias_operand(b, rows, 1), xt, wt)
    else:
        y = torch.bmm(xt, wt)
    return y.transpose(0, 1) if len(lead) == 1 else y.view(n, *lead, out).movedim(0, -2)


def bmm_weight_left(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # The transposed problem, y^T = W x^T per group ([n, out, in] @ [n, in, rows] -> [n, out, rows]):
    # with nn.Linear's contiguous [n, out, in] weight, the weight's gradient (grad_y^T @ x) comes
    # out in that same layout and AccumulateGrad keeps it; bmm's comes out transposed and is copied.
    # Measured (CPU, 1 thread, training step): 15.2 -> 11.1 ms at 16x64 256->256, but 627 -> 775 us
    # at 128x32 32->32, so it is a candidate for the tuner, not a replacement.
    lead, rows, n, out, inn = _split(x, w)
    xt = x.reshape(rows, n, inn).permute(1, 2, 0)  # [n, in, rows]
    yt = torch.bmm(w, xt) if b is None else torch.baddbmm(bias_operand(b, rows, 2), w, xt)  # [n, out, rows]
    # one copy into [n, rows, out], the result's group-major memory (the tuner times it)
    return yt.transpose(1, 2).reshape(n, *lead, out).movedim(0, -2)


def masked_dense(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # Seed 000's "partitioned linear": one dense matmul over a block-diagonal [n*out, n*in] weight.
    if torch.compiler.is_exporting():  # strict export records a custom Function without its gradients
        return _block_diagonal_linear(x, w, b)  # autograd differentiates the dense matmul
    function = _BlockDiagonalLinear if torch.compiler.is_compiling() else _BlockDiagonalLinearWithJvp
    return apply_function(function, x, w, b)


def loop(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    n = w.shape[0]
    if n == 0:  # nothing to stack; bmm's empty result stays in the autograd graph
        return bmm(x, w, b)
    # unbind, not x[..., i, :] / w[i]: indexing's backward builds a full-size gradient per group
    # (measured 14x slower backward at batch 1, n=32, 1024 per group).
    biases = b.unbind(0) if b is not None else (None,) * n
    # stacked on a new first dim: [n, ..., out], the result's group-major memory (no reordering)
    return torch.stack(
        [F.linear(xi, wi, bi) for xi, wi, bi in zip(x.unbind(-2), w.unbind(0), biases, strict=True)],
    ).movedim(0, -2)


class _GroupedLinearMM(torch.autograd.Function):
    """grouped_mm's training path in one Function: ``xt [n, rows, in] @ wt [n, in, out]`` (+ ``bias
    [n, out]``), the product being the result's group-major ``[..., n, out]`` (no reordering pass).

    Backward hands grouped_mm gradients it accepts: torch checks each operand's strides (last dim
    unit-stride, rows 16-byte aligned) and rejects the stride-0 gradients that ``.sum()`` and
    ``expand`` produce; one that passes is not copied. Under ``create_graph`` (a second backward:
    gradient penalties, ``torch.func.grad`` of a gradient) its products go through
    :class:`_GroupedMM`, which fits the gradients of a second backward too (torch's own grouped_mm
    backward does not: ``F.grouped_mm`` fails there). One Function, not two: each costs ~5 us a call
    on CPU (applied with :func:`~._common.apply_function`). ``setup_context`` and
    ``generate_vmap_rule`` make it work under torch.func; there (as under torch.compile) the forward
    takes two plain passes instead of ``out=``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(xt: Tensor, wt: Tensor, b: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        y = _grouped_mm_op()(xt, wt)  # [n, rows, out]
        if may_write_into(xt, wt, b):  # grad mode is off in here: false only under transforms/tracing
            return own_group_major(y, b, shape)
        y = y if b is None else y + b.unsqueeze(1)
        # a Function's output may not be a view (in-place ops on it would fail): a copy in the layout
        return y.view(shape[-2], *shape[:-2], shape[-1]).movedim(0, -2).clone(memory_format=torch.preserve_format)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        xt, wt, b, _ = inputs
        ctx.save_for_backward(xt, wt)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xt, wt = ctx.saved_tensors
        n, rows, out = xt.shape[0], xt.shape[1], wt.shape[2]
        gy = _fit(grad.reshape(rows, n, out).transpose(0, 1))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw = _products(xt, wt, gy, need_x, need_w)
        gb = grad.reshape(rows, n, out).sum(0) if ctx.has_bias and need_b else None
        return gx, gw, gb, None


class _GroupedMM(torch.autograd.Function):
    """grouped_mm of two 3-D operands whose backward fits each gradient to grouped_mm's stride
    checks and is itself differentiable: the products of a second backward (see
    :class:`_GroupedLinearMM`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return _grouped_mm_op()(a, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        return _products(a, b, _fit(grad), *ctx.needs_input_grad[:2])


def _products(a: Tensor, b: Tensor, grad: Tensor, need_a: bool, need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of ``a @ b`` (grouped) for ``grad``; differentiable under create_graph.

    A column-major ``b`` (nn.Linear's weight seen as ``[n, in, out]``) gets its gradient in that
    layout, as ``(grad^T @ a)^T``: autograd then accumulates the weight's gradient without a copy."""
    mm = partial(apply_function, _GroupedMM) if torch.is_grad_enabled() else _grouped_mm_op()
    ga = mm(grad, _fit(b.transpose(1, 2))) if need_a else None
    gb = None
    if need_b:
        column_major = b.stride(1) == 1 and b.stride(2) != 1
        gb = (mm(_fit(grad.transpose(1, 2)), _fit(a)).transpose(1, 2) if column_major
              else mm(_fit(a.transpose(1, 2)), grad))
    return ga, gb


def _fit(t: Tensor) -> Tensor:
    """``t`` if grouped_mm takes it as an operand, else a copy it takes (see :func:`_laid_for_mm`)."""
    return t if _mat_ok(t) and _offset_ok(t) else _laid_for_mm(t.clone(memory_format=torch.contiguous_format))


def _laid_for_mm(t: Tensor) -> Tensor:
    """A contiguous ``t`` whose rows are one element wide (``out == 1``: a row stride of 1 is no
    multiple of 16 bytes) as a column-major copy, which torch's check takes. (Any other misfit is
    one the signature's reasons rule out, and torch's error says so.)"""
    return t if _mat_ok(t) or t.shape[-1] != 1 else \
        t.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)  # (clone: fresh strides)


def _mat_ok(t: Tensor) -> bool:
    # torch's check_valid_strides_and_return_transposed (aten/src/ATen/native/GroupedMMUtils.h): the
    # last two dims row- or column-major, the other stride >= the width and a multiple of 16 bytes;
    # and the group stride a multiple of 16 bytes too (or 0): torch does not check it, but its CUDA
    # kernel offsets each group's TMA base address by it (GroupMMCommon.cuh), and TMA needs 16 bytes.
    if t.dim() < 2:
        return False
    align = 16 // t.element_size()
    if t.dim() == 3 and t.stride(0) % align:
        return False
    (rows, cols), (s_row, s_col) = t.shape[-2:], t.stride()[-2:]
    if s_col == 1 and s_row >= max(1, cols):
        return s_row % align == 0
    return s_row == 1 and s_col >= max(1, rows) and s_col % align == 0


def _offset_ok(t: Tensor) -> bool:
    """Whether ``t``'s data pointer is 16-byte aligned, as TMA needs on CUDA (not checked on CPU). A
    view into a flat buffer (or a slice) can be misaligned while its strides look fine. Read from
    storage_offset, not data_ptr, so that it traces under torch.compile."""
    return not t.is_cuda or (t.storage_offset() * t.element_size()) % 16 == 0


def _aligned(t: Tensor) -> Tensor:
    """``t`` if its strides pass torch's check, else a contiguous copy (the tuner times this copy:
    a layout it makes is in the signature). A misaligned data pointer is not copied here:
    :func:`grouped_mm` runs bmm for it instead (the signature does not know the offset)."""
    return t if _mat_ok(t) else _laid_for_mm(t.contiguous())


def _grouped_mm_op() -> Any:
    """``F.grouped_mm`` (public since torch 2.10), else ``torch._grouped_mm`` (2.8, 2.9), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    lead, rows, n, out, inn = _split(x, w)
    if 0 in (rows, n, out, inn):  # grouped_mm's stride checks reject empty operands, forward and backward
        return bmm(x, w, b)
    # [n, rows, in]: a view of a contiguous input (rows n*in apart) passes torch's checks, no copy
    xt, wt = _aligned(x.reshape(rows, n, inn).transpose(0, 1)), _aligned(w.transpose(1, 2))
    if not (_offset_ok(xt) and _offset_ok(wt)):
        # A CUDA operand at a misaligned address (a view into a flat buffer): grouped_mm would need a
        # copy of it on every call, which the tuner never timed (its private operands are aligned
        # and the signature does not hold the offset). bmm takes it as is and is a timed candidate.
        return bmm(x, w, b)
    if not may_write_into(x, w, b):  # a backward may run (the Function costs ~5 us a call: only then)
        return apply_function(_GroupedLinearMM, xt, wt, b, (*lead, n, out))
    # torch's grouped_mm takes no bias yet ("Bias not supported yet"): added in place, one pass
    return own_group_major(_grouped_mm_op()(xt, wt), b, (*lead, n, out))


# ---- what each implementation supports -----------------------------------------------------------

def _has_kernel(dispatch_key: str) -> bool:
    """Whether this torch registers aten::_grouped_mm for ``dispatch_key`` (tests patch this)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::_grouped_mm", dispatch_key))
    except (AttributeError, RuntimeError):
        return False


def _capability(sig: Signature) -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    index = sig.device.index if sig.device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def _grouped_mm_reasons(sig: Signature) -> list[str]:
    """Why grouped_mm cannot (or should not) run ``sig``, from torch's own checks (sources under
    aten/src/ATen/native/: GroupedMMUtils.h, cuda/GroupedBlas.cpp, cuda/GroupMM.cu; docs/gpu.md)."""
    if _grouped_mm_op() is None:
        return [f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm (2.10+) "
                "nor torch._grouped_mm (2.8+)"]
    reasons = []
    if sig.device_type == "cpu" and not _has_kernel("CompositeExplicitAutograd"):
        reasons.append(f"torch {torch.__version__} has no CPU kernel for grouped_mm (added in 2.9)")
    if sig.device_type == "cuda":
        reasons += _cuda_reasons(sig)
    layout = sig.layout_of("weight")
    if layout == "strided":
        reasons.append("weight must be contiguous, transposed, chunked or shared (unit stride along out or "
                       "in), as torch's stride check requires")
    align = 16 // sig.dtype.itemsize
    # rows of x are `in` wide; of the weight, `in` (or `out` when transposed); of the output's
    # gradient in backward, `out`. torch pads its own output, so forward alone does not need `out`.
    needs = {"in": "the input's rows"}
    if layout == "transposed" or sig.needs_grad:
        needs["out"] = "the transposed weight's rows" if layout == "transposed" else "the gradient's rows"
    for name, what in needs.items():
        if sig.dim(name) % align:
            reasons.append(f"{name}={sig.dim(name)} is not a multiple of {align}: {what} must be 16-byte aligned")
    return reasons


def _cuda_reasons(sig: Signature) -> list[str]:
    if torch.version.hip:
        return ["ROCm: torch's grouped_mm fast path needs a CK build on gfx942/gfx950; not validated here"]
    if torch.version.cuda and int(torch.version.cuda.split(".")[0]) < 12:
        return [f"torch built with CUDA {torch.version.cuda}: its grouped_mm kernel needs CUDA 12+"]
    reasons = []
    # Off its fast path torch runs the 3-D case as at::bmm_out: bmm's kernel plus our layout copies.
    if sig.dtype != torch.bfloat16:
        reasons.append(f"torch runs {str(sig.dtype).removeprefix('torch.')} grouped_mm through its bmm "
                       "fallback (fast path: bfloat16 only): nothing over bmm")
    cap = _capability(sig)
    if cap is not None and cap[0] not in (9, 10):
        reasons.append(f"sm{cap[0]}{cap[1]}: torch's grouped_mm fast path runs on sm90/sm100 only (else "
                       "its bmm fallback)")
    if sig.dim("n") >= 1024:
        reasons.append(f"n={sig.dim('n')}: torch's CUDA grouped_mm kernel refuses 1024 or more groups")
    return reasons


# Implementations that existed: a name in GROUPED_OPS_IMPL, GROUPED_OPS_EXCLUDE, exclude_impls or a
# cache entry gets one warning and is ignored (dispatch.overrides, dispatch.resolve).
REMOVED = {"bmm_strided_out": "removed in grouped_linear v6: it wrote the contiguous result with one gemm per "
                              "group; bmm now writes the group-major result directly"}

REGISTRY = Registry(OP, [
    Implementation("bmm", bmm, prepare=_bmm_linear.prepare_bmm, extra_memory=_memory.bmm),
    Implementation("bmm_weight_left", bmm_weight_left, extra_memory=_memory.bmm_weight_left),
    Implementation("einsum", einsum, extra_memory=_memory.einsum),
    Implementation("grouped_mm", grouped_mm, dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                   check=_grouped_mm_reasons, forward_ad=False,  # torch has no forward AD formula for it
                   extra_memory=_memory.grouped_mm),
    Implementation("loop", loop, extra_memory=_memory.loop),
    Implementation("masked_dense", masked_dense, extra_memory=_memory.masked_dense,
                   work_factor=lambda sig: float(sig.dim("n"))),
], version=6, output=group_major, removed=REMOVED)  # v2: training timed with AccumulateGrad's layout copies;
# v3: bmm_weight_left; v4: bmm trains through _BmmLinear; v5: bmm_strided_out; v6: the group-major
# result (bmm writes it with no reordering pass), bmm_strided_out removed


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
        hint = ""
        if input.shape[-1] == out:  # the shapes fit a [n, in, out] weight (einsum's, TabM's) passed as is
            hint = (f"; a weight W stored [n, in, out] = [{n}, {out}, {inn}] is passed as W.transpose(1, 2) "
                    "(a view, no copy)")
        raise fail(OP, f"weight takes {inn} input features per group but input has {input.shape[-1]}{hint}",
                   **shapes)
    if bias is not None and tuple(bias.shape) != (n, out):
        raise fail(OP, f"bias must have shape ({n}, {out}) [n, out]", **shapes)
    named = {"input": input, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_dtypes_devices(OP, named, shapes)


def _weight_layout(shape: torch.Size, stride: tuple[int, ...]) -> str:
    """The weight's layout class: ``contiguous`` [n, out, in], ``transposed`` (a [n, in, out] tensor's
    transpose), ``shared`` (one matrix for every group: a stride-0 group dim, as ``w.expand(n, ...)``
    gives), ``chunked`` (contiguous rows, groups further apart than out*in: a chunk of a fused
    weight) or ``strided`` (anything else). Each can change the winner, so each is its own key."""
    n, out, inn = shape
    if n > 1 and out * inn > 1 and stride[0] == 0:
        return "shared"
    if (out <= 1 or stride[1] == inn) and (inn <= 1 or stride[2] == 1):
        if n <= 1 or out * inn <= 1 or stride[0] == out * inn:
            return "contiguous"
        return "chunked" if stride[0] > out * inn else "strided"  # overlapping groups: as_strided
    if (out <= 1 or stride[1] == 1) and (inn <= 1 or stride[2] == out):
        return "transposed"
    return "strided"


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    (x_shape, x_stride, dtype, device), (w_shape, w_stride, _, _), b_meta, grad = m
    n, out, inn = (int(v) for v in w_shape)
    rows = math.prod(int(v) for v in x_shape[:-2])  # int(): torch.jit.trace hands sizes over as tensors
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
        w = random_like((n, out, inn), dt, dev, generator).mul_(scale)
    elif layout == "transposed":  # TabM / rtdl store [n, in, out]
        w = (random_like((n, inn, out), dt, dev, generator).mul_(scale)).transpose(1, 2)
    elif layout == "shared":  # one [out, in] matrix broadcast over the groups (stride 0)
        w = (random_like((1, out, inn), dt, dev, generator).mul_(scale)).expand(n, out, inn)
    elif layout == "chunked":  # the first of two chunks of a fused [n, 2*out, in] weight
        w = (random_like((n, 2 * out, inn), dt, dev, generator).mul_(scale))[:, :out]
    else:
        w = (random_like((n, out, 2 * inn), dt, dev, generator).mul_(scale))[..., ::2]
    b = random_like((n, out), dt, dev, generator) if sig.layout_of("bias") == "yes" else None
    for name, t in (("input", x), ("weight", w), ("bias", b)):
        if t is not None and name in sig.grad:
            t.requires_grad_(True)
    return (x, w, b)


def default_impl(sig: Signature) -> str:
    # bmm: one library call, no extra memory, never far from the best in our sweeps (docs/guide.md).
    return "bmm"


# ---- the definition, the custom op's fake and backward, what tests and the CLI need --------------

def reference(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The definition: one ``F.linear`` per group, stacked. Computes in the arguments' dtype."""
    n = weight.shape[0]
    if n == 0:  # nothing to stack; einsum keeps the (empty) result in the graph
        y = torch.einsum("...ni,noi->...no", input, weight)
        return y if bias is None else y + bias
    return torch.stack([F.linear(input[..., i, :], weight[i], None if bias is None else bias[i])
                        for i in range(n)], dim=-2)


def fake(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # the strides eager gives (the output contract, group_major): compiled code and export agree
    shape = (*input.shape[:-1], weight.shape[1])
    return input.new_empty_strided(shape, group_major_strides(shape))


def backward(args: tuple[Any, ...], needs: tuple[bool, ...], grad: Tensor, again: Any) -> tuple[Any, ...]:
    x, w, b = args
    gx = again(grad, w.transpose(1, 2), None) if needs[0] else None
    gw = torch.einsum("...no,...ni->noi", grad, x) if needs[1] else None
    gb = (grad if grad.dim() == 2 else grad.flatten(0, -3).sum(0)) if needs[2] and b is not None else None
    return gx, gw, gb


def reduction_lengths(args: tuple[Any, ...]) -> dict[str, int]:
    x, w, b = args
    rows = math.prod(x.shape[:-2])
    return {"forward": w.shape[2] + (b is not None), "input": w.shape[1], "weight": rows, "bias": rows}


ARGUMENTS = (Arg("input", dims=("*", "n", "in")),
             Arg("weight", dims=("n", "out", "in"), scale="in", perm=(0, 2, 1)),  # transposed: TabM's
             Arg("bias", optional=True, dims=("n", "out")))
CLI = Cli("input [batch, groups, in] -> [batch, groups, out]", (
    Flag(("--groups", "-n"), "number of groups n", dim="n"),
    Flag(("--in",), "input features per group", dim="in"),
    Flag(("--out",), "output features per group", dim="out"),
    Flag(("--no-bias",), "bias=None", layout="bias", switch=("yes", "no")),
    Flag(("--weight-layout",), "contiguous [n, out, in]; transposed: W.transpose(1, 2) of an [n, in, out] "
         "tensor; chunked: groups further apart than out*in; shared: one weight expanded to n groups; "
         "strided: a sliced view", layout="weight",
         choices=("contiguous", "transposed", "chunked", "shared", "strided")),
    Flag(("--input-layout",), "contiguous [batch, n, in]; strided: a [batch, n, in] view of an "
         "[n, batch, in] tensor", layout="input", choices=("contiguous", "strided")),
    Flag(("--grad",), "training: weight and bias need gradients", grad=("weight", "bias")),
    Flag(("--grad-input",), "training: the input needs a gradient too", grad=("input",)),
))
SPEC = OpSpec(OP, REGISTRY, meta, validate, signature, make_inputs, default_impl, arguments=ARGUMENTS,
              fake=fake, backward=backward, reference=reference, reduction_lengths=reduction_lengths, cli=CLI,
              call_bytes=_memory.call_bytes)
