"""``python -m grouped_ops``: every subcommand runs and says something sensible.

Most tests call ``main(argv)`` in this process with a fake timer (fast, deterministic); one runs the
real module in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grouped_ops
from grouped_ops import cli, dispatch
from grouped_ops.ops import SPECS
from grouped_ops.tuning import store

REPO = Path(__file__).resolve().parents[1]
GL_FLAGS = ["grouped_linear", "--batch", "100", "--groups", "8", "--in", "16", "--out", "16"]
WC_FLAGS = ["weighted_combine", "--batch", "64", "--k", "8", "--features", "4x4x4", "--list"]


def fake_timer(name, fn, number):
    return {"einsum": 1e-5}.get(name, 2e-5)


@pytest.fixture(autouse=True)
def _fake_timer():
    with dispatch.use_timer(fake_timer):
        yield


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "prewarm", "explain", "cache", "bench"):
        assert command in out
    assert run(capsys, )[0] == 2  # no command: the help, and a failing status


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"grouped_ops {grouped_ops.__version__}"


def test_demo_shows_matching_results_the_choice_and_the_speed_up(capsys):
    code, out, _ = run(capsys, "demo", "--batch", "16", "--groups", "4", "--in", "8", "--out", "8", "--train")
    assert code == 0
    assert out.count("results match: yes") == 2
    assert "auto chose einsum (tuned)" in out
    for name in SPECS["grouped_linear"].registry:
        assert name in out  # every candidate's timing
    assert out.count("speed-up x") == 3  # grouped_linear inference and training, weighted_combine
    assert out.count("impl=einsum:") == 3  # auto next to its choice forced, measured the same way
    assert "timed while it decided" in out  # says why the live times and the tuner's table differ


def test_demo_and_cache_path_print_the_cache_folder_the_same_way(capsys):
    _, path, _ = run(capsys, "cache", "path")
    code, out, _ = run(capsys, "demo", "--batch", "4", "--groups", "2", "--in", "4", "--out", "4")
    assert code == 0 and f"cache folder: {path.strip()}\n" in out
    code, out, _ = run(capsys, "prewarm", *GL_FLAGS, "--no-progress")
    assert out.rstrip().endswith(f"cache folder: {path.strip()}")


# ---- prewarm -----------------------------------------------------------------------------------------

def test_prewarm_from_the_command_line(capsys):
    code, out, err = run(capsys, "prewarm", *GL_FLAGS[:3], "1", "3", *GL_FLAGS[3:], "--grad", "--no-bias")
    assert code == 0, err
    assert out.count("-> einsum (tuned)") == 3  # batch 1, 100 and 3 -> buckets 1, 128, 4
    assert "prewarmed 3 signature(s): 3 tuned" in out
    assert "3/3" in err  # the progress bar
    found = list(store.DiskStore().entries())
    assert sorted(e["signature"]["dims"]["batch"] for e in found) == [1, 4, 128]
    assert {tuple(e["signature"]["grad"]) for e in found} == {("weight",)}
    code, out, _ = run(capsys, "prewarm", *GL_FLAGS, "--grad", "--no-bias", "--no-progress", "--table")
    assert "1 cache" in out and " * einsum" in out


def test_a_bucketed_batch_says_it_is_a_bucket(capsys):
    code, out, _ = run(capsys, "prewarm", *GL_FLAGS, "--no-progress")  # batch 100 -> the bucket 128
    assert code == 0 and "batch=128 is a bucket: batch sizes 65..128 share this decision" in out
    code, out, _ = run(capsys, "explain", *GL_FLAGS, "--no-tune")
    assert "batch=128 is a bucket" in out
    code, out, _ = run(capsys, "cache", "list")
    assert "batch=128" in out and "batch=B in a key is a bucket" in out


def test_prewarm_weighted_combine(capsys):
    code, out, _ = run(capsys, "prewarm", *WC_FLAGS, "--no-progress")
    assert code == 0
    assert "weighted_combine(batch=64, k=8, features=64" in out and "inputs=list" in out


def test_a_cli_signature_is_the_one_a_real_call_makes(capsys):
    # prewarm from flags, then call the op for real: the call must find that decision
    run(capsys, "prewarm", *GL_FLAGS, "--grad", "--weight-layout", "transposed", "--no-progress")
    x = torch.randn(100, 8, 16)
    w = torch.randn(8, 16, 16).transpose(1, 2).requires_grad_()  # stored [n, in, out]
    b = torch.randn(8, 16, requires_grad=True)
    d = grouped_ops.lookup("grouped_linear", x, w, b)
    assert d is not None and d.impl == "einsum"
    outs = [torch.randn(64, 4, 4, 4) for _ in range(8)]
    run(capsys, "prewarm", *WC_FLAGS, "--no-progress")
    d = grouped_ops.lookup("weighted_combine", outs, torch.rand(64, 8))
    assert d is not None and d.impl == "einsum"


def test_prewarm_from_a_recorded_file(tmp_path, capsys, monkeypatch):
    layer = grouped_ops.GroupedLinear(4, 8, 8)
    x = torch.randn(12, 4, 8)
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    with grouped_ops.record() as rec:
        layer(x)
        grouped_ops.weighted_combine(list(x.unbind(1)), torch.rand(12, 4))
    monkeypatch.delenv("GROUPED_OPS_AUTOTUNE")
    path = tmp_path / "sigs.jsonl"
    rec.save(path)
    dispatch.clear_memory()
    code, out, _ = run(capsys, "prewarm", "--from", str(path), "--no-progress")
    assert code == 0 and "prewarmed 2 signature(s): 2 tuned" in out
    dispatch.clear_memory()
    assert grouped_ops.lookup("grouped_linear", x, layer.weight, layer.bias).source == "cache"


@pytest.mark.parametrize("argv, message", [
    (["prewarm"], "give an op"),
    (["prewarm", "--from", "/no/such/file.jsonl"], "cannot read"),
    (["prewarm", *GL_FLAGS, "--dtype", "float33"], "unknown dtype 'float33'"),
    (["prewarm", *GL_FLAGS, "--device", "meta"], "only cpu and cuda"),
    (["prewarm", *GL_FLAGS, "--device", "tpu"], "unknown device 'tpu'"),
    (["explain", *GL_FLAGS[:3], "1", "2", *GL_FLAGS[3:]], "unrecognized arguments: 1 2"),
])
def test_prewarm_errors_are_one_readable_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_prewarm_from_a_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('# a comment\n{"op": "grouped_conv", "dims": {"batch": 1}}\n')
    code, _, err = run(capsys, "prewarm", "--from", str(path))
    assert code == 2 and "bad.jsonl:2: unknown op 'grouped_conv'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_prewarm_for_cuda_without_cuda(capsys):
    code, _, err = run(capsys, "prewarm", *GL_FLAGS, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_autotune_off_prewarm_writes_nothing(capsys, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    code, out, err = run(capsys, "prewarm", *GL_FLAGS, "--no-progress")
    assert code == 0 and "-> bmm (default)" in out and "GROUPED_OPS_AUTOTUNE=0" in err
    assert list(store.DiskStore().entries()) == []


# ---- explain -----------------------------------------------------------------------------------------

def test_explain_times_every_candidate(capsys):
    code, out, _ = run(capsys, "explain", *GL_FLAGS)
    assert code == 0
    assert "decision:  einsum (tuned" in out
    assert "key:       grouped_linear(n=8,in=16,out=16) float32 cpu[" in out
    names = set(SPECS["grouped_linear"].registry)
    rows = {word: line for line in out.splitlines() for word in line.replace("*", " ").split()[:1] if word in names}
    assert set(rows) == names
    assert "20.0 us" in rows["bmm"] and "x2.00" in rows["bmm"]
    assert run(capsys, "explain", *GL_FLAGS)[1].count("(cache:") == 1  # the second time: remembered


def test_explain_says_why_a_candidate_is_not_timed(capsys):
    code, out, _ = run(capsys, "explain", "grouped_linear", "--batch", "4", "--groups", "2", "--in", "6",
                       "--out", "6", "--dtype", "float64", "--no-tune")
    assert code == 0
    assert "none yet" in out and "default rule (bmm)" in out
    assert "unsupported: dtype float64 not in" in out and "in=6 is not a multiple of 2" not in out
    assert list(store.DiskStore().entries()) == []  # --no-tune times and writes nothing


def test_explain_over_the_memory_budget(capsys, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_TUNE_MEMORY_BYTES", "1000")
    code, out, _ = run(capsys, "explain", *GL_FLAGS)
    masked = next(line for line in out.splitlines() if line.lstrip(" *").startswith("masked_dense "))
    assert "over the tuning memory budget" in masked


# ---- cache -------------------------------------------------------------------------------------------

def test_cache_list_show_clear_export_import(tmp_path, capsys, shipped_tables):
    run(capsys, "prewarm", *GL_FLAGS[:3], "1", "100", *GL_FLAGS[3:], "--no-progress")
    run(capsys, "prewarm", *WC_FLAGS, "--no-progress")
    root = store.DiskStore().root

    assert run(capsys, "cache", "path")[1].strip() == str(root)
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0 and f"cache folder: {root}" in out and "3 of 3 entries" in out
    assert out.count("einsum") == 3 and out.count("fresh") == 3
    assert "1 of 3 entries matching 'weighted'" in run(capsys, "cache", "list", "weighted")[1]

    key = next(e["key"] for e in store.DiskStore().entries() if e["key"].startswith("weighted_combine"))
    code, out, _ = run(capsys, "cache", "show", key)
    assert code == 0 and out.startswith(key) and "impl:        einsum (fresh)" in out and " * einsum" in out
    assert "fingerprint: cuda=" in out
    code, out, _ = run(capsys, "cache", "show", "no-such-signature")
    assert code == 1 and "no entry matches" in out

    table = tmp_path / "exported.json"
    assert "exported 3 entries" in run(capsys, "cache", "export", str(table))[1]
    assert json.loads(table.read_text())["format"] == store.FORMAT
    assert "removed 1 entries" in run(capsys, "cache", "clear", "weighted")[1]
    assert "removed 2 entries" in run(capsys, "cache", "clear")[1]
    assert "0 of 0 entries" in run(capsys, "cache", "list")[1]
    assert "imported 3 of 3 entries" in run(capsys, "cache", "import", str(table))[1]
    assert "3 of 3 entries" in run(capsys, "cache", "list")[1]
    code, _, err = run(capsys, "cache", "import", str(tmp_path / "missing.json"))
    assert code == 2 and "no such file" in err

    # the same file as a shipped table
    (shipped_tables / "reference.json").write_bytes(table.read_bytes())
    code, out, _ = run(capsys, "cache", "list", "--shipped")
    assert code == 0 and "reference.json: 3 entries" in out
    assert run(capsys, "cache", "show", "--shipped", "weighted")[1].startswith("weighted_combine")


def test_an_empty_user_cache_points_at_the_shipped_tables(capsys, shipped_tables):
    run(capsys, "prewarm", *GL_FLAGS, "--no-progress")
    table = shipped_tables / "reference.json"
    store.write_table(table, store.DiskStore().entries())
    assert "removed 1 entries" in run(capsys, "cache", "clear")[1]
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0 and "0 of 0 entries" in out and "(1 in the shipped tables: `cache list --shipped`)" in out
    out = run(capsys, "cache", "list", "n=8")[1]
    assert "(1 in the shipped tables: `cache list --shipped n=8`)" in out
    assert "shipped" not in run(capsys, "cache", "list", "weighted")[1]  # no shipped entry matches either
    code, out, _ = run(capsys, "cache", "show", "n=8")
    assert code == 1 and "1 in the shipped tables: `cache show --shipped n=8`" in out


def test_cache_show_says_a_keys_batch_is_a_bucket_and_lines_up_long_names(capsys):
    run(capsys, "prewarm", *GL_FLAGS, "--no-progress")
    out = run(capsys, "cache", "show", "batch=128")[1]
    assert "batch=128" in out and "(batch=B in a key is a bucket" in out
    entry = next(iter(store.DiskStore().entries()))
    store.DiskStore().put({**entry, "impl": "bmm_weight_left"})
    listed = [line for line in run(capsys, "cache", "list")[1].splitlines() if line.startswith("  ")]
    assert listed[0].split()[:2] == ["bmm_weight_left", "fresh"]
    assert listed[0].index("fresh") == 2 + max(len(n) for spec in SPECS.values() for n in spec.registry) + 1


def test_a_stale_entry_is_listed_as_stale(capsys):
    run(capsys, "prewarm", *GL_FLAGS, "--no-progress")
    (entry,) = store.DiskStore().entries()
    entry["fingerprint"]["torch"] = "1.0.0"
    store.DiskStore().put(entry)
    assert "stale" in run(capsys, "cache", "list")[1]


# ---- bench -------------------------------------------------------------------------------------------

def test_bench_is_wired_when_present(capsys):
    pytest.importorskip("grouped_ops.bench")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_bench_missing_says_so(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "grouped_ops.bench", None)  # import fails, as before bench.py existed
    code, _, err = run(capsys, "bench", "--quick")
    assert code == 2 and "not available" in err


# ---- the parser ----------------------------------------------------------------------------------------

def _actions(parser):
    """Every (command path, action) of ``parser`` and its subcommands, recursively."""
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):  # subparsers
            for name, sub in action.choices.items():
                for path, a in _actions(sub):
                    yield f"{name} {path}".strip(), a
        else:
            yield "", action


def test_every_option_has_help_text():
    parser = cli.build_parser(["bench"])  # "bench" in argv: the sweep's options too
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, a in _actions(parser)
               if a.help is None]
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_help_uses_no_project_internal_words(capsys):
    parser = cli.build_parser(["bench"])
    texts = [a.help or "" for _, a in _actions(parser)]
    words = ("seed 000", "seed-000", "no GPU was lent", "session")
    assert not [t for t in texts if any(w in t for w in words)]


# ---- the real entry point ----------------------------------------------------------------------------

def test_python_dash_m_grouped_ops(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GROUPED_OPS_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "grouped_ops", "cache", "path"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "c" / f"v{store.FORMAT}")


@pytest.mark.parametrize("argv", [["--help"], ["cache", "list"]])
def test_output_piped_to_a_closed_reader_is_not_a_traceback(tmp_path, argv):
    # `python -m grouped_ops ... | head`: the reader goes away before the output is written
    env = {**os.environ, "PYTHONPATH": str(REPO), "GROUPED_OPS_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.Popen([sys.executable, "-m", "grouped_ops", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # closed before the interpreter has even imported torch
    err = proc.stderr.read().decode()
    proc.stderr.close()
    # argparse itself ignores a failed write of --help (status 0); our own output ends with 141
    assert proc.wait(timeout=120) in (0, cli.BROKEN_PIPE), err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_piping_into_head_in_a_shell(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GROUPED_OPS_CACHE_DIR": str(tmp_path / "c")}
    cmd = f"{sys.executable} -m grouped_ops bench --help | head -n 1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.startswith("usage:") and "Traceback" not in proc.stderr, proc.stderr


def test_cli_prewarm_tunes_at_the_given_batch_and_tunes_close_calls_again(tunings, capsys):
    from grouped_ops.cli import main
    argv = ["prewarm", "grouped_linear", "--batch", "300", "8", "--groups", "4", "--in", "8", "--out", "8",
            "--no-progress"]
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        assert main(argv) == 0
    assert tunings.batches == [300, 8, 300, 8]
    out = capsys.readouterr().out
    assert "(picks of 2 tunings: bmm, bmm)" in out
    assert "prewarmed 2 signature(s): 2 tuned (2 close call(s) tuned again)" in out
    dispatch.clear_memory()
    store.DiskStore().clear()
    tunings.batches.clear()
    with dispatch.use_timer(tunings.timer([{"bmm": 1.0e-4, "einsum": 1.05e-4}])):
        assert main([*argv, "--single-opinion"]) == 0
    assert tunings.batches == [300, 8]


@pytest.mark.parametrize(("argv", "message"), [
    (["--dtype", "int8"], "argument --dtype: 'int8' is not supported"),
    (["--dtype", "float8_e4m3fn"], "argument --dtype: 'float8_e4m3fn' is not supported"),
    (["--batch", "99999999999999999999"], "argument --batch: must be a positive integer up to 2**40"),
])
def test_bad_values_are_usage_errors_naming_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "grouped_linear", "--batch", "8", "--groups", "4", "--in", "8", "--out", "8", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_negative_feature_dim_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "weighted_combine", "--batch", "8", "--k", "4", "--features", "4x-1x-2"])
    assert e.value.code == 2 and "every feature dim must be positive" in capsys.readouterr().err


def test_cli_prewarm_says_what_it_could_not_store_and_what_is_noisy(capsys, tmp_path, monkeypatch):
    from test_busy_spell import Unsettled

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    code, out, _ = run(capsys, "prewarm", "--no-progress", *GL_FLAGS)
    assert code == 0 and "1 not stored:" in out and "is not writable" in out

    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path / "cache"))
    dispatch.clear_memory()  # another process
    with dispatch.use_timer(Unsettled()):
        code, out, _ = run(capsys, "prewarm", "--no-progress", "--single-opinion", *GL_FLAGS)
    assert code == 0 and "partial: noise" in out and "1 marked as measured under noise" in out
    assert "not stored" not in out
    code, out, _ = run(capsys, "cache", "list")
    assert "[partial: noise, 2 tuning(s)]" in out  # tuned once more a pass later: noisy again, kept
    code, out, _ = run(capsys, "cache", "export", str(tmp_path / "table.json"))
    assert "exported 0 entries" in out and "left out 1 partial" in out
    assert json.loads((tmp_path / "table.json").read_text())["entries"] == []


def test_cli_prewarm_retune_measures_what_the_cache_answers(capsys, count_tunings):
    run(capsys, "prewarm", "--no-progress", "--single-opinion", *GL_FLAGS)
    code, out, _ = run(capsys, "prewarm", "--no-progress", "--single-opinion", *GL_FLAGS)
    assert "(cache)" in out and sum(count_tunings.values()) == 1
    code, out, _ = run(capsys, "prewarm", "--no-progress", "--single-opinion", "--retune", *GL_FLAGS)
    assert code == 0 and "(tuned)" in out and sum(count_tunings.values()) == 2


def test_prewarm_retune_measures_what_a_shipped_table_answers(shipped_tables, count_tunings):
    x, w = torch.randn(8, 4, 16), torch.randn(4, 8, 16)
    d = grouped_ops.prewarm("grouped_linear", x, w)
    entry = next(store.DiskStore().entries())
    store.write_table(shipped_tables / "table.json", [{**entry, "impl": "loop"}])
    store.DiskStore().clear()
    dispatch.clear_memory()
    assert grouped_ops.prewarm("grouped_linear", x, w).source == "shipped"
    again = grouped_ops.prewarm("grouped_linear", x, w, retune=True)
    assert (again.source, again.impl, again.stored) == ("tuned", d.impl, True)
    assert sum(count_tunings.values()) == 2
