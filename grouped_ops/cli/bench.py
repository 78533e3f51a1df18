"""``python -m grouped_ops bench``: wires the benchmark sweep (:mod:`grouped_ops.bench`) in.

The sweep is imported only for ``bench`` (the other commands start faster), and a build without it
says so instead of failing.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any


def load() -> Any:
    """The ``grouped_ops.bench`` module, or why it cannot be used (a string)."""
    try:
        module = importlib.import_module("grouped_ops.bench")
    except ImportError as e:
        return str(e)
    missing = [name for name in ("configure_parser", "run") if not callable(getattr(module, name, None))]
    return f"grouped_ops.bench has no {', '.join(missing)}" if missing else module


def add_parser(sub: Any, argv: Sequence[str]) -> None:
    bench = sub.add_parser("bench", help="benchmark sweep (tables, CSV/JSON, plots)")
    if "bench" in argv and not isinstance(module := load(), str):
        module.configure_parser(bench)
        bench.set_defaults(func=module.run)
