"""Under torch.distributed every rank ends with rank 0's choice (gloo, CPU processes).

Each rank gets a fake timer that favours a *different* implementation, and rank 1 even has its own
disk cache saying something else: all ranks must still end with rank 0's choice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import datetime, json, os, sys
    import torch
    import torch.distributed as dist
    import grouped_ops
    from grouped_ops import GroupedOpsError, dispatch
    from grouped_ops.tuning import store

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["GROUPED_OPS_CACHE_DIR"] = os.path.join(out, f"cache-{rank}")
    FAVOURITE = ["einsum", "loop", "masked_dense", "grouped_mm"][rank]

    def timer(name, fn, number):  # this rank's machine "measures" its favourite as fastest
        return 1e-6 if name == FAVOURITE else 1e-4

    def args(n, batch=16):  # a training layer: weight and bias need gradients
        g = torch.Generator().manual_seed(n)
        return (torch.randn(batch, n, 8, generator=g), torch.randn(n, 8, 8, generator=g).requires_grad_(),
                torch.randn(n, 8, generator=g).requires_grad_())

    def pair(d):
        return None if d is None else [d.impl, d.source]

    results = {}
    with dispatch.use_timer(timer):
        if rank == 1:  # before the job: this rank tuned the first signature alone, on its own disk
            results["own_disk"] = grouped_ops.prewarm("grouped_linear", *args(4)).impl
            dispatch.clear_memory()
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        # what the ranks have not agreed on is not known, whatever a rank's own disk says
        results["lookup_before"] = pair(grouped_ops.lookup("grouped_linear", *args(4)))
        grouped_ops.grouped_linear(*args(4))  # first sight in the job: rank 0 decides, all adopt
        results["call"] = pair(grouped_ops.lookup("grouped_linear", *args(4)))
        results["prewarm"] = pair(grouped_ops.prewarm("grouped_linear", *args(2)))
        g = torch.Generator().manual_seed(0)
        xs, w = torch.randn(16, 4, 32, generator=g), torch.softmax(torch.randn(16, 4, generator=g), -1)
        grouped_ops.weighted_combine(xs, w)
        results["combine"] = pair(grouped_ops.lookup("weighted_combine", xs, w))
        with torch.no_grad():  # the inference signature of that layer: one more agreement
            results["inference"] = pair(grouped_ops.prewarm("grouped_linear", *args(4)))

        os.environ["GROUPED_OPS_DISTRIBUTED"] = "0"  # opted out: each rank on its own
        results["local"] = pair(grouped_ops.prewarm("grouped_linear", *args(3)))
        del os.environ["GROUPED_OPS_DISTRIBUTED"]

        real_tune = dispatch._tune
        if rank == 0:  # rank 0 fails to decide: every rank must hear of it, none may hang
            def broken(spec, sig, s, at=None):
                raise RuntimeError("boom on rank 0")
            dispatch._tune = broken
        try:
            grouped_ops.prewarm("grouped_linear", *args(5))
            results["error"] = None
        except (RuntimeError, GroupedOpsError) as e:
            results["error"] = f"{type(e).__name__}: {e}"
        dispatch._tune = real_tune
    dist.barrier()
    results["disk"] = sorted(e["impl"] for e in store.DiskStore().entries())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_every_rank_ends_with_rank_0s_choice(tmp_path):
    world = 2
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GROUPED_OPS_TUNE_BUDGET_S": "0.01"}
    for var in ("GROUPED_OPS_IMPL", "GROUPED_OPS_AUTOTUNE", "GROUPED_OPS_DISTRIBUTED", "GROUPED_OPS_BUCKETS"):
        env.pop(var, None)
    init_file = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(init_file), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world))

    assert r1["own_disk"] == "loop"  # rank 1 alone would have chosen loop
    assert r0["lookup_before"] is None and r1["lookup_before"] is None
    for what in ("call", "prewarm", "combine", "inference"):
        assert r0[what][0] == r1[what][0], what
        assert r1[what][1] == "broadcast", what
    assert r0["call"] == ["einsum", "cache"]  # tuned by rank 0 on first sight, remembered since
    assert r0["prewarm"] == ["einsum", "tuned"]
    assert r0["combine"][0] == "einsum"
    assert r0["inference"] == ["einsum", "tuned"]
    # GROUPED_OPS_DISTRIBUTED=0: each rank keeps its own measurement
    assert r0["local"] == ["einsum", "tuned"] and r1["local"] == ["loop", "tuned"]
    # a failure on rank 0 reaches every rank instead of leaving them waiting
    assert r0["error"] == "RuntimeError: boom on rank 0"
    assert r1["error"].startswith("GroupedOpsError: grouped_linear: rank 0 failed to decide")
    # only rank 0 writes; rank 1's disk holds what it tuned before the job
    assert r0["disk"] == ["einsum"] * 5
    assert r1["disk"] == ["loop"]
