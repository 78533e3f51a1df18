"""Print the signature grid behind the shipped tuning tables, as JSON lines for `prewarm --from`.

    python3 scripts/shipped_signatures.py cpu > /tmp/sigs.jsonl
    GROUPED_OPS_CACHE_DIR=/tmp/ship GROUPED_OPS_SHIPPED_DIR=$(mktemp -d) GROUPED_OPS_TUNE_BUDGET_S=1 \
        GROUPED_OPS_TUNE_REPS=100 python3 -m grouped_ops prewarm --from /tmp/sigs.jsonl
    GROUPED_OPS_CACHE_DIR=/tmp/ship python3 -m grouped_ops cache export tuning_cache/<name>.json
"""

from __future__ import annotations

import itertools
import json
import sys

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
dtypes = ["float32", "bfloat16"] + (["float16"] if device.startswith("cuda") else [])
sizes = [8, 32, 128] + ([1024] if device.startswith("cuda") else [])
# A model's first grouped layer reads a contiguous input; a chained one reads the previous layer's
# group-major result ([n, batch, in] in memory), which the signature calls a "strided" input.
for batch, n, size, dtype, grad, x_layout in itertools.product(
        [1, 16, 128, 512, 2048], [4, 8, 32, 64], sizes, dtypes, [(), ("input", "weight", "bias")],
        ["contiguous", "strided"]):
    print(json.dumps({"op": "grouped_linear", "dims": {"batch": batch, "n": n, "in": size, "out": size},
                      "dtype": dtype, "device": device,
                      "layout": {"input": x_layout, "weight": "contiguous", "bias": "yes"},
                      "grad": list(grad)}))
for batch, k, features, kind, dtype, grad in itertools.product(
        [16, 128, 512], [2, 4, 8, 16], [256, 4096, 32 * 16 * 16], ["stacked", "list"], dtypes,
        [(), ("inputs", "weights")]):
    print(json.dumps({"op": "weighted_combine", "dims": {"batch": batch, "k": k, "features": features},
                      "dtype": dtype, "device": device,
                      "layout": {"inputs": kind, "contiguous": "yes"}, "grad": list(grad)}))
