"""weighted_combine: per-sample weighted sum of k branch outputs.

``out[b, ...] = sum_k weights[b, k] * inputs[b, k, ...]`` where ``inputs`` is a stacked tensor
``[b, k, *f]`` or a list of k tensors ``[b, *f]``, and ``weights [b, k]``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from ..registry import Implementation, Registry
from ..signature import Signature, bucket
from ._common import (
    apply_function,
    check_dtypes_devices,
    fail,
    is_contiguous,
    may_write_into,
    own_tensor,
    random_like,
    tensor_meta,
)
from ._spec import Arg, Bytes, Cli, Flag, OpSpec

OP = "weighted_combine"
Tensor = torch.Tensor
Inputs = Tensor | tuple[Tensor, ...]


def _stacked(inputs: Inputs) -> Tensor:
    return inputs if isinstance(inputs, Tensor) else torch.stack(inputs, dim=1)


def _features(inputs: Inputs) -> tuple[int, ...]:
    return tuple(inputs.shape[2:]) if isinstance(inputs, Tensor) else tuple(inputs[0].shape[1:])


# ---- implementations -----------------------------------------------------------------------------

def einsum(inputs: Inputs, weights: Tensor) -> Tensor:
    return torch.einsum("bk,bk...->b...", weights, _stacked(inputs))


def bmm(inputs: Inputs, weights: Tensor) -> Tensor:
    b, k = weights.shape
    f = _features(inputs)
    flat = _stacked(inputs).reshape(b, k, math.prod(f))
    if not may_write_into(weights, flat):
        return torch.bmm(weights.unsqueeze(1), flat).reshape(b, *f)
    result = flat.new_empty(b, *f)
    torch.bmm(weights.unsqueeze(1), flat, out=result.view(b, 1, math.prod(f)))
    return result


def masked_dense(inputs: Inputs, weights: Tensor) -> Tensor:
    # One dense [b, b*k] @ [b*k, F] matmul whose left side is block-diagonal: row i holds weights[i]
    # in columns i*k .. i*k+k-1.
    stacked = isinstance(inputs, Tensor)
    if torch.compiler.is_exporting():  # strict export records a custom Function without its gradients
        return _block_diagonal_combine(weights, inputs)  # autograd differentiates the dense matmul
    function = _BlockDiagonalCombine if torch.compiler.is_compiling() else _BlockDiagonalCombineWithJvp
    return apply_function(function, weights, stacked, *((inputs,) if stacked else inputs))


def _block_diagonal_combine(weights: Tensor, inputs: Inputs) -> Tensor:
    b, k = weights.shape
    f = _features(inputs)
    # Weights copied onto the diagonal of zeros derived from them (batched like them under vmap).
    block = torch.zeros_like(weights)[:, None, :].expand(b, b, k).contiguous()
    torch.diagonal(block, dim1=0, dim2=1).copy_(weights.t())
    flat = _stacked(inputs).reshape(b * k, math.prod(f))
    if not may_write_into(weights, flat):
        return own_tensor(block.reshape(b, b * k) @ flat, (b, *f))
    result = flat.new_empty(b, *f)
    torch.mm(block.reshape(b, b * k), flat, out=result.view(b, math.prod(f)))
    return result


class _BlockDiagonalCombine(torch.autograd.Function):
    """masked_dense: forward as one dense matmul; gradients sample by sample.

    The dense backward multiplies the incoming gradient by the zero blocks, so a non-finite
    gradient of one sample would reach every sample's input gradient; computed per sample it stays
    where the multiply-and-sum keeps it. (A non-finite *input* still spreads in the forward: see
    docs/weighted_combine.md.)
    """

    generate_vmap_rule = True  # forward and backward are plain torch ops: torch.func derives the rule

    @staticmethod
    def forward(weights: Tensor, stacked: bool, *xs: Tensor) -> Tensor:
        return _block_diagonal_combine(weights, xs[0] if stacked else xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weights, stacked, *xs = inputs
        ctx.save_for_backward(weights, *xs)
        ctx.save_for_forward(weights, *xs)
        ctx.stacked = stacked

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weights, *xs = ctx.saved_tensors
        b, k = weights.shape
        tail = (1,) * (grad.dim() - 1)
        gw = None
        if ctx.needs_input_grad[0]:
            if ctx.stacked:
                gw = (xs[0] * grad.unsqueeze(1)).reshape(b, k, math.prod(grad.shape[1:])).sum(-1)
            else:
                gw = torch.stack([(x * grad).reshape(b, math.prod(grad.shape[1:])).sum(-1) for x in xs], 1)
        gxs: list[Tensor | None] = [None] * len(xs)
        if any(ctx.needs_input_grad[2:]):
            if ctx.stacked:
                gxs = [grad.unsqueeze(1) * weights.reshape(b, k, *tail)]
            else:
                gxs = [grad * weights[:, i].reshape(b, *tail) for i in range(k)]
        return (gw, None, *gxs)


class _BlockDiagonalCombineWithJvp(_BlockDiagonalCombine):
    """_BlockDiagonalCombine with forward-mode AD (torch.func.jvp); dynamo cannot trace a custom jvp, so
    compiled code uses the plain class."""

    @staticmethod
    def jvp(ctx: Any, weights_t: Tensor | None, _: None, *xs_t: Tensor | None) -> Tensor:
        weights, *xs = ctx.saved_tensors  # the output is linear in each argument
        out = None if weights_t is None else broadcast(xs[0] if ctx.stacked else tuple(xs), weights_t)
        if any(t is not None for t in xs_t):
            tangents = [torch.zeros_like(x) if t is None else t for x, t in zip(xs, xs_t, strict=True)]
            term = broadcast(tangents[0] if ctx.stacked else tuple(tangents), weights)
            out = term if out is None else out + term
        assert out is not None
        return out


def loop(inputs: Inputs, weights: Tensor) -> Tensor:
    # Walks the k branches one at a time, so a list is consumed without ever being stacked.
    b, k = weights.shape
    f = _features(inputs)
    parts = inputs if isinstance(inputs, tuple) else inputs.unbind(1)
    scale = (b,) + (1,) * len(f)
    if k == 0:  # only stacked inputs can have no branches; bmm's zeros stay in the autograd graph
        return bmm(inputs, weights)
    out = parts[0] * weights[:, 0].reshape(scale)
    for i in range(1, k):
        out = out.addcmul(parts[i], weights[:, i].reshape(scale))
    return out


def broadcast(inputs: Inputs, weights: Tensor) -> Tensor:
    # Seed 003's answer: multiply by weights[:, :, None, ...] and sum over k.
    b, k = weights.shape
    f = _features(inputs)
    return (_stacked(inputs) * weights.reshape(b, k, *(1,) * len(f))).sum(1)


def call_bytes(sig: Signature) -> Bytes:
    """The operands as ``make_inputs`` lays them out, the result, and the gradients."""
    b, k, f, s = sig.dim("batch"), sig.dim("k"), sig.dim("features"), sig.dtype.itemsize
    sizes = {"inputs": b * k * f * s, "weights": b * k * s}
    return Bytes(sum(sizes.values()), b * f * s, sum(sizes[name] for name in sig.grad))


# Workspace (Implementation.extra_memory): what each allocates besides its result and gradients, at
# the call's peak (the forward's, freed before any gradient exists, or the backward's beside the
# gradients); checked against measured peaks by scripts/workspace_check.py and tests/test_memory.py.

def _peak(sig: Signature, forward: int, backward: int = 0) -> int:
    return forward if not sig.needs_grad else max(forward - call_bytes(sig).grads, backward, 0)


def _all(sig: Signature) -> int:  # the inputs' size, [b, k, F]
    return sig.dim("batch") * sig.dim("k") * sig.dim("features") * sig.dtype.itemsize


def _stack_bytes(sig: Signature) -> int:
    # a list, or a stacked tensor in another layout, is copied into one contiguous [b, k, F] first
    # (saved for the backward where the weights' gradient needs it)
    stacked = sig.layout_of("inputs") == "stacked" and sig.layout_of("contiguous") == "yes"
    return 0 if stacked else _all(sig)


def _bmm_bytes(sig: Signature) -> int:
    return _peak(sig, _stack_bytes(sig), _stack_bytes(sig))


def _broadcast_bytes(sig: Signature) -> int:
    # the full [b, k, F] product; in the backward, a gradient of that size
    return _peak(sig, _stack_bytes(sig) + _all(sig), _stack_bytes(sig) + _all(sig))


def _loop_bytes(sig: Signature) -> int:
    # the running sum beside the next one; training, a stacked input's per-branch gradients beside
    # their stack
    result = call_bytes(sig).result
    per_branch = sig.layout_of("inputs") == "stacked" and "inputs" in sig.grad
    return _peak(sig, result, _all(sig) if per_branch else result)


def _masked_dense_bytes(sig: Signature) -> int:
    # the [b, b*k] block-diagonal weight (and the stack); its gradients go sample by sample
    b = sig.dim("batch")
    return _peak(sig, b * b * sig.dim("k") * sig.dtype.itemsize + _stack_bytes(sig))


REGISTRY = Registry(OP, [
    Implementation("bmm", bmm, extra_memory=_bmm_bytes),
    Implementation("broadcast", broadcast, extra_memory=_broadcast_bytes),
    Implementation("einsum", einsum, extra_memory=_bmm_bytes),
    Implementation("loop", loop, extra_memory=_loop_bytes),
    Implementation("masked_dense", masked_dense, extra_memory=_masked_dense_bytes,
                   work_factor=lambda sig: float(sig.dim("batch"))),
], version=2)  # v2: training timed with AccumulateGrad's layout copies


# ---- validation, signature, private inputs -------------------------------------------------------

def meta(inputs: Any, weights: Any) -> tuple[Any, ...] | None:
    if not isinstance(weights, Tensor):
        return None
    if isinstance(inputs, Tensor):
        grad = torch.is_grad_enabled() and (inputs.requires_grad, weights.requires_grad)
        return (True, tensor_meta(inputs), tensor_meta(weights), grad)
    if not isinstance(inputs, (list, tuple)) or not inputs or not isinstance(inputs[0], Tensor):
        return None
    first = inputs[0]
    shape, dtype, device = first.shape, first.dtype, first.device
    needs = first.requires_grad
    contiguous = True
    for t in inputs:  # every call: a ragged list must never pass on an earlier call's say-so
        if not isinstance(t, Tensor) or t.shape != shape or t.dtype != dtype or t.device != device:
            return None
        needs = needs or t.requires_grad
        contiguous = contiguous and t.is_contiguous()
    grad = torch.is_grad_enabled() and (needs, weights.requires_grad)
    return (False, (len(inputs), shape, contiguous, dtype, device), tensor_meta(weights), grad)


def promote(inputs: Any, weights: Any, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``(inputs, weights)`` in one dtype: ``dtype`` when given (``out_dtype``: bfloat16 rows with
    float32 routing weights stay bfloat16, only the small weights are cast), else by torch's type
    promotion (as ``(x * w).sum(1)`` does: bfloat16 with float32 gives float32). Anything but
    floating-point tensors is left for :func:`validate` to explain."""
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        return inputs, weights
    first = inputs if isinstance(inputs, Tensor) else (inputs[0] if isinstance(inputs, tuple) and inputs else None)
    if not isinstance(first, Tensor) or not first.is_floating_point():
        return inputs, weights
    if dtype is None:
        if first.dtype == weights.dtype:
            return inputs, weights
        dtype = torch.promote_types(first.dtype, weights.dtype)
    if isinstance(inputs, tuple):
        inputs = tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)
    elif inputs.dtype != dtype:  # (.to of the dtype a tensor has costs ~1.5 us, on every call)
        inputs = inputs.to(dtype)
    return inputs, weights if weights.dtype == dtype else weights.to(dtype)


def validate(inputs: Any, weights: Any) -> None:
    if not isinstance(weights, Tensor):
        raise fail(OP, f"weights must be a torch.Tensor [b, k], got {type(weights).__name__}")
    shapes: dict[str, Any] = {"inputs": inputs, "weights": weights}
    if weights.dim() != 2:
        raise fail(OP, "weights must be 2-D [b, k]", **shapes)
    b, k = weights.shape
    if isinstance(inputs, Tensor):
        if inputs.dim() < 2:
            raise fail(OP, "stacked inputs must have at least 2 dims [b, k, *f]", **shapes)
        if inputs.shape[0] != b:
            raise fail(OP, f"weights has batch {b} but inputs has batch {inputs.shape[0]}", **shapes)
        if inputs.shape[1] != k:
            raise fail(OP, f"weights has k={k} branches but stacked inputs has {inputs.shape[1]}", **shapes)
        check_dtypes_devices(OP, {"inputs": inputs, "weights": weights}, shapes)
        return
    if not isinstance(inputs, (list, tuple)):
        raise fail(OP, f"inputs must be a tensor [b, k, *f] or a list of k tensors [b, *f], got {type(inputs).__name__}")
    if not inputs:
        raise fail(OP, "inputs is an empty list; pass at least one branch output", **shapes)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise fail(OP, f"inputs[{i}] must be a torch.Tensor, got {type(t).__name__}")
    first = inputs[0]
    if first.dim() < 1:
        raise fail(OP, "each input must have at least 1 dim [b, *f]", **shapes)
    for i, t in enumerate(inputs):
        if t.shape != first.shape:
            raise fail(OP, f"inputs must all have one shape, but inputs[{i}] differs from inputs[0]", **shapes)
    if len(inputs) != k:
        raise fail(OP, f"weights has k={k} branches but {len(inputs)} inputs were given", **shapes)
    if first.shape[0] != b:
        raise fail(OP, f"weights has batch {b} but the inputs have batch {first.shape[0]}", **shapes)
    named = {f"inputs[{i}]": t for i, t in enumerate(inputs)} | {"weights": weights}
    check_dtypes_devices(OP, named, shapes)


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    stacked, x_meta, (w_shape, _, dtype, device), grad = m
    b, k = (int(v) for v in w_shape)  # int(): torch.jit.trace hands sizes over as tensors
    if stacked:
        x_shape, x_stride = x_meta[0], x_meta[1]
        features, kind, contiguous = math.prod(int(v) for v in x_shape[2:]), "stacked", is_contiguous(x_shape, x_stride)
    else:
        _, shape, contiguous, _, _ = x_meta
        features, kind = math.prod(int(v) for v in shape[1:]), "list"
    names = [name for name, g in zip(("inputs", "weights"), grad or (), strict=False) if g]
    return Signature(
        op=OP,
        dims=(("batch", bucket(b) if bucketed else b), ("k", k), ("features", features)),
        dtype=dtype,
        device=device,
        layout=(("inputs", kind), ("contiguous", "yes" if contiguous else "no")),
        grad=tuple(names),
    )


def make_inputs(sig: Signature, generator: torch.Generator) -> tuple[Any, ...]:
    b, k, f = sig.dim("batch"), sig.dim("k"), sig.dim("features")
    dt, dev = sig.dtype, sig.device
    contiguous = sig.layout_of("contiguous") == "yes"
    if sig.layout_of("inputs") == "stacked":
        if contiguous:
            inputs: Any = random_like((b, k, f), dt, dev, generator)
        else:
            inputs = random_like((k, b, f), dt, dev, generator).transpose(0, 1)
    else:
        shape = (b, f) if contiguous else (f, b)
        inputs = tuple(random_like(shape, dt, dev, generator) if contiguous
                       else random_like(shape, dt, dev, generator).t() for _ in range(k))
    weights = torch.softmax(random_like((b, k), dt, dev, generator), dim=-1)
    if "inputs" in sig.grad:
        for t in inputs if isinstance(inputs, tuple) else (inputs,):
            t.requires_grad_(True)
    if "weights" in sig.grad:
        weights.requires_grad_(True)
    return (inputs, weights)


def default_impl(sig: Signature) -> str:
    # loop for lists (no stacking copy), bmm for stacked tensors: see docs/guide.md.
    return "loop" if sig.layout_of("inputs") == "list" else "bmm"


# ---- the definition, the custom op's fake and backward, what tests and the CLI need --------------

def reference(inputs: Inputs, weights: Tensor) -> Tensor:
    """The definition: multiply by the weights and sum over k. Computes in the arguments' dtype."""
    stacked = _stacked(tuple(inputs) if isinstance(inputs, list) else inputs)
    b, k = weights.shape
    return (stacked * weights.reshape(b, k, *(1,) * (stacked.dim() - 2))).sum(1)


def fake(inputs: Inputs, weights: Tensor) -> Tensor:
    first = inputs if isinstance(inputs, Tensor) else inputs[0]
    return first.new_empty(first.shape[:1] + first.shape[2:] if isinstance(inputs, Tensor) else first.shape)


def backward(args: tuple[Any, ...], needs: tuple[bool, ...], grad: Tensor, again: Any) -> tuple[Any, ...]:
    inputs, weights = args
    b, k = weights.shape
    tail = (1,) * (grad.dim() - 1)
    gx: Any = None
    if needs[0] and isinstance(inputs, Tensor):
        gx = grad.unsqueeze(1) * weights.reshape(b, k, *tail)
    elif needs[0]:
        gx = tuple(grad * weights[:, i].reshape(b, *tail) for i in range(k))
    gw = None
    if needs[1]:
        gw = (_stacked(inputs) * grad.unsqueeze(1)).reshape(b, k, math.prod(grad.shape[1:])).sum(-1)
    return gx, gw


def reduction_lengths(args: tuple[Any, ...]) -> dict[str, int]:
    return {"forward": args[1].shape[1], "weights": math.prod(_features(args[0]))}


def features_flag(text: str) -> int:
    """``1024`` or ``32x8x8`` (the feature dims of one branch output, multiplied)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"features must look like 1024 or 32x8x8, got {text!r}") from None
    if any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError(f"every feature dim must be positive, got {text!r}")
    return math.prod(parts)


ARGUMENTS = (Arg("inputs", many=True, dims=("batch", "k", "*")), Arg("weights", dims=("batch", "k")))
CLI = Cli("k inputs [batch, *features] and weights [batch, k]", (
    Flag(("--k",), "number of inputs (branches) combined", dim="k"),
    Flag(("--features",), "the feature dims of one input, e.g. 1024 or 32x8x8", dim="features",
         type=features_flag),
    Flag(("--list",), "a list of k tensors instead of one stacked tensor", layout="inputs",
         switch=("stacked", "list")),
    Flag(("--non-contiguous",), "inputs are transposed views", layout="contiguous", switch=("yes", "no")),
    Flag(("--grad",), "training: inputs and weights need gradients", grad=("inputs", "weights")),
))
SPEC = OpSpec(OP, REGISTRY, meta, validate, signature, make_inputs, default_impl, arguments=ARGUMENTS,
              fake=fake, backward=backward, reference=reference, reduction_lengths=reduction_lengths, cli=CLI,
              call_bytes=call_bytes)
