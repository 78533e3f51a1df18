"""The library's one exception class."""

from __future__ import annotations


class GroupedOpsError(ValueError):
    """Bad input to a grouped_ops function: wrong shapes, dtypes, devices or implementation names.

    Messages start with the op name and quote the offending shapes, e.g.
    ``grouped_linear: weight has 4 groups but input has 5 (input.shape=(2, 5, 6), weight.shape=(4, 3, 6))``.
    """
