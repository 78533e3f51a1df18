"""grouped_ops: grouped linear layers and per-sample weighted combines for PyTorch, autotuned.

Public names only; everything else lives in private modules.
"""

from __future__ import annotations

from . import _custom_ops  # noqa: F401  registers grouped_ops::*_auto, for torch.export.load
from ._errors import GroupedOpsError
from ._version import __version__
from .decision import Decision
from .dispatch.overrides import exclude_impls, use_impl
from .functional import (
    grouped_linear,
    grouped_linear_ragged,
    implementations,
    unpermute_combine,
    weighted_combine,
)
from .nn import GroupedLinear
from .recording import Recorder, lookup, prewarm, record
from .routing import MoeRouting, moe_routing

__all__ = [
    "Decision",
    "MoeRouting",
    "GroupedLinear",
    "GroupedOpsError",
    "Recorder",
    "__version__",
    "exclude_impls",
    "grouped_linear",
    "grouped_linear_ragged",
    "implementations",
    "lookup",
    "moe_routing",
    "prewarm",
    "record",
    "unpermute_combine",
    "use_impl",
    "weighted_combine",
]
