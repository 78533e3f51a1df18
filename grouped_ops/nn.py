"""Modules built on the functional ops."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import grouped_linear


class GroupedLinear(nn.Module):
    """``groups`` independent ``nn.Linear(in_features, out_features)`` layers applied side by side.

    ``input [..., groups, in_features]`` -> ``[..., groups, out_features]``.
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True, *,
                 impl: str = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.groups, self.in_features, self.out_features, self.impl = groups, in_features, out_features, impl
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(groups, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init, group by group: kaiming_uniform(a=sqrt(5)) and U(-1/sqrt(in), 1/sqrt(in)).
        for g in range(self.groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        return grouped_linear(input, self.weight, self.bias, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, impl={self.impl!r}")
