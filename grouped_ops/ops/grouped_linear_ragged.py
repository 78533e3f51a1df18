"""grouped_linear_ragged: E linear layers over rows sorted by group, each group its own row count.

``input [T, in]`` x ``weight [E, out, in]`` (+ ``bias [E, out]``) with ``offsets [E]``, the
cumulative ends of the groups (as ``torch.nn.functional.grouped_mm`` takes them) -> ``[T, out]``:
row ``t`` of group ``g`` (``offsets[g-1] <= t < offsets[g]``, ``offsets[-1]`` read as 0) is
``F.linear(input[t], weight[g], bias[g])``. The mixture-of-experts case: tokens sorted by expert.

Decided here (docs/ragged.md says it for users):
- empty groups are allowed: no rows, and exactly zero weight and bias gradients;
- rows at or past ``offsets[E-1]`` (expert-parallel sentinel rows) belong to no group: their
  output is zero and their gradient is zero, never uninitialised memory;
- ``T = 0``, ``E = 1`` and ``E = 0`` (every row is past the last offset) are allowed;
- the offsets' values are checked on every call where that is free: offsets on the host (any
  CPU call, or host offsets given with a GPU input), or ``GROUPED_OPS_DEBUG=1``. Device-resident
  offsets of a GPU call are otherwise not read (reading them is a host sync); an implementation
  that needs them on the host (``loop``, ``padded_bmm``) reads and checks them anyway;
- the result is a fresh contiguous ``[T, out]`` tensor (the library's output contract), whichever
  implementation ran.

The public entry is ``grouped_ops.grouped_linear(input, weight, bias, offsets=... | group_sizes=...)``;
the op's own arguments are ``(input, weight, bias, offsets)``. Its implementations live in
:mod:`._ragged_impls`, (``grouped_mm``) :mod:`._ragged_grouped_mm` and (``gather_bmm``) :mod:`._ragged_gather`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..registry import Implementation, Registry
from ..signature import Signature, bucket
from . import _ragged_gather as gather
from . import _ragged_grouped_mm as gmm
from . import _ragged_impls as impls
from ._common import check_dtypes_devices, fail, is_contiguous, random_like, tensor_meta
from ._spec import Arg, Cli, Flag, OpSpec
from .grouped_linear import _grouped_mm_reasons, _weight_layout

OP = impls.OP
Tensor = torch.Tensor
OFFSET_DTYPES = (torch.int32, torch.int64)


# ---- the implementations, in preference order (ties in tuning go to the earlier one) --------------

def _syncs(sig: Signature) -> bool:
    # reads the offsets on the host: a device sync, and values a CUDA graph would bake in
    return True


def _few_groups(sig: Signature) -> list[str]:
    n = sig.dim("n")
    return [] if n <= DENSE_SELECT_MAX_GROUPS else \
        [f"n={n}: computes every group on every row ({n}x the arithmetic); for at most {DENSE_SELECT_MAX_GROUPS} groups"]


DENSE_SELECT_MAX_GROUPS = 8

REGISTRY = Registry(OP, [
    # torch's own rules (alignment, dtypes, the CUDA fast path) are the dense op's: written once there.
    # grouped_mm and loop run as a loop of differentiable ops under torch.func and forward-mode AD
    # (impls._composable_loop): their own autograd Functions are for plain eager autograd
    Implementation("grouped_mm", gmm.grouped_mm, dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                   check=_grouped_mm_reasons, prepare=gmm.prepare_grouped_mm),
    Implementation("padded_bmm", impls.padded_bmm, syncs=_syncs),
    Implementation("loop", impls.loop, syncs=_syncs, prepare=impls.prepare_loop),
    Implementation("gather_bmm", gather.gather_bmm, extra_memory=gather.gather_bytes, check=gather.gather_reasons,
                   prepare=gather.prepare_gather_bmm),
    Implementation("dense_select", impls.dense_select, check=_few_groups, work_factor=lambda sig: float(sig.dim("n")),
                   extra_memory=lambda sig: sig.dim("batch") * sig.dim("n") * sig.dim("out") * sig.dtype.itemsize),
], version=5)  # v2: prepared grouped_mm and loop, the loop concatenating small results, gather_bmm a
# candidate up to 1M T*out*in elements in bfloat16/float16; v3: gather_bmm gathers [E, in, out] storage as stored;
# v4: the loop computes a float32 group of 2-8 rows as w @ x^T (_ragged_impls._column_rows), gather_bmm prepared;
# v5: padded_bmm pads up to 4x the rows in bfloat16/float16 on the CPU (_ragged_impls.PAD_LIMIT_LOW_PRECISION_CPU)
# and trains through the dense op's bmm Function (the weight's gradient in its own layout); dense_select
# multiplies [E, in, out] storage as stored


# ---- the public call's offsets ---------------------------------------------------------------------

def offsets_from(input: Any, weight: Any, bias: Any, offsets: Any, group_sizes: Any) -> Tensor:
    """The op's ``offsets`` from a public call's ``offsets=`` or ``group_sizes=`` (exactly one given).

    ``group_sizes`` (counts, a 1-D integer tensor or a sequence of ints) becomes its cumulative
    sum, in its own dtype and on its own device (a sequence becomes an int64 host tensor).

    Raises:
        GroupedOpsError: both given, offsets that are not a tensor, or group_sizes that are not
            integers, not one per group, or (checked where they are on the host) negative or
            adding up to more rows than the input has; naming the op, the argument and the shapes.
    """
    if group_sizes is None:  # (the common call: offsets given; the op checks them)
        if offsets is not None and not isinstance(offsets, Tensor):
            raise fail(OP, f"offsets must be a 1-D integer tensor, got {type(offsets).__name__}: pass "
                           "torch.tensor(offsets), or the counts as group_sizes= (a list of ints is fine there)",
                       input=input, weight=weight, bias=bias)
        return offsets
    shapes = {"input": input, "weight": weight, "bias": bias, "offsets": offsets, "group_sizes": group_sizes}
    if offsets is not None:
        raise fail(OP, "give offsets (cumulative ends) or group_sizes (counts), not both", **shapes)
    if isinstance(group_sizes, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in group_sizes):
            raise fail(OP, f"group_sizes must be ints, got {[type(v).__name__ for v in group_sizes][:4]}", **shapes)
        group_sizes = shapes["group_sizes"] = torch.tensor(group_sizes, dtype=torch.int64)
    if not isinstance(group_sizes, Tensor):
        raise fail(OP, f"group_sizes must be a 1-D integer tensor or a list of ints, got "
                       f"{type(group_sizes).__name__}", **shapes)
    _check_offsets_kind("group_sizes", group_sizes, input, shapes)
    if isinstance(weight, Tensor) and weight.dim() == 3 and group_sizes.shape[0] != weight.shape[0]:
        raise fail(OP, f"group_sizes must have one entry per group: {weight.shape[0]} (weight's E), got "
                       f"{group_sizes.shape[0]}", **shapes)
    if group_sizes.device.type == "cpu" and not torch.compiler.is_compiling() and type(group_sizes) is Tensor:
        sizes = group_sizes.tolist()  # (free on the host: the refusals name group_sizes, not the offsets made)
        negative = [g for g, n in enumerate(sizes) if n < 0]
        if negative:
            raise fail(OP, f"group_sizes must be >= 0; group_sizes[{negative[0]}]={sizes[negative[0]]}", **shapes)
        if isinstance(input, Tensor) and input.dim() == 2 and sum(sizes) > input.shape[0]:
            raise fail(OP, f"group_sizes add up to {sum(sizes)} rows, past the input's {input.shape[0]}", **shapes)
    return group_sizes.cumsum(0, dtype=group_sizes.dtype)


def _check_offsets_kind(name: str, t: Any, input: Any, shapes: dict[str, Any]) -> None:
    if not isinstance(t, Tensor):
        raise fail(OP, f"{name} must be a 1-D integer tensor, got {type(t).__name__}", **shapes)
    if t.dtype not in OFFSET_DTYPES:
        raise fail(OP, f"{name} must be int32 or int64, got {str(t.dtype).removeprefix('torch.')}; offsets are "
                       "row counts (cast with .int() or .long())", **shapes)
    if t.dim() != 1:
        raise fail(OP, f"{name} must be 1-D [E], got {t.dim()}-D", **shapes)
    if isinstance(input, Tensor) and t.device != input.device and t.device.type != "cpu":
        raise fail(OP, f"{name} must be on the input's device ({input.device}) or on the host, got {t.device}",
                   **shapes)


# ---- validation, signature, private inputs ---------------------------------------------------------

def meta(input: Any, weight: Any, bias: Any, offsets: Any) -> tuple[Any, ...] | None:
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor) and isinstance(offsets, Tensor)):
        return None
    if bias is None:
        b_meta: Any = None
        b_grad = False
    elif isinstance(bias, Tensor):
        b_meta, b_grad = (bias.shape, bias.dtype, bias.device), bias.requires_grad
    else:
        return None
    compiling = torch.compiler.is_compiling()
    grad = torch.is_grad_enabled() and (input.requires_grad, weight.requires_grad, b_grad, False)
    return (tensor_meta(input), tensor_meta(weight), b_meta, *offsets_meta(input, offsets, compiling), grad)


def offsets_meta(input: Tensor, offsets: Tensor, compiling: bool) -> tuple[Any, ...]:
    """What :func:`meta` describes of a call beyond its tensors' metadata and grad flags (the lean
    road's key holds it too: ``functional.ragged_grouped_linear``)."""
    # Capturing a CUDA graph is part of the description: auto then considers only the
    # implementations that need no host sync (dispatch excludes the others while capturing).
    # (Not while dynamo traces this: the compiled call's custom op describes it again when it runs.)
    capturing = input.is_cuda and not compiling and torch.cuda.is_current_stream_capturing()
    # The split's class, where its values are on the host (free to read): it changes the winner on
    # CPU (docs/benchmarks/ragged.md). Device offsets are not read (a sync): "unread".
    if offsets.is_cpu and type(offsets) is Tensor and offsets.dim() == 1 and not compiling:
        split = split_class(offsets.tolist())
    else:
        split = "unread"
    return (offsets.shape, offsets.dtype, offsets.device), capturing, split


def split_class(values: list[int]) -> str:
    """The coarse class of a split, from its cumulative ends: ``one`` (one group has 90% of the
    grouped rows or more), ``skewed`` (the largest group has over twice the mean and over a third
    of the rows), or ``balanced``. (Twice the mean alone made most random splits of a few rows per
    group skewed, e.g. 256 rows over 64 groups, largest 11: the tuner then timed a split with 3/4
    of the rows in one group, and picked for it: 2.5x slower than the fastest on the real split.)"""
    end = values[-1] if values else 0
    if len(values) < 2 or end <= 0:
        return "balanced"
    largest = max(map(operator.sub, values, [0, *values]))  # in C: this runs on every call
    if largest * 10 >= end * 9:
        return "one"
    return "skewed" if largest * len(values) > 2 * end and largest * 3 > end else "balanced"


def _refuse_quantized(weight: Tensor, shapes: dict[str, Any]) -> None:
    low = weight.is_quantized or weight.dtype in _FP8
    # a quantizing tensor subclass (torchao's) may report its original float dtype: known by its name
    kind = "" if low or torch.compiler.is_compiling() else type(weight).__name__
    if low or "Quantized" in kind or "Float8" in kind:
        what = kind or str(weight.dtype).removeprefix("torch.")
        raise fail(OP, f"weight is quantized or FP8 ({what}): no implementation computes in it; dequantize "
                       "the expert weights first (weight.dequantize(), or .to(torch.bfloat16))", **shapes)


_FP8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                             "float8_e8m0fnu") if hasattr(torch, n))


def validate(input: Any, weight: Any, bias: Any, offsets: Any) -> None:
    shapes = {"input": input, "weight": weight, "bias": bias, "offsets": offsets}
    for name, value in shapes.items():
        if not (isinstance(value, Tensor) or (name == "bias" and value is None)):
            raise fail(OP, f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if input.dim() != 2:
        raise fail(OP, "input must be 2-D [T, in]: rows sorted by group", **shapes)
    if weight.dim() != 3:
        raise fail(OP, "weight must be 3-D [E, out, in] (nn.Linear's layout per group)", **shapes)
    _refuse_quantized(weight, shapes)
    groups, out, inn = weight.shape
    if input.shape[1] != inn:
        hint = ""
        if input.shape[1] == out:
            hint = (f"; a weight W stored [E, in, out] = [{groups}, {out}, {inn}] is passed as W.transpose(1, 2) "
                    "(a view, no copy)")
        raise fail(OP, f"weight takes {inn} input features per group but input has {input.shape[1]}{hint}", **shapes)
    if bias is not None and tuple(bias.shape) != (groups, out):
        raise fail(OP, f"bias must have shape ({groups}, {out}) [E, out]", **shapes)
    _check_offsets_kind("offsets", offsets, input, shapes)
    if offsets.shape[0] != groups:
        raise fail(OP, f"offsets must have one entry per group: {groups} (weight's E), got {offsets.shape[0]}",
                   **shapes)
    named = {"input": input, "weight": weight} | ({} if bias is None else {"bias": bias})
    check_dtypes_devices(OP, named, shapes)
    # free on the host; traced and fake offsets have no values to read
    if not torch.compiler.is_compiling() and (offsets.device.type == "cpu" or impls.debug_mode()) and \
            type(offsets) is Tensor and input.device.type != "meta":
        impls.check_values(input, weight, bias, offsets, offsets.tolist())


def signature(m: tuple[Any, ...], bucketed: bool = True) -> Signature:
    (x_shape, x_stride, dtype, device), (w_shape, w_stride, _, _), b_meta, (_, _, o_device), _, split, grad = m
    groups, out, inn = (int(v) for v in w_shape)
    rows = int(x_shape[0])
    names = [name for name, g in zip(("input", "weight", "bias"), grad or (), strict=False) if g]
    host = o_device.type == "cpu" or device.type == "cpu"
    return Signature(
        op=OP,
        dims=(("batch", bucket(rows) if bucketed else rows), ("n", groups), ("in", inn), ("out", out)),
        dtype=dtype,
        device=device,
        layout=(("input", "contiguous" if is_contiguous(x_shape, x_stride) else "strided"),
                ("weight", _weight_layout(w_shape, w_stride)),
                ("bias", "no" if b_meta is None else "yes"),
                ("offsets", "host" if host else "device"), ("split", split)),
        grad=tuple(names),
    )


def split_offsets(rows: int, groups: int, split: str) -> Tensor:
    """int32 offsets of the class ``split``: ``balanced`` (and ``unread``) :func:`balanced_offsets`;
    ``skewed``: group 0 takes three quarters of the rows, the rest split as balanced; ``one``:
    every row in the middle group."""
    if split in ("balanced", "unread") or groups <= 1:
        return balanced_offsets(rows, groups)
    if split == "one":
        sizes = torch.zeros(groups, dtype=torch.int64)
        sizes[groups // 2] = rows
        return sizes.cumsum(0).to(torch.int32)
    big = rows * 3 // 4
    return torch.cat([torch.tensor([big]), balanced_offsets(rows - big, groups - 1).long() + big]).to(torch.int32)


def balanced_offsets(rows: int, groups: int, seed: int = 0) -> Tensor:
    """int32 ``[E]``: the cumulative ends of a fixed-seed random split of ``rows`` over ``groups``
    (every row routed to a uniformly drawn group: balanced on average, as a trained router aims).
    The tuner times on these, never on a caller's own offsets."""
    if groups == 0:
        return torch.zeros(0, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(groups, (rows,), generator=g), minlength=groups)
    return counts.cumsum(0).to(torch.int32)


def make_inputs(sig: Signature, generator: torch.Generator) -> tuple[Any, ...]:
    rows, groups, inn, out = (sig.dim(k) for k in ("batch", "n", "in", "out"))
    dt, dev = sig.dtype, sig.device
    if sig.layout_of("input") == "contiguous":
        x = random_like((rows, inn), dt, dev, generator)
    else:  # a transposed view, as of a [in, T] activation
        x = random_like((inn, rows), dt, dev, generator).t()
    layout = sig.layout_of("weight")
    scale = 1.0 / max(inn, 1) ** 0.5
    if layout == "contiguous":
        w = random_like((groups, out, inn), dt, dev, generator) * scale
    elif layout == "transposed":  # PyG / GPT-OSS store [E, in, out]
        w = (random_like((groups, inn, out), dt, dev, generator) * scale).transpose(1, 2)
    elif layout == "shared":
        w = (random_like((1, out, inn), dt, dev, generator) * scale).expand(groups, out, inn)
    elif layout == "chunked":  # one half of a fused gate/up [E, 2*out, in] weight
        w = (random_like((groups, 2 * out, inn), dt, dev, generator) * scale)[:, :out]
    else:
        w = (random_like((groups, out, 2 * inn), dt, dev, generator) * scale)[..., ::2]
    b = random_like((groups, out), dt, dev, generator) if sig.layout_of("bias") == "yes" else None
    offsets = split_offsets(rows, groups, sig.layout_of("split"))
    offsets = offsets.to("cpu" if sig.layout_of("offsets") == "host" else dev)  # (also beside meta stand-ins)
    for name, t in (("input", x), ("weight", w), ("bias", b)):
        if t is not None and name in sig.grad:
            t.requires_grad_(True)
    return (x, w, b, offsets)


def default_impl(sig: Signature) -> str:
    # torch's grouped GEMM where it runs this signature (no host sync, one call); else the loop of
    # one matmul per group, which runs everything. (Under CUDA-graph capture dispatch passes over
    # the loop to the first sync-free implementation of REGISTRY that supports the signature.)
    return "grouped_mm" if REGISTRY["grouped_mm"].supports(sig) else "loop"


# ---- the definition, the custom op's fake and backward, what tests and the CLI need ----------------

def reference(input: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor) -> Tensor:
    """The definition: one ``F.linear`` per group over its rows, zero rows past the last offset.
    Computes in the arguments' dtype; reads the offsets on the host."""
    values = offsets.tolist()
    pieces, start = [], 0
    for g, end in enumerate(values):
        pieces.append(torch.nn.functional.linear(input[start:end], weight[g], None if bias is None else bias[g]))
        start = end
    # rows of no group: zero (a sum over none of the weight's elements keeps E = 0 in the graph)
    tail = input[start:] @ input.new_zeros(input.shape[1], weight.shape[1]) + weight[:0].sum()
    pieces.append(tail if bias is None else tail + bias[:0].sum())
    return torch.cat(pieces)


def fake(input: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor) -> Tensor:
    return input.new_empty(input.shape[0], weight.shape[1])


@torch.library.custom_op(f"grouped_ops::{OP}_weight_grad", mutates_args=())
def _weight_grad(grad: Tensor, input: Tensor, weight: Tensor, offsets: Tensor, bias: bool) -> list[Tensor]:
    """The weight (and bias) gradients, opaque to torch.compile like the op (data-dependent sizes)."""
    gw, gb = impls.weight_grads(grad, input, weight, offsets, True, bias)
    assert gw is not None
    return [gw.contiguous(), gb if gb is not None else grad.new_zeros(0)]


@_weight_grad.register_fake
def _(grad: Tensor, input: Tensor, weight: Tensor, offsets: Tensor, bias: bool) -> list[Tensor]:
    return [grad.new_empty(weight.shape), grad.new_empty(weight.shape[:2] if bias else (0,))]


def backward(args: tuple[Any, ...], needs: tuple[bool, ...], grad: Tensor, again: Any) -> tuple[Any, ...]:
    x, w, b, offsets = args
    gx = again(grad, w.transpose(1, 2), None, offsets) if needs[0] else None  # the op itself, transposed
    gw = gb = None
    if needs[1] or (needs[2] and b is not None):
        gw, gb = _weight_grad(grad, x, w, offsets, b is not None)
    return gx, gw if needs[1] else None, gb if needs[2] and b is not None else None, None


def reduction_lengths(args: tuple[Any, ...]) -> dict[str, int]:
    x, w, b, _ = args
    rows = x.shape[0]
    return {"forward": w.shape[2] + (b is not None), "input": w.shape[1], "weight": rows, "bias": rows}


ARGUMENTS = (Arg("input"), Arg("weight"), Arg("bias", optional=True), Arg("offsets"))  # no dims: see testing
CLI = Cli("input [T, in] sorted by group, offsets [E] -> [T, out] (--batch is T)", (
    Flag(("--groups", "-n"), "number of groups (experts) E", dim="n"),
    Flag(("--in",), "input features", dim="in"),
    Flag(("--out",), "output features", dim="out"),
    Flag(("--no-bias",), "bias=None", layout="bias", switch=("yes", "no")),
    Flag(("--weight-layout",), "contiguous [E, out, in]; transposed: W.transpose(1, 2) of an [E, in, out] "
         "tensor (PyG, GPT-OSS); chunked; shared; strided", layout="weight",
         choices=("contiguous", "transposed", "chunked", "shared", "strided")),
    Flag(("--input-layout",), "contiguous [T, in]; strided: a transposed view", layout="input",
         choices=("contiguous", "strided")),
    Flag(("--offsets",), "where the offsets live: host (a CPU call's always), or on a GPU device (the input's; "
         "give this for a GPU signature whose offsets are on the GPU)", layout="offsets", choices=("host", "device")),
    Flag(("--split",), "the split's class: balanced; skewed (the largest group over twice the mean and a third of the rows); one (one "
         "group with 90%% of the rows); unread (offsets on a GPU: not read)", layout="split",
         choices=("balanced", "skewed", "one", "unread")),
    Flag(("--grad",), "training: weight and bias need gradients", grad=("weight", "bias")),
    Flag(("--grad-input",), "training: the input needs a gradient too", grad=("input",)),
))
SPEC = OpSpec(OP, REGISTRY, meta, validate, signature, make_inputs, default_impl, arguments=ARGUMENTS,
              fake=fake, backward=backward, reference=reference, reduction_lengths=reduction_lengths, cli=CLI)
