"""prewarm and lookup: the tuner's public face."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import dispatch
from ._errors import GroupedOpsError
from .dispatch import Decision
from .ops import SPECS
from .ops._spec import OpSpec


def _spec(op: str | Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], who: str) -> tuple[OpSpec, tuple[Any, ...]]:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in SPECS:
        raise GroupedOpsError(f"{who}: unknown op {name!r}; valid ops are {sorted(SPECS)}")
    if kwargs.pop("impl", "auto") != "auto":
        raise GroupedOpsError(f"{who}: impl= is not taken here; the point is to choose it")
    if name == "grouped_linear":
        x, w, *rest = (*args, *([kwargs.pop("bias")] if "bias" in kwargs else []))
        args = (x, w, rest[0] if rest else None)
    elif name == "weighted_combine":
        inputs, weights = args if len(args) == 2 else (args[0], kwargs.pop("weights"))
        args = (tuple(inputs) if isinstance(inputs, list) else inputs, weights)
    if kwargs:
        raise GroupedOpsError(f"{who}: unexpected arguments {sorted(kwargs)} for {name}")
    return SPECS[name], args


def prewarm(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Decision:
    """Decide (tuning if needed) the implementation ``auto`` will use for these arguments, persist it,
    and return the decision. Arguments exactly as for the op; they are only described, never used.

    Example:
        >>> d = grouped_ops.prewarm("grouped_linear", x, layer.weight, layer.bias)
        >>> d.impl, d.source, d.timings
    """
    spec, args = _spec(op, args, dict(kwargs), "prewarm")
    decision = dispatch.decision_for(spec, args)
    assert decision is not None
    return decision


def lookup(op: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Decision | None:
    """The decision ``auto`` would use for these arguments if one is known; never tunes."""
    spec, args = _spec(op, args, dict(kwargs), "lookup")
    return dispatch.decision_for(spec, args, tune_allowed=False)
