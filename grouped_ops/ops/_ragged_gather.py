"""The ragged op's ``gather_bmm`` implementation: each row's expert weight gathered, one batched
matrix-vector product; no host sync, ``T * out * in`` extra memory (memory-gated, and on the CPU a
candidate only for a few small rows), and a function prepared for one call description (see
:mod:`._ragged_impls` for the other implementations and the offsets' checks)."""

from __future__ import annotations

from typing import Any

import torch

from ..registry import fresh_contiguous
from ._ragged_impls import (
    _checked,
    _empty_groups,
    _group_ids,
    _on,
    _stored_in_out,
    check_values,
    ends,
)

Tensor = torch.Tensor


def gather_bmm(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
    # No host sync: rows find their group with searchsorted on the device. Costs T*out*in extra
    # memory (the gathered weights; their gradient too in training), so it is memory-gated.
    ends(x, w, b, offsets, need=False)
    groups, rows = w.shape[0], x.shape[0]
    if groups == 0 or rows == 0:
        return _empty_groups(x, w, b)
    return _gathered_product(x, w, b, _group_ids(_on(offsets, x), rows), tail=True)


def _gathered_product(x: Tensor, w: Tensor, b: Tensor | None, gid: Tensor, tail: bool) -> Tensor:
    """gather_bmm's product for the rows' group ids ``gid`` (E for a row past the last offset, which
    only occur where ``tail``: then clamped for the gather and zeroed after)."""
    groups = w.shape[0]
    g = gid.clamp(max=groups - 1) if tail else gid
    bg = None if b is None else b.index_select(0, g)
    # The weights are gathered as stored (gathering a transposed view copies every matrix
    # transposed), and each row multiplies its [in, out] matrix as a row vector, the faster form of
    # CPU BLAS's batched matrix-vector product; except that a weight gradient of the contiguous
    # layout is then a transposed view, which the gather's backward index-adds 1.4-3.7x slower in
    # bfloat16: there the matrix times the column vector. Measured (CPU, one thread, interleaved
    # minima) against the matrix times column vector that both layouts used to take: [E, in, out]
    # storage 0.09-0.43x the time forward and 0.22-0.51x in training in float32, 0.32-0.87x and
    # 0.29-0.90x in bfloat16 (4 rows over 32 experts 256->512 forward: float32 1690 -> 147 us);
    # contiguous storage forward 0.24-0.53x in float32 and 0.68-1.02x in bfloat16, but training
    # 1.4-3.7x in bfloat16 (0.8-1.3x in float32).
    stored_in_out = _stored_in_out(w)
    if not stored_in_out and torch.is_grad_enabled() and w.requires_grad:
        wg, xc = w.index_select(0, g), x.unsqueeze(2)  # [T, out, in], [T, in, 1]
        y = (torch.bmm(wg, xc) if bg is None else torch.baddbmm(bg.unsqueeze(2), wg, xc)).squeeze(2)
    else:
        wg = w.transpose(1, 2).index_select(0, g) if stored_in_out else w.index_select(0, g).transpose(1, 2)
        xr = x.unsqueeze(1)  # [T, 1, in] @ [T, in, out]
        y = (torch.bmm(xr, wg) if bg is None else torch.baddbmm(bg.unsqueeze(1), xr, wg)).squeeze(1)
    if tail:  # rows past the last offset
        return y.masked_fill((gid == groups).unsqueeze(1), 0)
    return fresh_contiguous(y)  # the squeezed product, re-labelled as a tensor of its own (no copy)


def prepare_gather_bmm(m: tuple[Any, ...], implementation: Any) -> Any:
    """:func:`gather_bmm` for a CPU call with host offsets described by ``m``: the offsets read and
    checked on the host (free there, as the loop's), ``arange(T)`` kept for the rows' group ids,
    and no clamp or mask where every row is in a group. A Qwen3-MoE-like decode projection (8 rows
    over 64 experts, bfloat16) spent ~40 us of ~200 in those small ops. None elsewhere."""
    (x_shape, _, _, device), (w_shape, _, _, _), _, (_, o_dtype, o_device), _, _, _ = m
    rows = x_shape[0]
    if device.type != "cpu" or o_device.type != "cpu" or rows == 0 or w_shape[0] == 0 or rows > ROW_INDEX_LIMIT:
        return None
    row_index = torch.arange(rows, dtype=o_dtype)  # kept with the memo entry, read only

    def bare(x: Tensor, w: Tensor, b: Tensor | None, offsets: Tensor) -> Tensor:
        values = offsets.tolist()
        check_values(x, w, b, offsets, values)
        gid = torch.searchsorted(offsets, row_index, right=True)
        return _gathered_product(x, w, b, gid, tail=values[-1] < rows)

    return _checked(bare, implementation)


#: Up to this T a prepared gather_bmm is made (it keeps ``arange(T)``); gather_bmm is a candidate on
#: CPU only for a few rows anyway (:func:`gather_reasons`).
ROW_INDEX_LIMIT = 1 << 16


def gather_reasons(sig: Any) -> list[str]:
    """gather_bmm is batched matrix-vector work: on CPU it only pays for a few small rows."""
    size = sig.dim("batch") * sig.dim("out") * sig.dim("in")
    limit = GATHER_CPU_LIMIT_LOW if sig.dtype in (torch.bfloat16, torch.float16) else GATHER_CPU_LIMIT
    if sig.device_type == "cpu" and size > limit:
        return [f"T*out*in={size} > {limit} on CPU: one matrix-vector product per row, measured "
                "10-500x slower than the loop there (docs/benchmarks/ragged.md)"]
    return []


#: Above this T*out*in, gather_bmm is not a candidate on CPU (float32, float64).
GATHER_CPU_LIMIT = 1 << 18
#: ... in bfloat16 and float16, where CPU BLAS runs one row's product per expert slowly: measured (one
#: thread) 8 rows over 64 experts, 256->256: gather_bmm 191 us, loop 217 us; 256->128: 134 vs 194 us (a
#: Qwen3-MoE-like decode step); 4 rows of 512->256: 185 vs 136 us, so the tuner decides.
GATHER_CPU_LIMIT_LOW = 1 << 20


def gather_bytes(sig: Any) -> int:
    """gather_bmm's workspace: the gathered ``[T, out, in]`` weights, and their gradient in training."""
    per = sig.dim("batch") * sig.dim("out") * sig.dim("in") * sig.dtype.itemsize
    return per * (2 if "weight" in sig.grad else 1)
