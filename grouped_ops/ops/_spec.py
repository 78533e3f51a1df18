"""What the dispatcher needs to know about an op, in one place."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..registry import Registry
from ..signature import Signature


@dataclass(frozen=True)
class OpSpec:
    """An op as the dispatcher and the tuner see it.

    meta(*args) -> a hashable description of the arguments that fixes both their validity and their
        Signature (shapes, strides, dtypes, devices, grad flags), or None when the arguments are not
        even tensors of the right kind (then ``validate`` explains). A tuple whose last element
        is the grad flags (False, or one bool per argument): the compile path and jit tracing
        replace it.
    validate(*args) -> None, or raises GroupedOpsError with the op name and the shapes.
    signature(meta, bucketed) -> Signature.
    make_inputs(sig, generator) -> private arguments for timing, laid out as ``sig`` says.
    default_impl(sig) -> the documented rule used when nothing is cached and tuning is not allowed.
    grad_args(args) -> the tensors among ``args`` that gradients flow to, in the order of sig.grad.
    normalize(args, kwargs, who) -> the op's positional arguments from a call written as for the
        op (``prewarm``/``lookup`` take them that way); raises GroupedOpsError naming ``who``.
    """

    name: str
    registry: Registry
    meta: Callable[..., Hashable | None]
    validate: Callable[..., None]
    signature: Callable[[Any, bool], Signature]
    make_inputs: Callable[[Signature, torch.Generator], tuple[Any, ...]]
    default_impl: Callable[[Signature], str]
    grad_args: Callable[[Signature, tuple[Any, ...]], list[torch.Tensor]]
    normalize: Callable[[tuple[Any, ...], dict[str, Any], str], tuple[Any, ...]]
