"""What the rest of the library may know about an op, in one place."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch

from ..registry import Registry
from ..signature import Signature
from ._common import grad_tensors, normalize_call


@dataclass(frozen=True)
class Arg:
    """One argument of an op, for what is generic about calling it: normalising a call, the custom
    op's schema, naming tensors in messages, the testing strategies.

    name: as in the op's signature.
    optional: may be None, and is None when not given (trailing arguments only).
    many: a tensor or a sequence of tensors (a list is taken as a tuple); the custom op takes it as a
        ``Tensor[]`` plus a ``bool stacked`` (``bool <name>_stacked`` when an op has several).
    dims: for the testing strategies, the tensor's dims by name. A name is one size per draw, shared
        by every argument that names it; ``"*"`` is any number of dims, the same for every argument.
        Empty: the strategies cannot draw this op.
    scale: values are scaled by 1/sqrt(the size of this dim), as a weight by its fan-in.
    perm: the permutation a ``transposed`` layout stores the tensor in (None: drawn; also where
        ``dims`` has ``"*"``).
    """

    name: str
    optional: bool = False
    many: bool = False
    dims: tuple[str, ...] = ()
    scale: str | None = None
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Flag:
    """A flag of the op's command-line sub-command (``prewarm``, ``explain``) and what it sets in
    the signature the command describes: a dim (a positive int, or what ``type`` parses), a layout
    entry (one of ``choices``, the first by default; or as a switch: ``switch[1]`` when given, else
    ``switch[0]``), or, as a switch, that the arguments named in ``grad`` need gradients."""

    names: tuple[str, ...]
    help: str
    dim: str | None = None
    type: Callable[[str], int] | None = None
    layout: str | None = None
    choices: tuple[str, ...] = ()
    switch: tuple[str, str] | None = None
    grad: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments (prefixed: never one of the commands' own)."""
        long = next(n for n in self.names if n.startswith("--"))
        return "op_" + long.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class Cli:
    """An op's sub-command: its one-line help and its flags (``--batch``, ``--dtype`` and
    ``--device`` are every op's). The command builds the signature from the flags, the op's
    ``make_inputs`` makes shape-only arguments for it, and the op describes those as a call would."""

    help: str
    flags: tuple[Flag, ...]


class Bytes(NamedTuple):
    """Bytes a call holds besides workspace. ``operands``: the arguments as ``make_inputs`` lays them
    out (whole storages: a chunked weight's other half included); ``result``: the output;
    ``grads``: the gradients of the arguments that need them (their own sizes; 0 for inference)."""

    operands: int
    result: int
    grads: int


@dataclass(frozen=True)
class OpSpec:
    """An op as the dispatcher, the tuner, torch.compile, the CLI and the testing helpers see it.

    meta(*args) -> a hashable description of the arguments that fixes both their validity and their
        Signature (shapes, strides, dtypes, devices, grad flags), or None when the arguments are not
        even tensors of the right kind (then ``validate`` explains). A tuple whose last element
        is the grad flags (False, or one bool per argument): the compile path and jit tracing
        replace it.
    validate(*args) -> None, or raises GroupedOpsError with the op name and the shapes.
    signature(meta, bucketed) -> Signature. Its dims include ``batch`` (the size that is bucketed).
    make_inputs(sig, generator) -> private arguments for timing, laid out as ``sig`` says (also on
        the meta device: the CLI and the compile path describe such stand-ins).
    default_impl(sig) -> the documented rule used when nothing is cached and tuning is not allowed.
    grad_args(sig, args) -> the tensors among ``args`` that gradients flow to (default: from
        ``arguments``, in their order).
    normalize(args, kwargs, who) -> the op's positional arguments from a call written as for the
        op (``prewarm``/``lookup`` take them that way); raises GroupedOpsError naming ``who``
        (default: from ``arguments``).
    arguments: the op's arguments (:class:`Arg`), in order.
    fake(*args) -> an empty tensor shaped as the output: the custom op's fake (meta) kernel.
    backward(args, needs, grad, again) -> one gradient per argument (None where not needed; a tuple
        for a sequence argument given as one), written with torch ops; ``needs`` has one bool per
        argument, ``again(*args)`` runs this op's custom op (for gradients that are the op itself).
    reference(*args) -> the definition, differentiable, in the arguments' dtype (the testing
        helpers run it in float64).
    reduction_lengths(args) -> how many products each result sums, by ``"forward"`` or argument
        name (default 1): it scales the testing tolerance.
    cli: the op's command-line sub-command, or None for none.
    call_bytes(sig) -> :class:`Bytes`: what a call of ``sig`` holds besides an implementation's workspace,
        by arithmetic on the signature (the tuner's memory bounds; nothing is allocated). None: the
        tuner sizes ``make_inputs`` on the meta device instead (slower: that loads torch._dynamo).
    """

    name: str
    registry: Registry
    meta: Callable[..., Hashable | None]
    validate: Callable[..., None]
    signature: Callable[[Any, bool], Signature]
    make_inputs: Callable[[Signature, torch.Generator], tuple[Any, ...]]
    default_impl: Callable[[Signature], str]
    grad_args: Callable[[Signature, tuple[Any, ...]], list[torch.Tensor]] = None  # type: ignore[assignment]
    normalize: Callable[[tuple[Any, ...], dict[str, Any], str], tuple[Any, ...]] = None  # type: ignore[assignment]
    arguments: tuple[Arg, ...] = ()
    fake: Callable[..., torch.Tensor] | None = None
    backward: Callable[..., tuple[Any, ...]] | None = None
    reference: Callable[..., torch.Tensor] | None = None
    reduction_lengths: Callable[[tuple[Any, ...]], dict[str, int]] | None = None
    cli: Cli | None = None
    call_bytes: Callable[[Signature], Bytes] | None = None

    def __post_init__(self) -> None:
        # Defaults made from ``arguments``, made again by dataclasses.replace (a renamed copy must
        # not report errors under the old name)
        if self.grad_args is None or _made_by(self.grad_args, grad_tensors):
            object.__setattr__(self, "grad_args", partial(grad_tensors, self.arguments))
        if self.normalize is None or _made_by(self.normalize, normalize_call):
            object.__setattr__(self, "normalize", partial(normalize_call, self.name, self.arguments))


def _made_by(fn: Any, maker: Callable[..., Any]) -> bool:
    return isinstance(fn, partial) and fn.func is maker
