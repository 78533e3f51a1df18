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

from typing import Any

import torch
from torch import Tensor

from .._errors import GroupedOpsError
from ..functional import grouped_linear, ragged_grouped_linear


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


#: Up to this many rows a sorted ``type_vec`` is compared with the last one (``torch.equal``) rather
#: than searched again: the comparison reads every type, the search only ``log N`` of them, and
#: the range check (``aminmax``) reads them all once (measured: 0.8 us against ~10 us at 256 rows,
#: 0.8 ms against 0.25 ms at 1M). An unsorted one is always compared: it saves a sort (33 ms at 1M).
SORTED_MEMO_ROWS = 1 << 14


class _Rerouted:
    """The ``forward`` of a re-routed ``HeteroLinear`` (an instance attribute: the class stays
    PyG's). On the CPU it keeps the offsets (and the sort's permutation) of the last ``type_vec``
    with a copy of it, and reuses them for a ``type_vec`` of equal values (a full-graph model
    passes the same one on every call): compared by value, as a tensor's contents can change
    behind its version counter (through NumPy, DLPack or ``.data``). Measured (one thread, N=256, 8
    types of 64->64, docs/benchmarks/moe-pyg.md, three runs): a forward 98 -> 83-89 us;
    ``F.grouped_mm`` with offsets made beforehand and the bias 69-70 us, HeteroLinear 144-152 us."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._last: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:  # torch.save of the whole model: the module, not the memo
        return {"module": self.module}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["module"])  # type: ignore[misc]

    def __call__(self, x: Tensor, type_vec: Tensor) -> Tensor:
        """``HeteroLinear.forward`` on the ragged op: sorts the rows by type unless they are (a
        stable sort, so equal types keep their order), runs the ragged ``grouped_linear``, and puts
        each row back in its place."""
        m = self.module
        n = x.shape[0] if isinstance(x, Tensor) and x.dim() == 2 else -1
        if not isinstance(type_vec, Tensor) or type_vec.dim() != 1 or type_vec.shape[0] != n or \
                type_vec.is_floating_point() or type_vec.is_complex() or type_vec.dtype == torch.bool or \
                x.shape[1] != m.weight.shape[1]:
            got = f"type_vec.shape={tuple(type_vec.shape)}, dtype {str(type_vec.dtype).removeprefix('torch.')}" \
                if isinstance(type_vec, Tensor) else f"a {type(type_vec).__name__}"
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise GroupedOpsError(f"HeteroLinear (grouped_ops): x must be [N, in_channels={m.weight.shape[1]}] and "
                                  f"type_vec a 1-D integer tensor with one type per row of x; x.shape={shape}, {got}")
        offsets, order = self._offsets(x, type_vec)
        if order is not None and order[0].device != x.device:  # a host type_vec for a GPU x, as indexing takes it
            order = (order[0].to(x.device), order[1].to(x.device))
        # the module's own weight and bias: their shapes agree (hetero_linear's checks are not repeated)
        out = ragged_grouped_linear(x if order is None else x.index_select(0, order[0]), m.weight.transpose(1, 2),
                                    m.bias, offsets, "auto")
        # rows back in their places: index_select by the inverse permutation, not aten::index, nor
        # index_copy_ by the permutation. Measured (one thread, [N, 64]): forward 5.5 / 12 / (index) us
        # at N=256, 54 / 204 us at 4096; a training step's 63 / 45 / 110 us at 256, 320 / 434 / 789 us at 4096
        return out if order is None else out.index_select(0, order[1])

    def _offsets(self, x: Tensor, type_vec: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The offsets ``[num_types]`` of the rows sorted by type, and the sort's permutation with its
        inverse (None where the module's rows come sorted): the last ones where ``type_vec`` has the
        last values."""
        m = self.module
        compiling = torch.compiler.is_compiling()
        if type_vec.dtype not in (torch.int32, torch.int64):  # (arange(num_types) would overflow an int8)
            type_vec = type_vec.long()
        # kept on the CPU only (a comparison on a GPU syncs), not while compiling (dynamo traces the
        # making), nor in inference mode (its tensors cannot be saved for a later backward)
        keep = type_vec.is_cpu and not compiling and not torch.is_inference_mode_enabled() and \
            (not m.is_sorted or type_vec.shape[0] <= SORTED_MEMO_ROWS)
        last, state = self._last, (m.is_sorted, m.num_types, type_vec.dtype)
        if keep and last is not None and last[1] == state and last[0].shape == type_vec.shape and \
                torch.equal(last[0], type_vec):
            return last[2], last[3]
        k = m.num_types
        order, sorted_types = None, type_vec.contiguous()  # (searchsorted warns on a strided one)
        if not m.is_sorted:
            sorted_types, perm = torch.sort(type_vec, stable=True)
            order = perm, torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
        if type_vec.is_cpu and type_vec.numel() and not compiling:  # free on the CPU; a sync elsewhere
            # the ends of the rows this sort ordered (2.4 us; aminmax 2.3 us at 256 rows, 9 us at 4096);
            # all of them where the module says they come sorted
            low, high = (sorted_types[0], sorted_types[-1]) if order is not None else torch.aminmax(type_vec)
            low, high = int(low), int(high)
            if low < 0 or high >= k:
                raise GroupedOpsError(f"HeteroLinear (grouped_ops): type_vec holds types {low}..{high} but "
                                      f"num_types={k} (x.shape={tuple(x.shape)}, type_vec.shape={tuple(type_vec.shape)})")
        offsets = torch.searchsorted(sorted_types, torch.arange(k, device=type_vec.device, dtype=type_vec.dtype),
                                     right=True, out_int32=True)
        if keep:
            self._last = (type_vec.clone(), state, offsets, order)
        return offsets, order


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
        if not isinstance(m.__dict__.get("forward"), _Rerouted):
            m.forward = _Rerouted(m)
    return module


def undo(module: torch.nn.Module) -> torch.nn.Module:
    """Give every re-routed ``HeteroLinear`` in ``module`` its own forward back; returns ``module``."""
    for m in module.modules():
        if isinstance(getattr(m, "__dict__", {}).get("forward"), _Rerouted):
            del m.forward
    return module
