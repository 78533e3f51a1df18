"""What forces or forbids implementations for ``impl="auto"``, in code and in the environment.

- ``use_impl(...)`` scopes and ``GROUPED_OPS_IMPL``: force one implementation (the scope wins).
- ``exclude_impls(...)`` scopes and ``GROUPED_OPS_EXCLUDE``: keep ``auto`` away from some (both
  count), e.g. ``masked_dense`` for memory or for non-finite values (docs/autotuner.md).

Every override takes effect on the next call, also for signatures already decided: :func:`state`
is part of the hot path's memo key, and it is cheap (one context-variable read, two dict reads).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import types
import warnings
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

from .._errors import GroupedOpsError
from ..ops import SPECS
from ..registry import Registry

ENV_IMPL = "GROUPED_OPS_IMPL"
ENV_EXCLUDE = "GROUPED_OPS_EXCLUDE"


# op -> (forced name or None, excluded names) of the current ``with`` blocks; a new dict per block.
Scope = Mapping[str, tuple[str | None, frozenset[str]]]
_scope: contextvars.ContextVar[Scope] = contextvars.ContextVar("grouped_ops_overrides",
                                                               default=types.MappingProxyType({}))

# os.environ.get costs ~0.8 us (it encodes the key each time); the hot path reads the raw mapping
# with pre-encoded keys instead, falling back to os.environ where that mapping is not there.
_RAW: Mapping[Any, Any] | None = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
_KEYS = (_encode(ENV_IMPL), _encode(ENV_EXCLUDE)) if _RAW is not None and _encode else None


def state(op: str) -> Hashable:
    """A cheap hashable snapshot of every override of ``op``; part of the hot path's memo key."""
    if _KEYS is not None:
        return _scope.get().get(op), _RAW.get(_KEYS[0]), _RAW.get(_KEYS[1])  # type: ignore[union-attr]
    return _scope.get().get(op), os.environ.get(ENV_IMPL), os.environ.get(ENV_EXCLUDE)


def removed(op: str, name: str, where: str) -> bool:
    """Whether ``name`` is an implementation ``op`` had and removed (``Registry.removed``); if so,
    warn once per (op, name, where) that it is ignored. A job configured for it keeps running."""
    why = SPECS[op].registry.removed.get(name) if op in SPECS else None
    if why is None:
        return False
    if (op, name, where) not in _WARNED:
        _WARNED.add((op, name, where))
        warnings.warn(f"{op}: implementation {name!r} in {where} is ignored: {why}", UserWarning, stacklevel=3)
    return True


_WARNED: set[tuple[str, str, str]] = set()


def _owners(name: str, who: str) -> list[str]:
    owners = [op for op, spec in SPECS.items() if name in spec.registry]
    if not owners and who == "exclude_impls" and any([removed(op, name, who) for op in SPECS]):
        return []  # (a list, not a generator: every op that removed it warns)
    if not owners:
        valid = sorted({n for spec in SPECS.values() for n in spec.registry})
        why = "".join(spec.registry.removal(name) for spec in SPECS.values())
        raise GroupedOpsError(f"{who}: unknown impl {name!r}{why}; valid options are {valid}")
    return owners


def _registry(op: str, who: str) -> Registry:
    if op not in SPECS:
        raise GroupedOpsError(f"{who}: unknown op {op!r}; valid ops are {sorted(SPECS)}")
    return SPECS[op].registry


@contextlib.contextmanager
def use_impl(impl: str | None = None, /, **per_op: str) -> Iterator[None]:
    """Force implementations inside a ``with`` block; the previous setting is restored on exit.

    ``use_impl("bmm")`` forces ``bmm`` for every op that has it; ``use_impl(grouped_linear="loop",
    weighted_combine="broadcast")`` forces per op. Names are checked when the block is entered.

    Example:
        >>> with grouped_ops.use_impl(grouped_linear="loop"):
        ...     y = model(x)

    Raises:
        GroupedOpsError: an unknown op or implementation name.
    """
    forced: dict[str, str] = {}
    if impl is not None:
        forced.update(dict.fromkeys(_owners(impl, "use_impl"), impl))
    for op, name in per_op.items():
        _registry(op, "use_impl")[name]  # raises a GroupedOpsError naming the valid options
        forced[op] = name
    previous = _scope.get()
    scope = dict(previous)
    for op, name in forced.items():
        scope[op] = (name, previous.get(op, (None, frozenset()))[1])
    with _scoped(scope):
        yield


@contextlib.contextmanager
def exclude_impls(*names: str, **per_op: str | tuple[str, ...] | list[str]) -> Iterator[None]:
    """Keep ``auto`` away from implementations inside a ``with`` block (scopes nest and add up).

    ``exclude_impls("masked_dense")`` for every op that has it; ``exclude_impls(weighted_combine=
    ["masked_dense", "broadcast"])`` per op. ``auto`` then chooses among the others, from the
    timings it already has where it can; a forced implementation (``impl=``, ``use_impl``) is not
    affected. The environment's counterpart is ``GROUPED_OPS_EXCLUDE=masked_dense`` (or
    ``grouped_linear=masked_dense,weighted_combine=broadcast``).

    Raises:
        GroupedOpsError: an unknown op or implementation name.
    """
    add: dict[str, set[str]] = {}
    for name in names:
        for op in _owners(name, "exclude_impls"):
            add.setdefault(op, set()).add(name)
    for op, value in per_op.items():
        registry = _registry(op, "exclude_impls")
        for name in (value,) if isinstance(value, str) else value:
            if removed(op, name, "exclude_impls"):
                continue
            registry[name]
            add.setdefault(op, set()).add(name)
    previous = _scope.get()
    scope = dict(previous)
    for op, more in add.items():
        name, names = previous.get(op, (None, frozenset()))
        scope[op] = (name, names | more)
    with _scoped(scope):
        yield


@contextlib.contextmanager
def _scoped(scope: Scope) -> Iterator[None]:
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def _parse_env(var: str, op: str) -> list[str]:
    """The names ``var`` gives ``op``: ``NAME`` (every op that has it) or ``op=NAME`` parts,
    comma-separated. A typo raises, naming the valid options."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return []
    chosen = []
    for part in raw.split(","):
        if not part.strip():  # "bmm," or "a,,b": nothing between the commas
            continue
        owner, _, name = part.strip().rpartition("=")
        if owner in ("", op) and removed(op, name, var):
            continue
        if (owner == "" and any(name in spec.registry.removed for spec in SPECS.values())) or \
                (owner in SPECS and name in SPECS[owner].registry.removed):
            continue  # another op's removed name: that op warns when it reads the variable
        known_op = owner in ("", *SPECS)
        known_name = any(name in spec.registry for spec in SPECS.values()) if owner == "" else (
            known_op and name in SPECS[owner].registry)
        if not (known_op and known_name):
            valid = {o: list(s.registry) for o, s in SPECS.items()}
            raise GroupedOpsError(f"{var}={raw!r}: cannot use {part.strip()!r}; implementations are {valid}")
        if owner in ("", op) and name in SPECS[op].registry:
            chosen.append(name)
    return chosen


def forced_name(op: str) -> tuple[str, str] | None:
    """(name, source) of what forces ``op``: a ``use_impl`` scope ("forced") or GROUPED_OPS_IMPL ("env")."""
    name = _scope.get().get(op, (None,))[0]
    if name is not None:
        return name, "forced"
    env = _parse_env(ENV_IMPL, op)
    return (env[-1], "env") if env else None


def excluded(op: str) -> frozenset[str]:
    """What ``auto`` may not use for ``op`` here: the scopes' exclusions and GROUPED_OPS_EXCLUDE's."""
    return frozenset(_parse_env(ENV_EXCLUDE, op)) | _scope.get().get(op, (None, frozenset()))[1]

