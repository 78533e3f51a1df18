"""``python -m grouped_ops`` (and the ``grouped-ops`` script): see :mod:`grouped_ops.cli`."""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
