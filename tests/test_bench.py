"""Smoke tests of the benchmark sweep (grouped_ops.bench) on a tiny grid: fast, no timing claims."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import pytest
import torch

from grouped_ops import bench
from grouped_ops.bench.claims import _seed_verdicts
from grouped_ops.ops import REGISTRIES

TINY = ["--quick", "--batch", "4", "--n", "4", "--in", "16", "--k", "2", "--wc-shapes", "4x8x4x4,4x32",
        "--cell-time", "0.01", "--reps", "2", "--min-sample-ms", "0.1", "--no-progress"]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="grouped_ops bench")
    bench.configure_parser(parser)
    return bench.run(parser.parse_args(list(argv)))


def test_tiny_sweep_prints_every_column_and_writes_every_file(tmp_path, capsys):
    md, csv_path, js = tmp_path / "out" / "b.md", tmp_path / "b.csv", tmp_path / "b.json"
    assert _run(*TINY, "--markdown", str(md), "--csv", str(csv_path), "--json", str(js)) == 0
    out = capsys.readouterr().out
    for name in [*REGISTRIES["grouped_linear"], *REGISTRIES["weighted_combine"], "auto", "loop",
                 "nn.ModuleList", "func.vmap", "TabM", "F.grouped_mm", "stack_mul_sum", "python_loop"]:
        assert name in out, name
    for heading in ("grouped_linear, float32, forward", "grouped_linear, float32, forward + backward",
                    "weighted_combine, float32, forward", "auto vs nn.ModuleList", "auto/best"):
        assert heading in out

    data = json.loads(js.read_text())
    machine = data["machine"]
    for key in ("cpu", "cpu_count", "torch", "device", "date", "command", "copy_GBps", "matmul_GFLOPs"):
        assert machine[key] not in (None, ""), key
    cells = data["cells"]
    assert {c["op"] for c in cells} == {"grouped_linear", "weighted_combine"}
    assert {c["pass"] for c in cells} == {"fwd", "fwdbwd"}
    assert {c["dims"]["layout"] for c in cells if c["op"] == "weighted_combine"} == {"stacked", "list"}
    for c in cells:
        assert c["skipped"] is None
        assert c["auto_impl"] in REGISTRIES[c["op"]]
        assert c["results"]["auto"]["median_s"] > 0
        assert c["results"]["loop"]["median_s"] > 0
        assert c["auto_vs_baseline"] > 0 and c["auto_over_best"] > 0
        assert not any(r["status"].startswith(("mismatch", "error")) for r in c["results"].values()), c

    rows = list(csv.DictReader(line for line in csv_path.read_text().splitlines() if not line.startswith("#")))
    assert {r["variant"] for r in rows} >= {"auto", "loop", "bmm", "nn.ModuleList", "stack_mul_sum"}
    assert any(line.startswith("# command:") for line in csv_path.read_text().splitlines())

    text = md.read_text()
    assert text.startswith("# grouped_ops benchmarks")
    assert "## grouped_linear, float32, forward" in text and "| batch | n | in->out |" in text
    assert "command:" in text and "torch" in text


def test_cells_over_the_caps_are_skipped_with_a_reason(capsys):
    assert _run(*TINY, "--ops", "grouped_linear", "--passes", "fwd", "--max-gflop", "1e-9") == 0
    out = capsys.readouterr().out
    assert "skipped:" in out and "GFLOP per call" in out and "--max-gflop" in out


def test_workspace_cap_skips_masked_dense_only_and_the_caller_state_is_restored(tmp_path, capsys):
    js = tmp_path / "b.json"
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    env = {k: os.environ.get(k) for k in ("GROUPED_OPS_CACHE_DIR", "GROUPED_OPS_TUNE_BUDGET_S")}
    # 10 KiB: bmm's 1 KiB product passes; masked_dense's 16 KiB block-diagonal weight does not
    assert _run(*TINY, "--ops", "grouped_linear", "--passes", "fwd", "--max-workspace-gb", "1e-5",
                "--threads", "1", "--tune-budget", "0.01", "--json", str(js)) == 0
    results = json.loads(js.read_text())["cells"][0]["results"]
    assert results["masked_dense"]["status"].startswith("skipped: needs")
    assert results["bmm"]["status"] == "ok"
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert env == {k: os.environ.get(k) for k in env}


def test_dry_run_times_nothing(capsys):
    assert _run("--full", "--dry-run", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "cells," in out and "to run" in out and "batch=2048 n=64 1024->1024" in out


def test_plot_writes_pngs_and_markdown_links_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    md = tmp_path / "b.md"
    assert _run(*TINY, "--passes", "fwd", "--plot", str(tmp_path / "plots"), "--markdown", str(md)) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["grouped_linear-float32-fwd.png", "weighted_combine-float32-fwd.png"]
    assert "](plots/grouped_linear-float32-fwd.png)" in md.read_text()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert _run(*TINY, "--plot", str(tmp_path)) == 2
    assert "pip install" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--dtypes", "int8"], ["--ops", "nope"], ["--passes", "bwd"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert _run(*TINY, *argv) == 2
    assert "bench:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert _run(*TINY, "--device", "cuda") == 2
    assert "cuda" in capsys.readouterr().err


def _seed_cell(claim: str, batch: int, n: int, size: int, loop: float, masked: float, dense: float) -> bench.Cell:
    cell = bench.Cell(bench.SEED, torch.float32, "fwd", {"batch": batch, "n": n, "in": size, "out": size}, claim=claim)
    for name, t in (("nn.ModuleList", loop), ("masked_dense", masked), ("dense", dense)):
        cell.results[name] = bench.Result("ok", t, t, t, 3, 1)
    return cell


def test_seed_verdicts_from_ratios():
    cells = [_seed_cell("batch", b, 32, 32, 1.0, m, m) for b, m in ((1, 0.05), (16, 0.06), (128, 0.08),
                                                                     (512, 0.3), (2048, 0.6))]
    cells += [_seed_cell("n", 128, n, s, 1.0, 2.0, 1.5) for n, s in ((2, 32), (4, 32), (8, 32), (4, 256), (8, 128))]
    cells += [_seed_cell("size", 128, 32, s, 1.0, m, m) for s, m in ((8, 0.05), (128, 0.3), (256, 0.6))]
    verdicts = {claim: verdict for claim, _, _, verdict in _seed_verdicts(cells)}
    assert verdicts["masked_dense ~10x faster than the loop"].startswith("holds")
    assert verdicts["masked_dense slower than the loop for n <= 8"].startswith("holds")
    assert verdicts["the gap shrinks as batch grows"].startswith("holds")
    assert verdicts["the gap shrinks as per-group size grows"].startswith("holds")

    slow = [_seed_cell("batch", b, 32, 32, 1.0, 2.0, 2.0) for b in (1, 16, 128)]
    verdicts = {claim: verdict for claim, _, _, verdict in _seed_verdicts(slow)}
    assert verdicts["masked_dense ~10x faster than the loop"].startswith("does not hold")


@pytest.mark.slow
def test_seed_check_runs(capsys):
    assert _run("--check-claims", "--dtypes", "float32", "--passes", "fwd", "--cell-time", "0.05",
                "--reps", "3", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "masked_dense claims, verdicts" in out and "verdict:" in out


def test_load_is_judged_per_core_and_the_warning_says_what_it_measured():
    from grouped_ops.bench.sweep import busy_warning
    assert busy_warning(0.88, 2, 2) is None  # an idle 2-core machine (this process importing torch)
    assert busy_warning(0.88, 1, 1) is not None
    text = busy_warning(3.0, 2, 2)
    assert text is not None and "3.00" in text and "2 logical cores" in text and "1.50 per core" in text


def test_claims_check_is_named_for_users_and_old_names_still_work(capsys):
    parser = argparse.ArgumentParser()
    bench.configure_parser(parser)
    assert parser.parse_args(["--check-seed"]).check_claims and parser.parse_args(["--check-claims"]).check_claims
    assert _run(*TINY, "--ops", "claims", "--passes", "fwd", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "batch=1 n=32 32->32" in out  # the claims' cells


def test_bench_checks_with_the_one_tolerance_table():
    from grouped_ops.bench import measurement
    from grouped_ops.registry import TOLERANCE
    assert not hasattr(measurement, "TOLERANCE") and not hasattr(bench, "TOLERANCE")
    assert TOLERANCE[torch.float32].agree == 5e-3 and TOLERANCE[torch.bfloat16].agree == 6e-2


@pytest.mark.parametrize(("extra", "expected"), [
    ([], ["--out"]),
    (["--quick", "--threads", "2", "--markdown", "out/peers.md"], ["--quick", "--threads", "2", "--out", "out/peers"]),
])
def test_bench_peers_runs_the_peers_comparison_with_the_options_that_apply(monkeypatch, extra, expected):
    from grouped_ops import cli
    from grouped_ops.bench import peers_report

    seen = {}
    monkeypatch.setattr(peers_report, "main", lambda argv, program: seen.update(argv=argv, program=program) or 0)
    assert cli.main(["bench", "--peers", *extra]) == 0
    assert seen["program"] == "python -m grouped_ops bench --peers"
    argv = seen["argv"] if extra else seen["argv"][:1]  # without --markdown: a temporary --out
    assert argv == expected
