"""torch_geometric's ``HeteroLinear`` on the ragged ``grouped_linear`` (``pip install
"grouped_ops[torch-geometric]"``).

``HeteroLinear`` without pyg-lib (which is not on PyPI) runs a Python loop of ``x[s:e] @ W[i]``.
Two ways onto the tuned ragged op, with the same numbers:

    >>> from grouped_ops.integrations.pyg import hetero_linear, reroute
    >>> out = hetero_linear(x_sorted, lin.weight, lin.bias, offsets)   # rows sorted by type
    >>> reroute(model)                  # every HeteroLinear in model now calls the ragged op

docs/moe.md ("PyG") has the timings.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from .._errors import GroupedOpsError
from ..functional import grouped_linear


def hetero_linear(x_sorted: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor) -> Tensor:
    """``HeteroLinear``'s computation on rows already sorted by type.

    Args:
        x_sorted: ``[N, in]``, rows grouped by type in type order.
        weight: ``[K, in, out]``, ``HeteroLinear.weight``'s layout (read through a transposed view:
            nothing is copied).
        bias: ``[K, out]`` or None.
        offsets: ``[K]`` int32 or int64 cumulative ends of each type's rows (``F.grouped_mm``'s
            ``offs``; ``torch_geometric``'s ``type_ptr[1:]``).

    Returns:
        ``[N, out]``: row ``r`` of type ``i`` is ``x_sorted[r] @ weight[i] + bias[i]``; rows past
        ``offsets[-1]`` are zero.

    Raises:
        GroupedOpsError: shapes that do not agree (named in this function's terms), and from the
            ragged ``grouped_linear`` (offsets, dtypes).
    """
    if not (isinstance(x_sorted, Tensor) and isinstance(weight, Tensor) and x_sorted.dim() == 2 and
            weight.dim() == 3 and x_sorted.shape[1] == weight.shape[1] and
            (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == (weight.shape[0], weight.shape[2])))):
        shapes = ", ".join(f"{n}.shape={tuple(t.shape)}" for n, t in (("x_sorted", x_sorted), ("weight", weight),
                                                                      ("bias", bias)) if isinstance(t, Tensor))
        raise GroupedOpsError(f"hetero_linear: expected x_sorted [N, in], weight [K, in, out] and bias [K, out] "
                              f"or None; got {shapes}")
    return grouped_linear(x_sorted, weight.transpose(1, 2), bias, offsets=offsets)


def _forward(self: Any, x: Tensor, type_vec: Tensor) -> Tensor:
    """``HeteroLinear.forward`` on the ragged op: sorts the rows by type unless they are (a stable
    sort, so equal types keep their order), runs :func:`hetero_linear`, and restores the order."""
    k = self.num_types
    if not isinstance(type_vec, Tensor) or type_vec.dim() != 1 or type_vec.shape[0] != x.shape[0] or \
            type_vec.is_floating_point() or type_vec.is_complex() or type_vec.dtype == torch.bool:
        got = f"type_vec.shape={tuple(type_vec.shape)}, dtype {str(type_vec.dtype).removeprefix('torch.')}" \
            if isinstance(type_vec, Tensor) else f"a {type(type_vec).__name__}"
        raise GroupedOpsError(f"HeteroLinear (grouped_ops): type_vec must be a 1-D integer tensor with one type per "
                              f"row of x; x.shape={tuple(x.shape)}, {got}")
    if x.device.type == "cpu" and type_vec.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(type_vec))  # free on the CPU; a sync elsewhere
        if low < 0 or high >= k:
            raise GroupedOpsError(f"HeteroLinear (grouped_ops): type_vec holds types {low}..{high} but "
                                  f"num_types={k} (x.shape={tuple(x.shape)}, type_vec.shape={tuple(type_vec.shape)})")
    types_ = torch.arange(k, device=type_vec.device, dtype=type_vec.dtype)
    if self.is_sorted:
        offsets = torch.searchsorted(type_vec, types_, right=True, out_int32=True)
        return hetero_linear(x, self.weight, self.bias, offsets)
    sorted_types, perm = torch.sort(type_vec, stable=True)
    offsets = torch.searchsorted(sorted_types, types_, right=True, out_int32=True)
    out = hetero_linear(x[perm], self.weight, self.bias, offsets)
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    return out[inverse]


def reroute(module: torch.nn.Module) -> torch.nn.Module:
    """Make every ``torch_geometric.nn.HeteroLinear`` in ``module`` (itself included) compute with
    the ragged ``grouped_linear``; returns ``module``. The parameters, state dict and
    ``is_sorted`` flag are untouched; ``undo(module)`` restores the original forward.

    Raises:
        ImportError: torch_geometric is not installed.
        GroupedOpsError: nothing in ``module`` is a ``HeteroLinear``.
    """
    try:
        from torch_geometric.nn import HeteroLinear
    except ImportError as e:
        raise ImportError('grouped_ops.integrations.pyg needs torch_geometric: pip install "grouped_ops[torch-geometric]"') from e
    found = [m for m in module.modules() if isinstance(m, HeteroLinear)]
    if not found:
        raise GroupedOpsError(f"reroute: no torch_geometric.nn.HeteroLinear in {type(module).__name__}")
    for m in found:
        m.forward = types.MethodType(_forward, m)  # an instance attribute: the class stays PyG's
    return module


def undo(module: torch.nn.Module) -> torch.nn.Module:
    """Give every re-routed ``HeteroLinear`` in ``module`` its own forward back; returns ``module``."""
    for m in module.modules():
        if isinstance(getattr(m, "__dict__", {}).get("forward"), types.MethodType) and m.forward.__func__ is _forward:
            del m.forward
    return module
