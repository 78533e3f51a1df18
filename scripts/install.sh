#!/usr/bin/env bash
# Install grouped_ops (editable) and what it needs into the current Python environment.
#   bash scripts/install.sh        the library and its runtime dependencies
#   bash scripts/install.sh test   plus what the tests and benchmarks need: the extras test (hypothesis,
#                                  pytest, ...), bench (matplotlib, ...), and the clients the
#                                  integrations tests run against, transformers and torch-geometric;
#                                  grouped_ops.testing's own extra is `testing` (pip install "grouped_ops[testing]")
# A torch that is already installed (e.g. your own CUDA build) is kept; where there is none, the
# pinned CPU build is installed first so pip does not pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing the CPU build torch==2.13.0" >&2
  "$PY" -m pip install --quiet "torch==2.13.0"
fi

case "${1:-}" in
  "") extras="" ;;
  test) extras="[test,bench,transformers,torch-geometric]" ;;
  *) echo "usage: bash scripts/install.sh [test]" >&2; exit 2 ;;
esac
"$PY" -m pip install --quiet -e ".${extras}"
