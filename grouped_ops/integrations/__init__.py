"""Clients of the ops inside other libraries, each an optional extra imported only by name:

- :mod:`grouped_ops.integrations.transformers`: a transformers (>= 5) experts backend,
  ``pip install "grouped_ops[transformers]"``;
- :mod:`grouped_ops.integrations.pyg`: torch_geometric's ``HeteroLinear`` on the ragged op,
  ``pip install "grouped_ops[torch-geometric]"``.

``import grouped_ops`` imports neither this package nor those libraries (tests/test_integrations.py).
"""
