"""Modules built on the functional ops."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import GroupedOpsError
from .functional import (
    _impl_of,
    dense_grouped_linear,
    grouped_linear,
)
from .ops.grouped_linear import SPEC as _GL
from .ops.grouped_linear_ragged import SPEC as _GLR


class GroupedLinear(nn.Module):
    """``groups`` independent ``nn.Linear(in_features, out_features)`` layers applied side by side.

    ``input [..., groups, in_features]`` -> ``[..., groups, out_features]``: group ``g`` of the
    output is ``F.linear(input[..., g, :], weight[g], bias[g])``. The result is a fresh tensor
    stored group-major (``[groups, ..., out_features]`` in memory, as grouped_linear returns it):
    ``.view()`` across the group dim raises torch's error; use ``reshape`` or ``y.contiguous()``. Parameters are ``weight
    [groups, out_features, in_features]`` (nn.Linear's layout, stacked) and ``bias [groups,
    out_features]`` or None. Initialised exactly as ``groups`` nn.Linear layers created one after
    the other from the same RNG state would be. With ``weight_layout="in_out"`` the weight is
    *stored* ``[groups, in_features, out_features]`` (a transposed view of that storage), the layout
    CPU bmm runs fastest; its shape, values and state_dict entries stay nn.Linear's (see "Parameter
    layout" in ``docs/adoption.md``).

    Converting existing layers: :meth:`from_linears` / :meth:`to_linears` (lossless both ways).
    Old checkpoints: ``load_state_dict`` also accepts this module's entries in the form a
    ``nn.ModuleList`` of ``nn.Linear`` saves them (``<prefix>0.weight``, ``<prefix>0.bias``, ...);
    :meth:`state_dict_from_linears` and :meth:`state_dict_to_linears` convert whole state dicts
    either way. See ``docs/adoption.md``.

    Example:
        >>> layer = GroupedLinear(4, 16, 32)          # 4 heads, 16 -> 32 features each
        >>> layer(torch.randn(8, 4, 16)).shape
        torch.Size([8, 4, 32])

    Args:
        groups: number of independent layers ``n``.
        in_features: input features per group.
        out_features: output features per group.
        bias: whether each group has a bias.
        impl: ``"auto"`` (the tuned choice) or one of ``grouped_ops.implementations("grouped_linear")``
            (or, for calls with ``offsets``, of ``"grouped_linear_ragged"``; a call refuses a name of the
            other op).
        weight_layout: how the weight is stored: ``"out_in"`` (default), nn.Linear's contiguous
            layout, which every wrapper takes (FSDP2 refuses non-contiguous parameters); or
            ``"in_out"``, ``[groups, in, out]`` storage behind the same ``[groups, out, in]`` weight:
            1.1-1.3x faster bmm on CPU, kept by ``.to()``, copies, checkpoints and optimizers.
        device, dtype: where and in which dtype to create the parameters, as for ``nn.Linear``.

    Raises:
        GroupedOpsError: a negative size, an unknown ``impl`` or ``weight_layout``.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True, *,
                 impl: str = "auto", weight_layout: str = "out_in", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if weight_layout not in _LAYOUTS:
            raise GroupedOpsError(f"GroupedLinear: weight_layout must be one of {list(_LAYOUTS)}, got {weight_layout!r}")
        for name, value in (("groups", groups), ("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GroupedOpsError(f"GroupedLinear: {name} must be a non-negative int, got {value!r}")
        _check_impl("GroupedLinear", impl)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.groups, self.in_features, self.out_features, self.impl = groups, in_features, out_features, impl
        self.weight_layout = weight_layout
        self.weight = nn.Parameter(_empty_weight(groups, out_features, in_features, weight_layout, **factory))
        self.bias = nn.Parameter(torch.empty(groups, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init, group by group and in nn.Linear's order (weight, then bias), so a seeded
        GroupedLinear equals ``groups`` seeded nn.Linear layers created in a row."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        # Drawn into a contiguous [n, out, in] copy: the RNG fills a tensor in memory order, so
        # drawing into the transposed storage would give other values than nn.Linear's.
        drawn = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=self.weight.device)
        for g in range(self.groups):
            nn.init.kaiming_uniform_(drawn[g], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[g], -bound, bound)
        with torch.no_grad():
            self.weight.copy_(drawn)

    def forward(self, input: Tensor, offsets: Tensor | None = None, group_sizes: Tensor | None = None) -> Tensor:
        """``input [..., groups, in]`` -> ``[..., groups, out]``; or with ``offsets`` (cumulative ends)
        or ``group_sizes`` (counts), ragged groups: ``input [T, in]`` sorted by group -> ``[T, out]``
        (see :func:`grouped_ops.grouped_linear`)."""
        try:  # the parameters from their dict: nn.Module.__getattr__ costs ~0.5 us each per call
            weight, bias = self._parameters["weight"], self._parameters["bias"]
        except KeyError:  # moved elsewhere (torch.nn.utils.parametrize): ask the module
            weight, bias = self.weight, self.bias
        impl = self.impl
        if offsets is not None or group_sizes is not None:
            return grouped_linear(input, weight, bias, offsets=offsets, group_sizes=group_sizes, impl=impl)
        if impl != "auto":  # a name of the ragged op only: say which call reaches which op
            impl = _impl_of(_GL, _GLR, impl)
        return dense_grouped_linear(input, weight, bias, impl)

    def __prepare_scriptable__(self) -> GroupedLinear:
        # torch.jit.script calls this first: fail with a way forward, not a TorchScript parse error.
        raise GroupedOpsError("GroupedLinear: torch.jit.script is not supported (the op chooses its "
                              "implementation in Python); use torch.jit.trace, torch.compile or torch.export")

    def extra_repr(self) -> str:
        text = (f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
        if self.weight_layout != "out_in":
            text = f"{text}, weight_layout={self.weight_layout!r}"
        return text if self.impl == "auto" else f"{text}, impl={self.impl!r}"

    # ---- converting from and to nn.Linear ----------------------------------------------------------

    @classmethod
    def from_linears(cls, linears: Iterable[nn.Linear], *, impl: str = "auto",
                     weight_layout: str = "out_in") -> GroupedLinear:
        """One GroupedLinear holding exact copies of ``linears``' parameters (dtype and device kept).

        The result's output for group ``g`` equals ``linears[g](input[..., g, :])`` (see
        ``docs/adoption.md`` for when that is bit-exact). Its parameters require grad if any of the
        originals' do; the originals are left untouched and share no memory with it.

        Example:
            >>> heads = nn.ModuleList(nn.Linear(16, 32) for _ in range(4))
            >>> layer = GroupedLinear.from_linears(heads)
            >>> torch.equal(layer.weight[2], heads[2].weight)
            True

        Args:
            linears: a non-empty list, tuple or ``nn.ModuleList`` of ``nn.Linear`` with one shape,
                one dtype, one device, and all with or all without bias.
            impl, weight_layout: as for the constructor.

        Raises:
            GroupedOpsError: an empty list, a non-Linear entry, an uninitialised ``nn.LazyLinear``,
                or a layer whose shape, dtype, device or bias differs from ``linears[0]``'s; the
                message names the layer's index and shapes.
        """
        who = "GroupedLinear.from_linears"
        if isinstance(linears, nn.Module) and not isinstance(linears, (nn.ModuleList, nn.Sequential)):
            raise GroupedOpsError(f"{who}: expected a list or nn.ModuleList of nn.Linear, got one "
                                  f"{type(linears).__name__}; wrap it in a list")
        layers = list(linears)
        if not layers:
            raise GroupedOpsError(f"{who}: got an empty list; pass at least one nn.Linear")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Linear):
                raise GroupedOpsError(f"{who}: linears[{i}] is a {type(layer).__name__}, not an nn.Linear")
            if isinstance(layer.weight, nn.parameter.UninitializedParameter):
                raise GroupedOpsError(f"{who}: linears[{i}] is an uninitialised nn.LazyLinear; run one "
                                      "forward pass through it first")
        first = layers[0]
        for i, layer in enumerate(layers[1:], start=1):
            _check_same(who, i, first, layer)
        _check_impl(who, impl)
        has_bias = first.bias is not None
        out_features, in_features = first.weight.shape
        # Built on the meta device: no throw-away init, and the caller's RNG state is not consumed.
        out = cls(len(layers), in_features, out_features, has_bias, impl=impl, weight_layout=weight_layout,
                  device="meta")
        with torch.no_grad():
            weight = _laid_out(torch.stack([layer.weight.detach() for layer in layers]), weight_layout)
            out.weight = nn.Parameter(weight, requires_grad=any(la.weight.requires_grad for la in layers))
            if has_bias:
                bias = torch.stack([layer.bias.detach() for layer in layers])  # type: ignore[union-attr]
                out.bias = nn.Parameter(bias, requires_grad=any(la.bias.requires_grad for la in layers))  # type: ignore[union-attr]
        return out

    def to_linears(self) -> nn.ModuleList:
        """``groups`` independent ``nn.Linear`` layers equal to this module's groups (copies, same
        dtype and device, ``requires_grad`` kept): ``from_linears(m.to_linears())`` is bit-exact."""
        layers = nn.ModuleList()
        with torch.no_grad():
            for g in range(self.groups):
                layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
                # contiguous_format: nn.Linear's own layout, whatever this module's storage is
                weight = self.weight[g].detach().clone(memory_format=torch.contiguous_format)
                layer.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
                if self.bias is not None:
                    layer.bias = nn.Parameter(self.bias[g].detach().clone(), requires_grad=self.bias.requires_grad)
                layers.append(layer)
        return layers

    # ---- checkpoints -------------------------------------------------------------------------------

    @staticmethod
    def state_dict_from_linears(state_dict: Mapping[str, Any], prefix: str = "") -> OrderedDict[str, Any]:
        """A copy of ``state_dict`` whose ``nn.ModuleList``-of-``nn.Linear`` entries under ``prefix``
        (``<prefix>0.weight``, ``<prefix>0.bias``, ``<prefix>1.weight``, ...) are replaced by one
        GroupedLinear's ``<prefix>weight`` and ``<prefix>bias`` (stacked copies; values exact).
        Every other entry is kept as is.

        Example:
            >>> old = nn.ModuleList(nn.Linear(16, 32) for _ in range(4)).state_dict()   # "0.weight", ...
            >>> layer = GroupedLinear(4, 16, 32)
            >>> layer.load_state_dict(GroupedLinear.state_dict_from_linears(old))
            <All keys matched successfully>

        A whole model's checkpoint: ``state_dict_from_linears(sd, prefix="encoder.heads.")``.
        ``load_state_dict`` of a GroupedLinear does this by itself, so converting is only needed to
        rewrite checkpoint files.

        Raises:
            GroupedOpsError: no ``<prefix>0.weight``, or layers of differing shapes or dtypes, or a
                mix of layers with and without bias.
        """
        prefix = _norm_prefix(prefix)
        converted, problem = _stack_linears(state_dict, prefix)
        if problem:
            raise GroupedOpsError(f"GroupedLinear.state_dict_from_linears: {problem}")
        return converted

    @staticmethod
    def state_dict_to_linears(state_dict: Mapping[str, Any], prefix: str = "") -> OrderedDict[str, Any]:
        """The inverse of :meth:`state_dict_from_linears`: a copy of ``state_dict`` whose
        GroupedLinear entries ``<prefix>weight [n, out, in]`` and ``<prefix>bias [n, out]`` are
        replaced by ``<prefix>0.weight``, ``<prefix>0.bias``, ... as a ``nn.ModuleList`` of
        ``nn.Linear`` saves them. The new entries are views of the stacked tensors (no copy).

        Example:
            >>> sd = GroupedLinear.state_dict_to_linears(model.state_dict(), prefix="heads.")
            >>> old_model.load_state_dict(sd)

        Raises:
            GroupedOpsError: no 3-D ``<prefix>weight``, or a bias that does not match it.
        """
        who = "GroupedLinear.state_dict_to_linears"
        prefix = _norm_prefix(prefix)
        weight = state_dict.get(prefix + "weight")
        if not isinstance(weight, Tensor) or weight.dim() != 3:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            raise GroupedOpsError(f"{who}: expected a 3-D tensor [n, out, in] at {prefix + 'weight'!r}, "
                                  f"got {'nothing' if weight is None else f'shape {shape}'}")
        bias = state_dict.get(prefix + "bias")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != tuple(weight.shape[:2])):
            raise GroupedOpsError(f"{who}: {prefix + 'bias'!r} must have shape {tuple(weight.shape[:2])} "
                                  f"[n, out] to match weight.shape={tuple(weight.shape)}, "
                                  f"got {tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        out: OrderedDict[str, Any] = OrderedDict()
        for key, value in state_dict.items():
            if key == prefix + "weight":
                for g in range(weight.shape[0]):
                    out[f"{prefix}{g}.weight"] = weight[g]
                    if bias is not None:
                        out[f"{prefix}{g}.bias"] = bias[g]
            elif key != prefix + "bias":
                out[key] = value
        _copy_metadata(state_dict, out)
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # Accept a checkpoint saved from a ModuleList of nn.Linear in this module's place, as
        # BatchNorm accepts old checkpoints: rewrite our entries in the state dict being loaded
        # (load_state_dict hands modules its own copy), then load as usual.
        if prefix + "weight" not in state_dict and prefix + "0.weight" in state_dict:
            converted, problem = _stack_linears(state_dict, prefix)
            if problem:
                error_msgs.append(f"GroupedLinear at {prefix[:-1] or '(root)'!r}: cannot load the "
                                  f"nn.ModuleList-of-nn.Linear entries: {problem}")
            else:
                for key in [k for k in state_dict if k not in converted]:
                    del state_dict[key]
                state_dict.update(converted)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # load_state_dict(assign=True) puts the checkpoint's own tensor in place (usually
        # contiguous [n, out, in]): restore the fast layout. A plain load copies into ours.
        weight = self.weight
        if isinstance(weight, nn.Parameter) and weight.dim() == 3 and not _has_layout(weight, self.weight_layout):
            self.weight = nn.Parameter(_laid_out(weight.detach(), self.weight_layout),
                                       requires_grad=weight.requires_grad)


# ---- the weight's memory layout ---------------------------------------------------------------------
# The weight is [n, out, in] (nn.Linear's layout, stacked) as far as any caller can tell, but its
# storage is [n, in, out]: the parameter is a transposed view, ``torch.empty(n, in, out)
# .transpose(1, 2)``. bmm then multiplies by a contiguous [n, in, out] operand, which CPU BLAS runs
# about 1.3x faster than the transposed one (the TabM / rtdl layers' layout) when rows are few
# and matrices large. In training, bmm computes the weight's gradient in whichever layout the
# weight has (ops/_bmm_linear.py), so neither layout costs AccumulateGrad a copy.
# Values, shapes, state_dict entries and conversions are unchanged; .to(), deepcopy, pickle,
# torch.save and optimizer states keep the strides (see docs/adoption.md, "Parameter layout").


_LAYOUTS = ("out_in", "in_out")


def _empty_weight(n: int, out: int, inn: int, layout: str, **factory: Any) -> Tensor:
    """An uninitialised weight ``[n, out, in]``, stored as ``layout`` says."""
    if layout == "out_in":
        return torch.empty(n, out, inn, **factory)
    return torch.empty(n, inn, out, **factory).transpose(1, 2)


def _has_layout(weight: Tensor, layout: str) -> bool:
    """Whether ``weight [n, out, in]`` is stored as ``layout`` says (dims of size 1 match either way)."""
    if layout == "out_in":
        return weight.is_contiguous()
    n, out, inn = weight.shape
    return (out <= 1 or weight.stride(1) == 1) and (inn <= 1 or weight.stride(2) == out) and \
        (n <= 1 or weight.stride(0) == out * inn)


def _laid_out(weight: Tensor, layout: str) -> Tensor:
    """A copy of ``weight [n, out, in]`` (same values, dtype, device) stored as ``layout`` says."""
    if layout == "out_in":
        return weight.contiguous()
    return weight.transpose(1, 2).contiguous().transpose(1, 2)


def _check_impl(who: str, impl: str) -> None:
    if impl != "auto" and impl not in _GL.registry and impl not in _GLR.registry:
        raise GroupedOpsError(f"{who}: unknown impl {impl!r}{_GL.registry.removal(impl)}; valid options are "
                              f"{['auto', *_GL.registry]}, or for calls with offsets {list(_GLR.registry)}")


def _describe(layer: nn.Linear) -> str:
    bias = "" if layer.bias is not None else ", bias=False"
    return (f"Linear(in_features={layer.in_features}, out_features={layer.out_features}{bias}) "
            f"(weight.shape={tuple(layer.weight.shape)})")


def _check_same(who: str, i: int, first: nn.Linear, layer: nn.Linear) -> None:
    if layer.weight.shape != first.weight.shape:
        raise GroupedOpsError(f"{who}: linears[{i}] is {_describe(layer)} but linears[0] is {_describe(first)}; "
                              "all layers must have one shape")
    if (layer.bias is None) != (first.bias is None):
        has = "has no bias" if layer.bias is None else "has a bias"
        other = "has one" if first.bias is not None else "has none"
        raise GroupedOpsError(f"{who}: linears[{i}] {has} but linears[0] {other} ({_describe(layer)} vs "
                              f"{_describe(first)}); all layers must agree")
    for name in ("weight", "bias"):
        a, b = getattr(first, name), getattr(layer, name)
        if a is None:
            continue
        if b.dtype != a.dtype:
            raise GroupedOpsError(f"{who}: linears[{i}].{name} is {_name(b.dtype)} but "
                                  f"linears[0].{name} is {_name(a.dtype)} "
                                  f"({_describe(layer)}); cast them to one dtype first")
        if b.device != a.device:
            raise GroupedOpsError(f"{who}: linears[{i}].{name} is on {b.device} but linears[0].{name} is on "
                                  f"{a.device} ({_describe(layer)}); move them to one device first")


def _norm_prefix(prefix: str) -> str:
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _copy_metadata(src: Mapping[str, Any], dst: OrderedDict[str, Any]) -> None:
    metadata = getattr(src, "_metadata", None)
    if metadata is not None:
        dst._metadata = metadata  # type: ignore[attr-defined]


def _stack_linears(state_dict: Mapping[str, Any], prefix: str) -> tuple[OrderedDict[str, Any], str]:
    """(converted copy, '') or (empty, what is wrong) for the ModuleList form under ``prefix``."""
    weights: list[Tensor] = []
    biases: list[Tensor] = []
    with_bias = f"{prefix}0.bias" in state_dict
    while f"{prefix}{len(weights)}.weight" in state_dict:
        g = len(weights)
        w, b = state_dict[f"{prefix}{g}.weight"], state_dict.get(f"{prefix}{g}.bias")
        if not isinstance(w, Tensor) or w.dim() != 2:
            return OrderedDict(), f"{prefix}{g}.weight is not a 2-D tensor [out, in]"
        if weights and (w.shape != weights[0].shape or w.dtype != weights[0].dtype):
            return OrderedDict(), (f"{prefix}{g}.weight has shape {tuple(w.shape)} and dtype {_name(w.dtype)} "
                                   f"but {prefix}0.weight has shape {tuple(weights[0].shape)} and dtype "
                                   f"{_name(weights[0].dtype)}")
        if (b is not None) != with_bias:
            return OrderedDict(), (f"{prefix}{g}.bias is {'present' if b is not None else 'missing'} but "
                                   f"{prefix}0.bias is {'present' if with_bias else 'missing'}; all layers must agree")
        if b is not None:
            if not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],) or b.dtype != w.dtype:
                got = f"shape {tuple(b.shape)}, {_name(b.dtype)}" if isinstance(b, Tensor) else type(b).__name__
                return OrderedDict(), (f"{prefix}{g}.bias must have shape ({w.shape[0]},) and dtype "
                                       f"{_name(w.dtype)} to match {prefix}{g}.weight, got {got}")
            biases.append(b)
        weights.append(w)
    if not weights:
        return OrderedDict(), f"no {prefix + '0.weight'!r} entry to convert"
    names = {f"{prefix}{g}.{p}" for g in range(len(weights)) for p in ("weight", "bias")}
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        if key == f"{prefix}0.weight":
            out[prefix + "weight"] = torch.stack([w.detach() for w in weights])
            if biases:
                out[prefix + "bias"] = torch.stack([b.detach() for b in biases])
        elif key not in names:
            out[key] = value
    _copy_metadata(state_dict, out)
    return out, ""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
