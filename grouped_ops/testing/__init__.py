"""Property-testing helpers for grouped_ops: hypothesis strategies and an agreement check.

Import it explicitly (``from grouped_ops.testing import ...``); it needs hypothesis, an extra:
``pip install "grouped_ops[testing]"``.

- :func:`grouped_linear_inputs` and :func:`weighted_combine_inputs` draw argument tuples for the ops,
  including the awkward cases: one group, one feature, empty batches, unbatched inputs, permuted,
  sliced and broadcast (stride-0) views, weights stored transposed as TabM and rtdl do, no bias,
  lists and stacked tensors.
- :func:`compositions` draws offsets for ragged groups (T rows into E groups: empty groups, one
  group holding every row, rows past the last offset, T = 0, E = 0 and 1, int32 and int64), and
  :func:`grouped_linear_ragged_inputs` whole argument tuples of ``grouped_linear(..., offsets=)``.
- :func:`op_inputs` draws argument tuples for any registered op from the dims its arguments name.
- :func:`assert_implementations_agree` runs every supported implementation on those arguments and
  checks the output and every gradient against a float64 reference.

Example:
    >>> from hypothesis import given
    >>> from grouped_ops.testing import assert_implementations_agree, grouped_linear_inputs
    >>> @given(grouped_linear_inputs(requires_grad=True))
    ... def test_my_layer(args):
    ...     assert_implementations_agree("grouped_linear", *args)
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "grouped_ops.testing needs hypothesis, which is an optional extra: "
        'pip install "grouped_ops[testing]" (or pip install "hypothesis>=6.100")'
    ) from e

from .agree import (
    assert_implementations_agree,
    reference_grouped_linear,
    reference_weighted_combine,
    tolerance,
)
from .ragged import compositions, grouped_linear_ragged_inputs
from .strategies import LAYOUTS, grouped_linear_inputs, op_inputs, weighted_combine_inputs

__all__ = [
    "LAYOUTS",
    "assert_implementations_agree",
    "compositions",
    "grouped_linear_inputs",
    "grouped_linear_ragged_inputs",
    "op_inputs",
    "reference_grouped_linear",
    "reference_weighted_combine",
    "tolerance",
    "weighted_combine_inputs",
]
