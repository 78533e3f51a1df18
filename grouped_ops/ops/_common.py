"""Helpers shared by the op modules: error text and argument descriptions."""

from __future__ import annotations

from typing import Any

import torch

from .._errors import GroupedOpsError


def shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(shape_of(t) for t in x) + "]"
    return type(x).__name__


def fail(op: str, message: str, **args: Any) -> GroupedOpsError:
    shapes = ", ".join(f"{name}.shape={shape_of(value)}" for name, value in args.items() if value is not None)
    return GroupedOpsError(f"{op}: {message}" + (f" ({shapes})" if shapes else ""))


def tensor_meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.shape, t.stride(), t.dtype, t.device)


def check_dtypes_devices(op: str, named: dict[str, torch.Tensor], shapes: dict[str, Any]) -> None:
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}={str(d).removeprefix('torch.')}" for n, d in dtypes.items())
        raise fail(op, f"arguments must share one dtype, got {listed}; cast them first", **shapes)
    dtype = next(iter(dtypes.values()))
    if not dtype.is_floating_point:
        raise fail(op, f"dtype {str(dtype).removeprefix('torch.')} is not supported; use a floating-point dtype", **shapes)
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n}={d}" for n, d in devices.items())
        raise fail(op, f"arguments must be on one device, got {listed}", **shapes)


def may_write_into(*tensors: torch.Tensor) -> bool:
    """Whether an implementation may write its result into a fresh buffer with ``out=``: no autograd
    graph to record for these tensors and no torch.func transform (neither takes ``out=``).

    Writing ``[..., n, out]`` results straight into their own buffer keeps the output contract
    (a fresh tensor, not a view of an intermediate) without the ~4 us re-label that a reshaped
    matmul result needs (measured: ``aten._unsafe_view`` from Python, 2-core CPU).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not torch._C._are_functorch_transforms_active()


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``Tensor.is_contiguous()`` from a shape and strides (dims of size 1 may have any stride)."""
    if 0 in shape:  # as torch says: an empty tensor is contiguous whatever its strides
        return True
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=False):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def random_like(shape: tuple[int, ...], sig_dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, dtype=sig_dtype, device=device, generator=generator)
