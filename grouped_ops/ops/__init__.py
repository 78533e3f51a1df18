"""One module per op; this package maps op names to their specs and registries."""

from __future__ import annotations

from . import grouped_linear, weighted_combine
from ._spec import OpSpec

SPECS: dict[str, OpSpec] = {m.OP: m.SPEC for m in (grouped_linear, weighted_combine)}
REGISTRIES = {name: spec.registry for name, spec in SPECS.items()}
