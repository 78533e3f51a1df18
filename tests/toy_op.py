"""A toy third op, registered from this one module: ``grouped_scale``.

``input [..., n, f] * scale [n, f] -> [..., n, f]`` (a per-group, per-feature gain). Importing this
module registers it; nothing else in the library is edited for it. tests/test_toy_op.py runs it
through every path (eager, torch.compile, prewarm, lookup, explain, the testing helpers).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grouped_ops.functional import op_function
from grouped_ops.ops import (
    Arg,
    Cli,
    Flag,
    OpSpec,
    check_dtypes_devices,
    fail,
    is_contiguous,
    random_like,
    register,
    tensor_meta,
)
from grouped_ops.registry import Implementation, Registry
from grouped_ops.signature import Signature, bucket

OP = "grouped_scale"
Tensor = torch.Tensor


# ---- implementations -----------------------------------------------------------------------------

def broadcast(x: Tensor, s: Tensor) -> Tensor:
    return x * s


def loop(x: Tensor, s: Tensor) -> Tensor:
    if s.shape[0] == 0:  # nothing to stack
        return x * s
    return torch.stack([xi * si for xi, si in zip(x.unbind(-2), s.unbind(0), strict=True)], dim=-2)


REGISTRY = Registry(OP, [Implementation("broadcast", broadcast), Implementation("loop", loop)], version=1)


# ---- validation, signature, private inputs -------------------------------------------------------

def meta(input: Any, scale: Any) -> tuple[Any, ...] | None:
    if not (isinstance(input, Tensor) and isinstance(scale, Tensor)):
        return None
    grad = torch.is_grad_enabled() and (input.requires_grad, scale.requires_grad)
    return (tensor_meta(input), tensor_meta(scale), grad)


def validate(input: Any, scale: Any) -> None:
    shapes = {"input": input, "scale": scale}
    for name, value in shapes.items():
        if not isinstance(value, Tensor):
            raise fail(OP, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.dim() < 2 or scale.dim() != 2:
        raise fail(OP, "input must be [..., n, f] and scale [n, f]", **shapes)
    if tuple(input.shape[-2:]) != tuple(scale.shape):
        raise fail(OP, f"scale is {tuple(scale.shape)} but input's last two dims are {tuple(input.shape[-2:])}",
                   **shapes)
    check_dtypes_devices(OP, shapes, shapes)


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    (x_shape, x_stride, dtype, device), (s_shape, _, _, _), grad = m
    n, f = (int(v) for v in s_shape)
    rows = math.prod(int(v) for v in x_shape[:-2])
    names = [name for name, g in zip(("input", "scale"), grad or (), strict=False) if g]
    return Signature(
        op=OP,
        dims=(("batch", bucket(rows) if bucketed else rows), ("n", n), ("f", f)),
        dtype=dtype, device=device,
        layout=(("input", "contiguous" if is_contiguous(x_shape, x_stride) else "strided"),),
        grad=tuple(names),
    )


def make_inputs(sig: Signature, generator: torch.Generator) -> tuple[Any, ...]:
    rows, n, f = sig.dim("batch"), sig.dim("n"), sig.dim("f")
    if sig.layout_of("input") == "contiguous":
        x = random_like((rows, n, f), sig.dtype, sig.device, generator)
    else:
        x = random_like((n, rows, f), sig.dtype, sig.device, generator).transpose(0, 1)
    s = random_like((n, f), sig.dtype, sig.device, generator)
    for name, t in (("input", x), ("scale", s)):
        t.requires_grad_(name in sig.grad)
    return (x, s)


def default_impl(sig: Signature) -> str:
    return "broadcast"


# ---- the definition, the custom op's fake and backward, what tests and the CLI need --------------

def reference(input: Tensor, scale: Tensor) -> Tensor:
    return input * scale


def fake(input: Tensor, scale: Tensor) -> Tensor:
    return input.new_empty(input.shape)


def backward(args: tuple[Any, ...], needs: tuple[bool, ...], grad: Tensor, again: Any) -> tuple[Any, ...]:
    x, s = args
    gx = again(grad, s) if needs[0] else None  # the gradient of the input is the op itself
    gs = (grad * x).reshape(-1, *s.shape).sum(0) if needs[1] else None
    return gx, gs


SPEC = register(OpSpec(
    OP, REGISTRY, meta, validate, signature, make_inputs, default_impl,
    arguments=(Arg("input", dims=("*", "n", "f")), Arg("scale", dims=("n", "f"))),
    fake=fake, backward=backward, reference=reference,
    reduction_lengths=lambda args: {"scale": math.prod(args[0].shape[:-2])},
    cli=Cli("input [batch, n, f] * scale [n, f]", (
        Flag(("--groups", "-n"), "number of groups n", dim="n"),
        Flag(("--features",), "features per group", dim="f"),
        Flag(("--input-layout",), "contiguous, or a strided view", layout="input",
             choices=("contiguous", "strided")),
        Flag(("--grad",), "training: input and scale need gradients", grad=("input", "scale")),
    )),
))
grouped_scale = op_function(SPEC)
