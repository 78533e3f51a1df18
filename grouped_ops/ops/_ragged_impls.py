"""grouped_linear_ragged's implementations but ``grouped_mm`` (in :mod:`._ragged_grouped_mm`) and
``gather_bmm`` (in :mod:`._ragged_gather`), and the per-call check of the offsets' values they share.

Each is a plain function ``fn(input [T, in], weight [E, out, in], bias [E, out] | None, offsets [E])
-> [T, out]`` over structurally validated arguments. Each first calls :func:`ends`, which checks
the offsets' values on every call where that costs no host sync (see the op module), and returns
them as a host list where they are on the host or the implementation needs them there.

The contract they share: row ``t`` of group ``g`` (``offsets[g-1] <= t < offsets[g]``, with
``offsets[-1]`` read as 0) is ``F.linear(input[t], weight[g], bias[g])``; rows at or past
``offsets[E-1]`` belong to no group and are zero, with zero gradient; a group with no rows gets
exactly zero weight and bias gradients.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import contiguous_strides
from . import _huge_pages
from ._bmm_linear import _BmmLinear3d
from ._common import apply_function, direct_apply, fail, plain_eager, plain_tensors

OP = "grouped_linear_ragged"
Tensor = torch.Tensor

#: Reads device-resident offsets on the host to check them (a sync) when set to 1.
DEBUG_ENV = "GROUPED_OPS_DEBUG"


# ---- the offsets' values ---------------------------------------------------------------------------

def debug_mode() -> bool:
    """``GROUPED_OPS_DEBUG=1``: check device-resident offsets too (each call then syncs)."""
    return os.environ.get(DEBUG_ENV, "") == "1"


def check_values(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor, values: list[int]) -> None:
    """Refuse offsets whose values do not describe groups of ``x``'s rows, naming the first bad one."""
    rows = x.shape[0]
    if not values or (values[0] >= 0 and values[-1] <= rows and values == sorted(values)):
        return  # the common case, in C: ~0.3 us for 64 groups
    shapes = {"input": x, "weight": w, "bias": b, "offsets": offsets}
    previous = 0
    for g, end in enumerate(values):
        if end < previous:
            what = f"offsets[{g}]={end} is negative" if g == 0 else \
                f"offsets[{g}]={end} < offsets[{g - 1}]={previous}"
            raise fail(OP, f"offsets must be non-decreasing cumulative ends (group g's rows are "
                           f"offsets[g-1] <= t < offsets[g]); {what}", **shapes)
        previous = end
    raise fail(OP, f"the last offset, offsets[{len(values) - 1}]={previous}, is past the input's "
                   f"{rows} rows", **shapes)


def ends(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor, need: bool) -> list[int] | None:
    """The offsets as a checked host list where they are on the host, ``need`` asks for them (a
    sync on a GPU) or the debug mode is on; else None (nothing read, nothing checked)."""
    on_host = offsets.device.type == "cpu"
    if x.is_meta or offsets.is_meta:
        # Also what keeps torch.compile from inlining an implementation (its trace-time probe runs
        # them on meta tensors): the op stays opaque there, its custom op runs it on real tensors.
        raise fail(OP, "runs on real tensors only: its implementations read or index with the offsets' "
                       "values", input=x, offsets=offsets)
    if on_host or need or debug_mode():
        values = offsets.tolist()
        check_values(x, w, b, offsets, values)
        return values
    return None


def _sizes(values: list[int]) -> list[int]:
    return [end - start for start, end in zip([0, *values], values, strict=False)]


def _group_ids(offsets: Tensor, rows: int, row_index: Tensor | None = None) -> Tensor:
    """``[T]``: each row's group, ``E`` for rows past the last offset; no host sync. ``row_index``:
    ``arange(T)`` in the offsets' dtype and device, where the caller keeps one (~4 us to make)."""
    if row_index is None:
        row_index = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, row_index, right=True)


def _on(offsets: Tensor, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The offsets on ``x``'s device (host offsets of a GPU input are copied there)."""
    return offsets.to(device=x.device, dtype=dtype or offsets.dtype, non_blocking=True)


def _like_weight(w: Tensor) -> Tensor:
    """An empty tensor shaped and strided as ``w`` where ``w`` is dense (its contiguous or
    transposed storage), else contiguous: AccumulateGrad then keeps a gradient written there. Huge
    pages where it is a fresh mapping (:mod:`._huge_pages`)."""
    dense = w.is_contiguous() or w.transpose(1, 2).is_contiguous()
    stride = w.stride() if dense else contiguous_strides(tuple(w.shape))
    return _huge_pages.empty_strided(w.shape, stride, w.dtype, w.device)


def _stored_in_out(w: Tensor) -> bool:
    """Whether ``w [E, out, in]`` is a transposed view of a dense ``[E, in, out]`` tensor (GPT-OSS and
    PyG store their experts so), which gather_bmm and dense_select multiply as it is stored."""
    return not w.is_contiguous() and w.transpose(1, 2).is_contiguous()


# ---- loop ------------------------------------------------------------------------------------------

#: Up to this many result elements the loop concatenates its groups' products (F.linear each) rather
#: than writing them into the result (``out=``): measured on CPU, one thread, 8 groups of 2 rows
#: 64->64: 52 -> 44 us (``out=`` costs ~1 us a call more); 64 groups at T=256: 537 -> 470 us; level at
#: T=4096 (the concatenation's copy, and its memory, then weigh as much).
CAT_LIMIT = 1 << 18


def _loop_forward(x: Tensor, w: Tensor, b: Tensor | None, values: list[int]) -> Tensor:
    rows = x.shape[0]
    if rows * w.shape[1] <= CAT_LIMIT:
        y = _concatenated(x, w, b, values, w.shape[1], _column_rows(x, w))
        return x.new_zeros(rows, w.shape[1]) if y is None else y
    y = x.new_empty(rows, w.shape[1])
    column, start = _column_rows(x, w), 0
    for g, end in enumerate(values):
        if end - start in column:
            y[start:end].copy_(_column_product(x[start:end], w[g], None if b is None else b[g]))
        elif end > start:  # each group's product written into its rows of the result (out=)
            if b is None:
                torch.mm(x[start:end], w[g].t(), out=y[start:end])
            else:
                torch.addmm(b[g], x[start:end], w[g].t(), out=y[start:end])
        start = end
    if start < x.shape[0]:
        y[start:].zero_()
    return y


def _loop_weight_grads(gy: Tensor, x: Tensor, w: Tensor, values: list[int], need_w: bool,
                       need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """Per-group ``gy_g^T @ x_g`` and ``sum(gy_g)``; the groups with no rows cost one fill at most."""
    starts = [0, *values[:-1]]
    empty = [g for g, (start, end) in enumerate(zip(starts, values, strict=True)) if end <= start]
    gw = _zeroed(_like_weight(w), empty) if need_w else None
    gb = _zeroed(gy.new_empty(w.shape[0], w.shape[1]), empty) if need_b else None
    for g, (start, end) in enumerate(zip(starts, values, strict=True)):
        if end > start:
            if gw is not None:
                torch.mm(gy[start:end].t(), x[start:end], out=gw[g])
            if gb is not None:
                torch.sum(gy[start:end], 0, out=gb[g])
    return gw, gb


def _zeroed(t: Tensor, empty: list[int]) -> Tensor:
    """``t`` (fresh) with the slices ``t[g]`` of the groups in ``empty`` zeroed, the others left for
    the caller to write: at most one fill of ``t``. The whole tensor at once where many are empty,
    else slice by slice (a memset each); never ``index_fill_``, whose CPU kernel was measured at
    18 ms for what a memset does in 0.3 ms ([64, 256, 512] bfloat16)."""
    if len(empty) * 4 > t.shape[0]:
        return t.zero_()
    for g in empty:
        t[g].zero_()
    return t


class _LoopLinear(torch.autograd.Function):
    """loop's forward and backward: one matmul per group with rows, written into the result."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, values: list[int]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.values, ctx.has_bias = values, b is not None
        return _loop_forward(x, w, b, values)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        values = ctx.values
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiable gradients (a second backward)
            return (*_differentiable_grads(gy, x, w, values, need_x, need_w, need_b and ctx.has_bias), None)
        gx = _loop_forward(gy, w.transpose(1, 2), None, values) if need_x else None
        gw, gb = _loop_weight_grads(gy, x, w, values, need_w, need_b and ctx.has_bias)
        return gx, gw, gb, None


def _differentiable_grads(gy: Tensor, x: Tensor, w: Tensor, values: list[int], need_x: bool, need_w: bool,
                          need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    gx = apply_function(_LoopLinear, gy, w.transpose(1, 2), None, values) if need_x else None
    starts = [0, *values[:-1]]
    gw = torch.stack([gy[s:e].t() @ x[s:e] for s, e in zip(starts, values, strict=True)]) if need_w else None
    gb = torch.stack([gy[s:e].sum(0) for s, e in zip(starts, values, strict=True)]) if need_b else None
    return gx, gw, gb


def _recording(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether autograd records this call (else the forward runs without a Function's ~10 us). Not
    in inference mode, even with grad enabled: nothing is recorded there, and a Function that
    saves a tensor made there fails."""
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)) \
        and not torch.is_inference_mode_enabled()


def loop(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
    values = ends(x, w, b, offsets, need=True)
    assert values is not None
    if w.shape[0] == 0:  # no groups: every row is past the last offset
        return _empty_groups(x, w, b)
    if not plain_eager(x, w, b):
        return _composable_loop(x, w, b, values)
    if _recording(x, w, b):
        return _recorded_loop(x, w, b, values, _apply_loop)
    return _loop_forward(x, w, b, values)


def _recorded_loop(x: Tensor, w: Tensor, b: Tensor | None, values: list[int], apply: Any) -> Tensor:
    """loop where autograd records it: ``apply(x, w, b, values)`` of :class:`_LoopLinear`, or, where
    one group holds every row, autograd's own graph of that group's ``F.linear`` (see :func:`_only_group`)."""
    g = _only_group(values, x.shape[0])
    if g is not None:
        return F.linear(x, w[g], None if b is None else b[g])
    return apply(x, w, b, values)


_apply_loop = partial(apply_function, _LoopLinear)


def _composable_loop(x: Tensor, w: Tensor, b: Tensor | None, values: list[int]) -> Tensor:
    """The loop of differentiable ops only (no ``out=``, no Function of its own), for the contexts
    that take neither: torch.func transforms, forward-mode AD, tracing, tensor subclasses. The
    weight is unbound once, so autograd stacks its groups' gradients in one node (zeros for the
    groups with no rows), not one full-size zero tensor per group."""
    y = _concatenated(x, w.unbind(0), None if b is None else b.unbind(0), values, w.shape[1], _column_rows(x, w))
    return _empty_groups(x, w, b) if y is None else y  # (no row in any group: still in the graph)


def _concatenated(x: Tensor, weights: Any, biases: Any, values: list[int], out: int,
                  column: range) -> Tensor | None:
    """The products ``F.linear(x[rows of g], weights[g], biases[g])`` of the groups with rows and
    zero rows past the last offset, concatenated; None where no group has a row. ``weights`` and
    ``biases`` are indexed by group: the tensors, or their unbound slices. A group whose row count
    is in ``column`` (:func:`_column_rows`) runs as :func:`_column_product`."""
    pieces, start = [], 0
    for g, end in enumerate(values):
        if end > start:
            product = _column_product if end - start in column else F.linear
            pieces.append(product(x[start:end], weights[g], None if biases is None else biases[g]))
        start = end
    if not pieces:
        return None
    if start < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - start, out))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()  # a column product is a view


def _column_product(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` for one group's rows as ``(w @ x^T)^T`` (a transposed view)."""
    return (w @ x.t() if b is None else torch.addmm(b.unsqueeze(1), w, x.t())).t()


#: No group runs in the column form.
_NO_ROWS = range(0)


def _column_rows(x: Tensor, w: Tensor) -> range:
    """The row counts for which a group's product is faster as ``w @ x^T`` in this call (decided
    once a call, read per group): float32 on the CPU, each ``w [E, out, in]`` group stored row by
    row, a few rows. CPU BLAS runs ``x @ w^T`` for 2 to 8 rows as a GEMM that
    streams the weight slowly; ``w @ x^T`` reads it once, as a GEMV does for one row. Measured
    (MKL, AMD EPYC, one thread, weights out of cache, ``scripts/column_form.py``): 0.39-0.76x the
    time at 2-3 rows (128->256 to 1024->512), 0.65-0.96x at 4-8 rows up to 512 inputs, slower from
    1024 inputs and for 64->64; bfloat16 1.1-1.7x slower everywhere, so not there."""
    _, out, inn = w.shape
    if x.dtype != torch.float32 or not x.is_cpu or w.stride(2) != 1 or out * inn < 1 << 15:
        return _NO_ROWS
    return range(2, 9) if inn <= 512 else range(2, 4)


def _empty_groups(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Zero rows for a call where no group has a row: still in the autograd graph, so that every
    argument gets an exactly zero gradient (a sum over none of the weight's elements: one zero-fill)."""
    y = x @ x.new_zeros(x.shape[1], w.shape[1]) + w[:0].sum()
    return y if b is None else y + b[:0].sum()


# ---- the weight gradient as a custom op (what the compiled backward calls) --------------------------

def weight_grads(gy: Tensor, x: Tensor, w: Tensor, offsets: Tensor, need_w: bool,
                 need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """The weight and bias gradients for ``gy [T, out]`` (eager; reads the offsets on the host)."""
    values = ends(x, w, None, offsets, need=True)
    assert values is not None
    return _loop_weight_grads(gy.contiguous(), x, w, values, need_w, need_b)


# ---- padded_bmm: scatter into [E, max_rows, in], one baddbmm ------------------------------------------

#: padded_bmm runs the loop where its slab would hold more than this many times the grouped rows.
PAD_LIMIT = 2
#: ... or this many, for bfloat16 and float16 on the CPU, where each small product has a fixed cost
#: (~20 us a call here) that one baddbmm pays once: measured (one thread, forward, against the fastest
#: other implementation), a slab 2.5x the rows 0.50-0.84x the time (128 rows over 64 experts,
#: 256->256 and 128->256), 3x 0.97x (64 rows over 32 experts, 256->512), 4x 0.63-1.55x, 8x 1.9-3.2x;
#: float32 loses from 2.5x (1.5-2x the time). The tuner times it on its own split of the rows.
PAD_LIMIT_LOW_PRECISION_CPU = 4


def padded_bmm(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
    # The ragged twin of the dense op's bmm: each group's rows copied into a zero-padded slab of the
    # largest group's size. Autograd differentiates the copies and the bmm: the padding's zero rows
    # make the gradients of empty groups exactly zero with no fill of their own.
    values = ends(x, w, b, offsets, need=True)
    assert values is not None
    groups, rows = w.shape[0], x.shape[0]
    sizes = _sizes(values)
    longest = max(sizes, default=0)
    if longest == 0:
        return _empty_groups(x, w, b)
    end = values[-1]
    low_precision = x.is_cpu and x.dtype in (torch.bfloat16, torch.float16)
    if groups * longest > (PAD_LIMIT_LOW_PRECISION_CPU if low_precision else PAD_LIMIT) * end:
        # A skewed split: the slab would multiply the arithmetic (E times with every row in one
        # group). The tuner times balanced splits, so this keeps the pick sound on skewed ones.
        return loop(x, w, b, offsets)
    device = x.device
    counts = torch.tensor(sizes, device=device)
    gid = torch.repeat_interleave(torch.arange(groups, device=device), counts, output_size=end)
    starts = torch.tensor([0, *values[:-1]], device=device)
    slot = gid * longest + torch.arange(end, device=device) - starts[gid]  # each row's place in the slab
    xp = x.new_zeros(groups * longest, x.shape[1]).index_copy(0, slot, x[:end])
    xp = xp.view(groups, longest, x.shape[1])
    if w.stride(2) == 1 and _recording(x, w, b) and plain_eager(x, w, b):
        # the dense op's bmm Function: the weight's gradient as grad^T @ x, in nn.Linear's layout;
        # autograd's bmm gives it [E, in, out], which AccumulateGrad copies element by element.
        # Measured (one thread, training step, .backward()): 0.46-0.56x the time at 64-256 rows over
        # 32-64 experts of 128->256 to 512->256, bfloat16 and float32; 0.63-0.92x at 64->64
        yp = apply_function(_BmmLinear3d, xp.transpose(0, 1), w, b).transpose(0, 1)
    else:
        wt = w.transpose(1, 2)
        yp = torch.bmm(xp, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xp, wt)
    y = yp.reshape(groups * longest, -1).index_select(0, slot)
    return y if end == rows else torch.cat([y, y.new_zeros(rows - end, y.shape[1])])


# ---- dense_select: every expert on every row, then each row picks its own ---------------------------

def dense_select(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
    # E times the arithmetic, in one matmul: pays only with a few experts and few rows.
    ends(x, w, b, offsets, need=False)
    groups, rows, out = w.shape[0], x.shape[0], w.shape[1]
    if groups == 0 or rows == 0:
        return _empty_groups(x, w, b)
    gid = _group_ids(_on(offsets, x), rows)
    picked = gid.clamp(max=groups - 1)
    if _stored_in_out(w):
        # [E, in, out] storage multiplied as it is: a reshape copies it, and AccumulateGrad copies its
        # gradient back. Measured (one thread, 4-64 rows over 4-8 experts): 0.73-0.94x the time, and
        # 0.11-0.19x at 256->512 (a 4 MiB weight copied twice a step)
        xe = x.expand(groups, rows, x.shape[1])
        # [E, T, out]; bmm, not matmul, whose folded form gives the weight's gradient [E, out, in]
        every = torch.bmm(xe, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xe, w.transpose(1, 2))
        y = every.gather(0, picked.view(1, rows, 1).expand(1, rows, out)).squeeze(0)
    else:
        every = F.linear(x, w.reshape(groups * out, w.shape[2]), None if b is None else b.reshape(-1))  # [T, E*out]
        y = every.view(rows, groups, out).gather(1, picked.view(rows, 1, 1).expand(rows, 1, out)).squeeze(1)
    return y.masked_fill((gid == groups).unsqueeze(1), 0)


# ---- prepared for one call description (the dispatcher's memo: Implementation.prepare) -------------
# The op's per-call Python was most of a small call (T=16, E=8, 64->64, CPU: F.grouped_mm 19 us, the
# op 35 us). For a decided description ``m`` (the op's meta: shapes, strides, dtypes, devices, the
# split's class, the grad flags) these work out once what the implementation decides on each call;
# the offsets' values are still read and checked on every call. Where the tensors are not plain (a
# subclass, autocast on) they hand over to the implementation; ``bare`` skips that check, for the
# lean road (functional), which made it.

def prepare_loop(m: tuple[Any, ...], implementation: Any) -> Any:
    """:func:`loop` for the calls described by ``m`` (it reads the offsets anyway); None for no groups
    or meta tensors."""
    (_, _, _, device), (w_shape, _, _, _), _, (_, _, o_device), _, _, grad = m
    if device.type == "meta" or o_device.type == "meta" or w_shape[0] == 0:
        return None
    recording, function = bool(grad) and any(grad), direct_apply(_LoopLinear)
    inference = torch.is_inference_mode_enabled

    def bare(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
        values = offsets.tolist()
        check_values(x, w, b, offsets, values)
        if recording and not inference():  # (inference mode with grad enabled records nothing)
            return _recorded_loop(x, w, b, values, function)
        return _loop_forward(x, w, b, values)

    return _checked(bare, implementation)


def _only_group(values: list[int], rows: int) -> int | None:
    """The group that holds every one of ``rows`` (> 0) rows, if one does (a top-1 MoE's decode step,
    one expert): there the loop is one ``F.linear``, which autograd records with no Function's
    Python (selecting the weight's group costs its gradient one zero-fill, as :class:`_LoopLinear`'s
    own). Measured (CPU, one thread, a training step at T=16, E=8, 64->64, every row in one group):
    _LoopLinear applied directly 92.8 us, this 57.1 us, transformers' eager-style Python loop 77.8 us."""
    if rows == 0 or not values or values[-1] != rows:
        return None
    g = values.index(rows)  # the first group ending at the last row; it holds them all if it starts at 0
    return g if g == 0 or values[g - 1] == 0 else None


def _checked(bare: Any, implementation: Any) -> Any:
    def run(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
        if type(offsets) is Tensor and plain_tensors(x, w, b):
            return bare(x, w, b, offsets)
        return implementation(x, w, b, offsets)
    run.bare = bare  # type: ignore[attr-defined]
    return run
