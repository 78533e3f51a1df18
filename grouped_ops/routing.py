"""The routing bookkeeping every mixture-of-experts layer writes by hand, sync-free and deterministic.

``moe_routing(top_k_index [T, k], E)`` sorts the ``T*k`` (token, choice) pairs by expert and says
where each expert's rows end (``offsets``, as ``F.grouped_mm`` and the ragged ``grouped_linear``
take them) and where each pair went (``inverse``, as :func:`grouped_ops.unpermute_combine` takes
it). docs/moe.md shows the whole layer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._errors import GroupedOpsError


class MoeRouting(NamedTuple):
    """What :func:`moe_routing` returns (a named tuple: unpack it or read its fields).

    sort_order: ``[T*k]`` int64, positions in ``top_k_index.reshape(-1)``, stably sorted by expert
        (ties keep token order).
    token_index: ``[T*k]`` int64, ``sort_order // k``: the token of each sorted row, so
        ``hidden[token_index]`` is the experts' input in expert order.
    offsets: ``[E]`` int32, the cumulative ends of each expert's rows (an expert without rows ends
        where the one before it does); rows past ``offsets[-1]`` belong to no expert here.
    inverse: ``[T, k]`` int64, the sorted row that holds token ``t``'s ``j``-th choice.
    """

    sort_order: Tensor
    token_index: Tensor
    offsets: Tensor
    inverse: Tensor


def moe_routing(top_k_index: Tensor, num_experts: int, top_k_weights: Tensor | None = None, *,
                expert_parallel: bool = False) -> MoeRouting:
    """Sort order, offsets and inverse for the top-k choices of T tokens among E experts.

    Sync-free (nothing is read back to the host, so it runs under CUDA-graph capture) and
    deterministic (a stable sort; the offsets are a ``searchsorted`` of the sorted ids against
    ``arange(E)``, never ``bincount``, which syncs on CUDA, nor ``histc``, which drops out-of-range ids
    silently and is refused on CUDA in deterministic mode).

    Example:
        >>> idx = torch.tensor([[1, 0], [1, 2]])              # T=2 tokens, top-2 of E=3 experts
        >>> r = moe_routing(idx, 3)
        >>> r.token_index.tolist(), r.offsets.tolist(), r.inverse.tolist()
        ([0, 0, 1, 1], [1, 3, 4], [[1, 0], [2, 3]])

    Args:
        top_k_index: ``[T, k]`` integer expert ids in ``0..E-1``.
        num_experts: E, at least 1.
        top_k_weights: ``[T, k]`` routing weights, or None; only checked against ``top_k_index``.
        expert_parallel: ids ``>= E`` are sentinels of expert parallelism (tokens another rank
            computes): they sort after every expert, past ``offsets[-1]``.

    Returns:
        :class:`MoeRouting` ``(sort_order, token_index, offsets, inverse)`` on ``top_k_index``'s device.

    Raises:
        GroupedOpsError: ``top_k_index`` is not a 2-D integer tensor, ``top_k_weights`` has another
            shape or is not floating-point, ``num_experts`` is not a positive int, or (where it
            costs no sync: on the CPU) an id is negative, or ``>= E`` without ``expert_parallel``.
    """
    shapes = f"top_k_index.shape={_shape(top_k_index)}" + \
        ("" if top_k_weights is None else f", top_k_weights.shape={_shape(top_k_weights)}")
    if not isinstance(top_k_index, Tensor) or top_k_index.dim() != 2:
        raise GroupedOpsError(f"moe_routing: top_k_index must be a 2-D tensor [T, k] ({shapes})")
    if top_k_index.dtype == torch.bool or top_k_index.is_floating_point() or top_k_index.is_complex():
        raise GroupedOpsError(f"moe_routing: top_k_index must hold integer expert ids, got "
                              f"{str(top_k_index.dtype).removeprefix('torch.')} ({shapes})")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise GroupedOpsError(f"moe_routing: num_experts must be a positive int, got {num_experts!r}")
    if top_k_weights is not None:
        if not isinstance(top_k_weights, Tensor) or top_k_weights.shape != top_k_index.shape:
            raise GroupedOpsError(f"moe_routing: top_k_weights must have top_k_index's shape [T, k] ({shapes})")
        if not top_k_weights.is_floating_point():
            raise GroupedOpsError(f"moe_routing: top_k_weights must be floating-point, got "
                                  f"{str(top_k_weights.dtype).removeprefix('torch.')} ({shapes})")
    ids = top_k_index.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or (high >= num_experts and not expert_parallel):
            raise GroupedOpsError(f"moe_routing: top_k_index holds experts {low}..{high} but num_experts="
                                  f"{num_experts} (pass expert_parallel=True for sentinel ids >= E) ({shapes})")
    k = top_k_index.shape[1]
    sorted_ids, sort_order = torch.sort(ids, stable=True)
    experts = torch.arange(num_experts, device=ids.device, dtype=ids.dtype)
    offsets = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)
    n = sort_order.numel()
    inverse = torch.empty_like(sort_order).scatter_(0, sort_order, torch.arange(n, device=ids.device))
    token_index = sort_order // k if k else sort_order
    return MoeRouting(sort_order, token_index, offsets, inverse.view(top_k_index.shape))


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
