"""torch.distributed (gloo, CPU processes): ranks agree by signature at collective prewarms, and an
op call never enters a collective (see grouped_ops/dispatch/distributed.py).

Each rank gets a fake timer that favours a different implementation, so what a rank ends with says
who decided it.
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

COMMON = textwrap.dedent("""
    import datetime, json, os, sys
    import torch
    import torch.distributed as dist
    import grouped_ops
    from grouped_ops import GroupedOpsError, dispatch
    from grouped_ops.tuning import harness, store

    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["GROUPED_OPS_CACHE_DIR"] = os.path.join(out, f"cache-{rank}")
    FAVOURITE = ["einsum", "loop"][rank]

    def timer(name, fn, number):  # this rank's machine "measures" its favourite as fastest
        return 1e-6 if name == FAVOURITE else 1e-4

    def args(n, batch=16, grad=True):
        g = torch.Generator().manual_seed(n)
        return (torch.randn(batch, n, 8, generator=g), torch.randn(n, 8, 8, generator=g).requires_grad_(grad),
                torch.randn(n, 8, generator=g).requires_grad_(grad))

    def pair(d):
        return None if d is None else [d.impl, d.source]

    def finish(results):  # write this rank's results, then leave together
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # skip interpreter teardown: a gloo/FSDP background thread once aborted it ("terminate called")

    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
""")

AGREEMENT = COMMON + textwrap.dedent("""
    g = torch.Generator().manual_seed(0)
    xs, w = torch.randn(16, 4, 32, generator=g), torch.softmax(torch.randn(16, 4, generator=g), -1)
    with dispatch.use_timer(timer):
        # first sights in different orders: no collective, each rank decides locally
        if rank == 0:
            grouped_ops.grouped_linear(*args(4)); grouped_ops.weighted_combine(xs, w)
        else:
            grouped_ops.weighted_combine(xs, w); grouped_ops.grouped_linear(*args(4))
        results["local"] = pair(grouped_ops.lookup("grouped_linear", *args(4)))
        results["local_combine"] = pair(grouped_ops.lookup("weighted_combine", xs, w))
        # a collective prewarm with different sets of signatures on each rank
        with grouped_ops.record() as rec:
            if rank == 0:
                grouped_ops.grouped_linear(*args(2)); grouped_ops.grouped_linear(*args(3))
            else:
                grouped_ops.weighted_combine(xs[:5], w[:5])
        decided = rec.prewarm()
        results["prewarm"] = [[d.signature.op, d.impl, d.source] for d in decided]
        if rank == 1:
            results["after"] = pair(grouped_ops.lookup("weighted_combine", xs[:5], w[:5]))
        # a failure on rank 0 reaches every rank instead of leaving them waiting
        real = harness.measure
        if rank == 0:
            def broken(*a, **k):
                raise RuntimeError("boom on rank 0")
            harness.measure = broken
        try:
            grouped_ops.prewarm("grouped_linear", *args(5))
            results["error"] = None
        except (RuntimeError, GroupedOpsError) as e:
            results["error"] = f"{type(e).__name__}: {e}"
        harness.measure = real
        os.environ["GROUPED_OPS_DISTRIBUTED"] = "0"  # opted out: a prewarm is each rank's own
        results["opted_out"] = pair(grouped_ops.prewarm("grouped_linear", *args(6)))
    finish(results)
""")

DDP_VALIDATION = COMMON + textwrap.dedent("""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(kind):
        torch.manual_seed(0)
        linears = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        if kind == "grouped":
            return nn.Sequential(grouped_ops.GroupedLinear.from_linears(linears), nn.ReLU(inplace=True))
        class Loop(nn.Module):
            def __init__(self):
                super().__init__()
                self.linears = linears
            def forward(self, x):
                return torch.stack([lin(x[:, i]) for i, lin in enumerate(self.linears)], 1).relu()
        return Loop()

    final = {}
    with dispatch.use_timer(timer):
        for kind in ("grouped", "loop"):
            model = DDP(build(kind))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(3):
                g = torch.Generator().manual_seed(100 * step + rank)
                x = torch.randn(16, 4, 8, generator=g)
                opt.zero_grad()
                model(x).pow(2).mean().backward()  # DDP all-reduces the gradients here
                opt.step()
                if rank == 0:  # validation on rank 0 alone, at a batch size never seen: a new signature
                    with torch.no_grad():
                        model.module(torch.randn(7 + step, 4, 8))
            final[kind] = [p.detach().flatten().tolist() for p in model.module.parameters()]
    gathered = [None] * world
    dist.all_gather_object(gathered, final)
    results["final"] = gathered
    finish(results)
""")

FSDP_INPLACE = COMMON + textwrap.dedent("""
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    losses = {}
    for impl in grouped_ops.implementations("grouped_linear"):
        torch.manual_seed(0)
        model = nn.Sequential(grouped_ops.GroupedLinear(4, 16, 16, impl=impl), nn.ReLU(inplace=True),
                              grouped_ops.GroupedLinear(4, 16, 8, impl=impl))
        try:
            model(torch.randn(2, 4, 16))
        except GroupedOpsError:
            continue  # not supported on this machine
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
        losses[impl] = float(loss)
    results["losses"] = losses
    finish(results)
""")

FSDP_PER_LAYER = COMMON + textwrap.dedent("""
    import copy
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    diffs = {}
    for bias in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(grouped_ops.GroupedLinear(4, 16, 16, bias=bias), nn.ReLU(inplace=True),
                              grouped_ops.GroupedLinear(4, 16, 8, bias=bias))
        reference = copy.deepcopy(model)
        for layer in (model[0], model[2]):  # each layer sharded on its own, then the root
            fully_shard(layer)
        fully_shard(model)
        x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(1))  # the same on every rank
        y = model(x)
        y.pow(2).mean().backward()
        reference(x).pow(2).mean().backward()
        got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        want = {n: p.grad for n, p in reference.named_parameters()}
        diffs[str(bias)] = {n: float((got[n] - want[n]).abs().max()) for n in want}
        diffs[str(bias)]["(output)"] = float((y.detach() - reference(x).detach()).abs().max())
    results["diffs"] = diffs
    finish(results)
""")


def run_ranks(tmp_path: Path, script: str, world: int = 2) -> list[dict]:
    path = tmp_path / "worker.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "GROUPED_OPS_TUNE_BUDGET_S": "0.01"}
    for var in ("GROUPED_OPS_IMPL", "GROUPED_OPS_AUTOTUNE", "GROUPED_OPS_DISTRIBUTED", "GROUPED_OPS_BUCKETS",
                "GROUPED_OPS_EXCLUDE"):
        env.pop(var, None)
    init_file = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, str(path), str(r), str(world), str(init_file), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


@needs_dist
def test_ranks_agree_by_signature_at_prewarm_and_decide_locally_otherwise(tmp_path):
    r0, r1 = run_ranks(tmp_path, AGREEMENT)
    # first calls: each rank its own pick, whatever order the ranks saw the signatures in
    assert r0["local"] == ["einsum", "cache"] and r1["local"] == ["loop", "cache"]
    assert r0["local_combine"][0] == "einsum" and r1["local_combine"][0] == "loop"
    # prewarm with different sets: each rank gets rank 0's decision for its own signatures only
    assert [p[:2] for p in r0["prewarm"]] == [["grouped_linear", "einsum"], ["grouped_linear", "einsum"]]
    assert r1["prewarm"] == [["weighted_combine", "einsum", "broadcast"]]
    assert r1["after"] == ["einsum", "broadcast"]
    assert r0["error"] == "RuntimeError: boom on rank 0"
    assert r1["error"].startswith("GroupedOpsError: prewarm: rank 0 failed to decide")
    assert r0["opted_out"] == ["einsum", "tuned"] and r1["opted_out"] == ["loop", "tuned"]


@needs_dist
def test_ddp_with_validation_on_rank_0_alone_trains_as_the_module_list_does(tmp_path):
    r0, r1 = run_ranks(tmp_path, DDP_VALIDATION)
    for gathered in (r0["final"], r1["final"]):
        ranks = [{k: [torch.tensor(p) for p in v] for k, v in rank.items()} for rank in gathered]
        for kind in ("grouped", "loop"):  # DDP kept the ranks in step
            for a, b in zip(ranks[0][kind], ranks[1][kind], strict=True):
                torch.testing.assert_close(a, b)
        grouped, loop = ranks[0]["grouped"], ranks[0]["loop"]
        torch.testing.assert_close(grouped[0].reshape(4, 8, 8), torch.stack(loop[0::2]).reshape(4, 8, 8))
        torch.testing.assert_close(grouped[1].reshape(4, 8), torch.stack(loop[1::2]).reshape(4, 8))


@needs_dist
def test_fsdp2_with_an_in_place_activation_trains_with_every_implementation(tmp_path):
    r0, r1 = run_ranks(tmp_path, FSDP_INPLACE)
    assert set(r0["losses"]) >= {"bmm", "einsum", "loop", "masked_dense"}
    for impl, loss in r0["losses"].items():
        assert loss == pytest.approx(r1["losses"][impl]), impl


def test_the_broadcast_carries_every_field_of_a_decision():
    # What rank 0 sends is rank 0's decision whole: the partial state and whether it was stored too.
    from grouped_ops.decision import Decision
    from grouped_ops.dispatch.distributed import _fields

    d = Decision("loop", "tuned", {"loop": 1e-5, "bmm": 2e-5}, {"masked_dense": "over budget"}, None,
                 ("loop", "bmm", "loop"), partial="noise", tunings=2, stored=True)
    sent = json.loads(json.dumps(_fields(d)))
    assert Decision(**{**sent, "opinions": tuple(sent["opinions"])}) == d
    assert {"partial", "tunings", "stored", "not_stored", "provisional"} <= set(sent)


@needs_dist
def test_fsdp2_with_each_layer_sharded_and_an_in_place_activation_matches_the_unsharded_gradients(tmp_path):
    # the group-major result is a tensor of its own: ReLU(inplace=True) on it works with per-layer
    # FSDP2 (where an ordinary view of an intermediate fails), bias on and off
    for rank in run_ranks(tmp_path, FSDP_PER_LAYER):
        for bias, diffs in rank["diffs"].items():
            assert len(diffs) == (5 if bias == "True" else 3), diffs
            assert max(diffs.values()) < 1e-5, (bias, diffs)
