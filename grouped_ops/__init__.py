"""grouped_ops: grouped linear layers and per-sample weighted combines for PyTorch, autotuned.

Public names only; everything else lives in private modules.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._errors import GroupedOpsError
from .api import lookup, prewarm
from .dispatch import Decision, Recorder, record
from .functional import grouped_linear, implementations, weighted_combine
from .nn import GroupedLinear
from .registry import use_impl

__all__ = [
    "Decision",
    "GroupedLinear",
    "GroupedOpsError",
    "Recorder",
    "__version__",
    "grouped_linear",
    "implementations",
    "lookup",
    "prewarm",
    "record",
    "use_impl",
    "weighted_combine",
]
