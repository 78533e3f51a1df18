"""Print the signature grid behind the shipped tuning tables, as JSON lines for `prewarm --from`.

Dense grouped_linear (contiguous and group-major inputs), weighted_combine, and the MoE ops on the
blocks of scripts/moe_bench.py: the ragged grouped_linear's two projections (routed rows T*k over E
experts, the balanced and skewed splits that routing gives) and unpermute_combine.

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
# The MoE blocks of scripts/moe_bench.py: (hidden, intermediate, experts, top-k, gated, [E, in, out]
# storage with biases (GPT-OSS)); tokens T as there.
moe_blocks = [(512, 1024, 8, 2, True, False), (256, 128, 64, 8, True, False), (256, 256, 32, 4, True, True)]
for (hidden, inter, experts, top_k, gated, transposed), tokens, dtype, grad in itertools.product(
        moe_blocks, [1, 16, 128, 1024], dtypes, [False, True]):
    for inn, out in ((hidden, inter * (2 if gated else 1)), (inter, hidden)):
        rows = tokens * top_k
        # skewed: the largest group over twice the mean and a third of the rows (ops.grouped_linear_ragged);
        # balanced where the even split is not skewed
        even = -(-rows // experts)
        splits = [s for s, can in (("balanced", experts * even <= 2 * rows or 3 * even <= rows),
                                   ("skewed", rows >= 2)) if can]
        for split in splits:
            print(json.dumps({"op": "grouped_linear_ragged",
                              "dims": {"batch": rows, "n": experts, "in": inn, "out": out},
                              "dtype": dtype, "device": device,
                              "layout": {"input": "contiguous", "weight": "transposed" if transposed else "contiguous",
                                         "bias": "yes" if transposed else "no", "offsets": "host", "split": split},
                              "grad": ["input", "weight", "bias"][:3 if transposed else 2] if grad else []}))
    print(json.dumps({"op": "unpermute_combine", "dims": {"batch": tokens, "k": top_k, "features": hidden},
                      "dtype": dtype, "device": device, "layout": {"rows": "contiguous"},
                      "grad": ["rows", "weights"] if grad else []}))
