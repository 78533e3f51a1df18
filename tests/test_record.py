"""Recording the signatures a run needs, saving them, and prewarming them (here or in another
process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import gl_args, gl_request
from torch import nn

import grouped_ops
from grouped_ops import GroupedOpsError, dispatch, use_impl
from grouped_ops.recording import prewarm_signatures
from grouped_ops.signature import Signature

REPO = Path(__file__).resolve().parents[1]


# ---- record, save, prewarm in another process --------------------------------------------------------

def test_record_then_prewarm_in_another_process_then_lookup(tmp_path, monkeypatch):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = grouped_ops.GroupedLinear(4, 8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.heads(x)  # [b, 4, 8]
            return grouped_ops.weighted_combine(list(h.unbind(1)), torch.softmax(h.mean(-1), -1))

    model = Model()
    x = torch.randn(24, 4, 8)
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")  # recording needs no tuning
    with grouped_ops.record() as rec:
        with torch.no_grad():
            model(x)
        model(x).sum().backward()  # training: other signatures
    assert len(rec.signatures) == 4
    path = tmp_path / "signatures.jsonl"
    rec.save(path)
    assert [Signature.from_spec(json.loads(line)) for line in path.read_text().splitlines()] == rec.signatures

    env = {**os.environ, "GROUPED_OPS_AUTOTUNE": "1", "GROUPED_OPS_TUNE_BUDGET_S": "0.01",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "grouped_ops", "prewarm", "--from", str(path), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "prewarmed 4 signature(s): 4 tuned" in proc.stdout

    dispatch.clear_memory()
    chosen = {}
    for line in proc.stdout.splitlines():
        if line.strip().startswith("-> "):
            chosen.setdefault(len(chosen), line.split()[1])
    with torch.no_grad():
        d = grouped_ops.lookup("grouped_linear", x, model.heads.weight, model.heads.bias)
    assert d is not None and d.source == "cache" and d.impl == chosen[0]
    assert d.timings  # every candidate's timing came along
    trained = grouped_ops.lookup("grouped_linear", x, model.heads.weight, model.heads.bias)
    assert trained is not None and trained.source == "cache" and trained.signature.grad == ("weight", "bias")


# ---- prewarming a recording --------------------------------------------------------------------------

def test_a_signature_already_known_is_not_tuned_again(tunings):
    request = gl_request()
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        prewarm_signatures([request])
        assert len(tunings.only) == 2
        (d,) = prewarm_signatures([request])
    assert (d.source, d.opinions, len(tunings.only)) == ("cache", ("bmm", "bmm"), 2)


def test_a_recording_tunes_each_bucket_at_its_first_calls_batch(tunings, tmp_path):
    with grouped_ops.record() as rec, use_impl("loop"):
        for batch in (300, 400, 8):  # 300 and 400 share the bucket 512
            grouped_ops.grouped_linear(*gl_args(batch))
    assert [(s.dim("batch"), at.dim("batch")) for s, at in rec.requests()] == [(512, 300), (8, 8)]
    path = tmp_path / "signatures.jsonl"
    rec.save(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["dims"]["batch"], line["tune_at_batch"]) for line in lines] == [(512, 300), (8, 8)]
    from grouped_ops.cli import signatures_from_file
    assert signatures_from_file(path) == rec.requests()

    with dispatch.use_timer(tunings.timer([{"bmm": 1e-4}])):
        decisions = rec.prewarm()
    assert tunings.batches == [300, 8]  # not 512, the bucket's edge
    assert [d.signature.dim("batch") for d in decisions] == [512, 8]


@pytest.mark.parametrize("bad", [0, 200, 513, "300", True])
def test_a_recorded_file_with_a_batch_outside_its_bucket_is_refused(tmp_path, bad):
    from grouped_ops.cli import signatures_from_file
    sig, _ = gl_request(300)
    path = tmp_path / "signatures.jsonl"
    path.write_text("# a comment\n" + json.dumps({**sig.to_spec(), "tune_at_batch": bad}) + "\n")
    with pytest.raises(GroupedOpsError, match=r"signatures.jsonl:2: tune_at_batch=.* batch=512"):
        signatures_from_file(path)
    path.write_text(json.dumps(sig.to_spec()) + "\n")  # files saved before tune_at_batch: the bucket's size
    assert signatures_from_file(path) == [(sig, None)]


def test_a_hand_written_line_in_another_order_is_keyed_as_the_ops_own_calls(tmp_path):
    # The key is a string in the order the op describes a call; a line listing the layout, dims or
    # grad in another order (json.dumps(sort_keys=True), by hand) used to be tuned under a key no
    # call makes. Now it is put in the call's order; names the op does not describe are refused.
    from grouped_ops.cli import signatures_from_file
    sig, _ = gl_request(8)
    line = sig.to_spec()
    line["layout"] = dict(reversed(list(line["layout"].items())))
    line["dims"] = dict(reversed(list(line["dims"].items())))
    path = tmp_path / "signatures.jsonl"
    path.write_text(json.dumps(line, sort_keys=True) + "\n")
    assert [s.key() for s, _ in signatures_from_file(path)] == [sig.key()]
    training = {**line, "grad": ["bias", "weight", "input"]}
    path.write_text(json.dumps(training) + "\n")
    assert signatures_from_file(path)[0][0].grad == ("input", "weight", "bias")
    for bad, message in (({**line, "layout": {**line["layout"], "colour": "red"}}, "layout .* do not match"),
                         ({**line, "grad": ["offsets"]}, "grad .* cannot take")):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(GroupedOpsError, match=f"signatures.jsonl:1: {message}"):
            signatures_from_file(path)


# ---- prewarm and lookup take the public function's arguments -----------------------------------------

def _public_calls():
    x, w = torch.randn(16, 4, 64, dtype=torch.bfloat16), torch.rand(16, 4)  # float32 routing weights
    rows, inverse = torch.randn(12, 8, dtype=torch.bfloat16), torch.arange(12).view(6, 2)
    xr, wr = torch.randn(6, 8), torch.randn(3, 8, 8)
    return [
        (grouped_ops.weighted_combine, (x, w), {"out_dtype": torch.bfloat16}),
        (grouped_ops.weighted_combine, (list(x.unbind(1)), w), {}),  # type promotion: float32
        (grouped_ops.unpermute_combine, (rows, inverse, torch.rand(6, 2)), {"out_dtype": torch.bfloat16}),
        (grouped_ops.grouped_linear, (xr, wr), {"offsets": torch.tensor([2, 4, 6])}),
        (grouped_ops.grouped_linear, (xr, wr, None), {"group_sizes": [2, 0, 4]}),
    ]


@pytest.mark.parametrize("call", range(5))
def test_prewarm_and_lookup_key_a_public_call_as_the_call_does(call):
    fn, args, kwargs = _public_calls()[call]
    with grouped_ops.record() as rec:
        fn(*args, **kwargs)
    (called,) = rec.signatures
    with use_impl(grouped_ops.implementations(called.op)[0]):  # (forced: nothing is timed)
        assert grouped_ops.prewarm(fn, *args, **kwargs).signature == called
        assert grouped_ops.lookup(fn.__name__, *args, **kwargs).signature == called


def test_progress_off_a_terminal_is_lines_not_a_bar(capsys, monkeypatch):
    from grouped_ops import recording

    monkeypatch.setattr(recording, "PROGRESS_LINE_S", 3600.0)
    sig = gl_request(4)[0]
    with recording.progress_bar(True) as report:
        for done in range(1, 6):
            report(done, 5, sig, "decided")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [f"prewarm: 1/5 ({sig.op} batch=4 decided)",
                                                    f"prewarm: 5/5 ({sig.op} batch=4 decided)"]
