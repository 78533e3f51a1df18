"""One module per op; this package maps op names to their specs and registries.

An op is one module that builds an :class:`OpSpec` and passes it to :func:`register`; everything
else (dispatch, torch.compile and its custom op, prewarm and lookup, explain, the CLI, the testing
helpers) finds it here by name and asks the spec. ``functional.op_function(spec)`` makes its public
function.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable

from .._errors import GroupedOpsError
from ..registry import Registry
from . import grouped_linear, grouped_linear_ragged, unpermute_combine, weighted_combine
from ._common import check_dtypes_devices, fail, is_contiguous, random_like, tensor_meta
from ._spec import Arg, Cli, Flag, OpSpec

__all__ = ["REGISTRIES", "SPECS", "Arg", "Cli", "Flag", "OpSpec", "check_dtypes_devices", "fail", "is_contiguous",
           "on_register", "random_like", "register", "tensor_meta", "unregister"]

SPECS: dict[str, OpSpec] = {}
REGISTRIES: dict[str, Registry] = {}
# Called with each spec registered from now on (grouped_ops._custom_ops defines its custom op).
on_register: list[Callable[[OpSpec], None]] = []


def register(spec: OpSpec) -> OpSpec:
    """Make ``spec`` an op of the library, found by its name everywhere; returns it.

    Its custom op ``grouped_ops::<name>_auto`` (what torch.compile emits where nothing is decided)
    is defined as it is registered. Registering the same spec again does nothing.

    Raises:
        GroupedOpsError: the name is not an identifier, another spec has it, or the spec lacks
            ``arguments``, ``fake`` or ``backward`` (the custom op needs them).
    """
    known = SPECS.get(spec.name)
    if known is spec:
        return spec
    if known is not None:
        raise GroupedOpsError(f"register: another op is registered as {spec.name!r}; unregister it first")
    if not _plain_name(spec.name):
        raise GroupedOpsError(f"register: op name {spec.name!r} must be an ASCII Python identifier, not a keyword")
    if not spec.arguments or spec.fake is None or spec.backward is None:
        raise GroupedOpsError(f"register: {spec.name} needs arguments, fake and backward (its custom op's)")
    names = [a.name for a in spec.arguments]
    bad = [n for n in names if not _plain_name(n) or n in _RESERVED or n.endswith("_stacked") or names.count(n) > 1]
    if bad:
        raise GroupedOpsError(f"register: {spec.name}: argument names must be distinct ASCII identifiers, not "
                              f"keywords, not {sorted(_RESERVED)} nor ending in '_stacked' (the custom op's own); "
                              f"got {bad}")
    for hook in on_register:
        hook(spec)
    SPECS[spec.name] = spec
    REGISTRIES[spec.name] = spec.registry
    return spec


# the op function's keyword and the custom op's own parameters (see grouped_ops._custom_ops.schema)
_RESERVED = frozenset({"impl", "grad_mask", "stacked"})


def _plain_name(name: str) -> bool:
    return name.isidentifier() and name.isascii() and not keyword.iskeyword(name)


def unregister(name: str) -> None:
    """Forget the op ``name`` (tests that register ops of their own). Its custom op stays defined
    (torch.library keeps it); a spec registered under that name again uses it."""
    SPECS.pop(name, None)
    REGISTRIES.pop(name, None)


for _module in (grouped_linear, weighted_combine, grouped_linear_ragged, unpermute_combine):
    register(_module.SPEC)
