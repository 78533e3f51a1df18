"""The cache on disk: concurrent writers, corruption, an unwritable folder, shipped tables, export/import."""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FakeTimer, make_stale

import grouped_ops
from grouped_ops import dispatch
from grouped_ops.ops import SPECS
from grouped_ops.tuning import store

GL = SPECS["grouped_linear"]
REPO = Path(__file__).resolve().parents[1]


def fake_timer(times: dict[str, float] | None = None, calls: collections.Counter | None = None):
    def timer(name, fn, number):
        if calls is not None:
            calls[name] += 1
        return (times or {}).get(name, 1e-4)
    return timer


def gl_args(batch: int = 8, n: int = 4, f: int = 8):
    g = torch.Generator().manual_seed(n)
    return torch.randn(batch, n, f, generator=g), torch.randn(n, f, f, generator=g), torch.randn(n, f, generator=g)


def entries() -> list[dict[str, Any]]:
    return list(store.DiskStore().entries())


def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "grouped_ops" and r.levelno == logging.WARNING]


# ---- concurrent writers ------------------------------------------------------------------------------

def _prewarm_worker(index: int, folder: str) -> None:
    """One writer: six signatures of its own (n = index + 1), then 20 rewrites of one shared key."""
    torch.set_num_threads(1)
    dispatch.clear_memory()
    (Path(folder) / f"ready-{index}").touch()
    while not (Path(folder) / "go").exists():  # start together, so the writes really overlap
        time.sleep(0.01)
    with dispatch.use_timer(lambda name, fn, number: 1e-4):
        for batch in (1, 2, 4, 8, 16, 32):
            n = index + 1
            grouped_ops.prewarm("grouped_linear", torch.randn(batch, n, 4), torch.randn(n, 4, 4))
        for _ in range(20):
            store.DiskStore().put({"key": "shared", "impl": "bmm", "timings": {"bmm": index}})


WORKER_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from test_cache import _prewarm_worker
    _prewarm_worker(int(sys.argv[1]), sys.argv[2])
    print("done")
""")


def _start_together(folder: Path, procs: list[Any], alive: Any) -> None:
    deadline = time.monotonic() + 180
    while len(list(folder.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        if not all(alive(p) for p in procs):
            break
        time.sleep(0.02)
    (folder / "go").touch()


def _check_eight_writers() -> None:
    found = entries()
    keys = {e["key"] for e in found}
    assert len(found) == len(keys) == 8 * 6 + 1
    assert {e["signature"]["dims"]["n"] for e in found if e["key"] != "shared"} == set(range(1, 9))
    shared = store.DiskStore().get("shared")
    assert shared is not None and shared["timings"]["bmm"] in range(8)  # some writer's whole entry
    leftovers = [p.name for p in store.DiskStore().root.iterdir() if not p.name.endswith(".json")]
    assert leftovers == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork; the slow variant below uses fresh interpreters")
def test_eight_processes_prewarming_into_one_folder_lose_no_entry(tmp_path, caplog):
    # Forked processes start in milliseconds (torch is already imported); they are separate
    # processes all the same, each with its own memory, writing into one folder at once.
    folder = tmp_path / "sync"
    folder.mkdir()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prewarm_worker, args=(i, str(folder))) for i in range(8)]
    for p in procs:
        p.start()
    try:
        _start_together(folder, procs, lambda p: p.is_alive() or p.exitcode == 0)
        for p in procs:
            p.join(120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * 8
    _check_eight_writers()


@pytest.mark.slow
def test_eight_fresh_interpreters_prewarming_into_one_folder_lose_no_entry(tmp_path):
    folder = tmp_path / "sync"
    folder.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(folder), str(Path(__file__).parent)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    try:
        _start_together(folder, procs, lambda p: p.poll() in (None, 0))
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "done" in out, err
        assert "ignoring" not in err and "cannot write" not in err, err
    _check_eight_writers()


# ---- corrupted files ---------------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "binary": lambda text: "\udcff\x00garbage",
    "not-an-entry": lambda text: json.dumps(["a", "list"]),
    "no-impl": lambda text: json.dumps({"key": json.loads(text)["key"]}),
    "bad-timings": lambda text: json.dumps({**json.loads(text), "timings": {"bmm": "fast"}}),
    "bad-skipped": lambda text: json.dumps({**json.loads(text), "skipped": [["loop", "why"]]}),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_file_warns_by_name_is_ignored_and_healed(corruption, caplog):
    args = gl_args()
    with dispatch.use_timer(fake_timer({"einsum": 1e-6})):
        key = grouped_ops.prewarm("grouped_linear", *args).signature.key()
    path = store.DiskStore().path_for(key)
    text = path.read_text()
    path.write_bytes(CORRUPTIONS[corruption](text).encode("utf-8", "surrogateescape"))
    dispatch.clear_memory()
    calls: collections.Counter = collections.Counter()
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), \
            dispatch.use_timer(fake_timer({"loop": 1e-6}, calls)):
        y = grouped_ops.grouped_linear(*args)  # never an exception to the user
        d = grouped_ops.lookup("grouped_linear", *args)
    torch.testing.assert_close(y, grouped_ops.grouped_linear(*args, impl="bmm"))
    assert (d.impl, d.source) == ("loop", "cache") and calls  # re-tuned: the file was ignored
    assert any(str(path) in message for message in warnings_in(caplog))
    healed = json.loads(path.read_text())
    assert healed["key"] == key and healed["impl"] == "loop"


def test_listing_skips_a_corrupted_file_with_a_warning(caplog):
    with dispatch.use_timer(fake_timer()):
        keys = [grouped_ops.prewarm("grouped_linear", *gl_args(n=n)).signature.key() for n in (1, 2, 3)]
    bad = store.DiskStore().path_for(keys[1])
    bad.write_text('{"key": "trunc')
    with caplog.at_level(logging.WARNING, logger="grouped_ops"):
        listed = {e["key"] for e in entries()}
    assert listed == {keys[0], keys[2]}
    assert [m for m in warnings_in(caplog) if str(bad) in m]


def test_half_written_temp_files_are_not_entries(caplog):
    with dispatch.use_timer(fake_timer()):
        grouped_ops.prewarm("grouped_linear", *gl_args())
    root = store.DiskStore().root
    (root / ".tmp-abc123.partial").write_text('{"key": "half')
    (root / ".tmp-old.json").write_text('{"key": "half')  # a leftover from an older version's naming
    with caplog.at_level(logging.WARNING, logger="grouped_ops"):
        assert len(entries()) == 1
    assert warnings_in(caplog) == []


def test_a_corrupted_shipped_table_warns_and_is_ignored(shipped_tables, caplog):
    bad = shipped_tables / "broken.json"
    bad.write_text('{"format": 1, "entries": [')
    future = shipped_tables / "future.json"
    future.write_text(json.dumps({"format": 99, "entries": []}))
    store.shipped_entries.cache_clear()
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), dispatch.use_timer(fake_timer()):
        d = grouped_ops.prewarm("grouped_linear", *gl_args())
    assert d.source == "tuned"
    messages = warnings_in(caplog)
    assert any(str(bad) in m for m in messages)
    assert any(str(future) in m and "format 99" in m for m in messages)


# ---- an unwritable folder ----------------------------------------------------------------------------

def test_an_unwritable_folder_warns_once_and_keeps_working_in_memory(tmp_path, monkeypatch, caplog):
    # Tests run as root, which chmod does not stop; a path under a regular file cannot be created.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(blocker / "cache"))
    calls: collections.Counter = collections.Counter()
    with caplog.at_level(logging.WARNING, logger="grouped_ops"), dispatch.use_timer(fake_timer({"einsum": 1e-6}, calls)):
        for n in (1, 2, 3):
            x, w, b = gl_args(n=n)
            torch.testing.assert_close(grouped_ops.grouped_linear(x, w, b),
                                       grouped_ops.grouped_linear(x, w, b, impl="loop"))
        tuned = sum(calls.values())
        for n in (1, 2, 3):  # remembered in memory: no second tuning
            grouped_ops.grouped_linear(*gl_args(n=n))
            assert grouped_ops.lookup("grouped_linear", *gl_args(n=n)).impl == "einsum"
    assert sum(calls.values()) == tuned
    messages = warnings_in(caplog)
    assert len(messages) == 1, messages
    assert "cannot write the tuning cache" in messages[0] and str(blocker) in messages[0]
    assert blocker.read_text() == "not a folder"


# ---- shipped tables ----------------------------------------------------------------------------------

def _entry(impl: str, args, *, fresh: bool = True) -> dict[str, Any]:
    d = grouped_ops.prewarm("grouped_linear", *args)  # with AUTOTUNE=0: only describes (default)
    entry = dispatch.entry_for(GL, dispatch.Decision(impl, "tuned", {impl: 1e-5}, {}, d.signature))
    if not fresh:
        entry["fingerprint"] = {**entry["fingerprint"], "grouped_ops": "0.0.0"}
    return entry


def test_shipped_tables_are_consulted_after_the_user_cache(shipped_tables, monkeypatch):
    args = gl_args()
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    store.write_table(shipped_tables / "reference-cpu.json", [_entry("loop", args)])
    monkeypatch.delenv("GROUPED_OPS_AUTOTUNE")
    dispatch.clear_memory()
    calls: collections.Counter = collections.Counter()
    with dispatch.use_timer(fake_timer({"einsum": 1e-6}, calls)):
        d = grouped_ops.prewarm("grouped_linear", *args)
        assert (d.impl, d.source) == ("loop", "shipped") and not calls  # shipped: no tuning, and it says so
        assert entries() == []  # the shipped table is read-only; nothing copied
        monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
        store.DiskStore().put(_entry("masked_dense", args))
        monkeypatch.delenv("GROUPED_OPS_AUTOTUNE")
        dispatch.clear_memory()
        assert grouped_ops.prewarm("grouped_linear", *args).impl == "masked_dense"  # the user's wins


def test_a_fresh_shipped_entry_beats_a_stale_user_entry(shipped_tables, monkeypatch):
    args = gl_args()
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    store.write_table(shipped_tables / "reference-cpu.json", [_entry("loop", args)])
    store.DiskStore().put(_entry("einsum", args, fresh=False))
    dispatch.clear_memory()
    monkeypatch.delenv("GROUPED_OPS_AUTOTUNE")
    calls: collections.Counter = collections.Counter()
    with dispatch.use_timer(fake_timer(calls=calls)):
        d = grouped_ops.prewarm("grouped_linear", *args)
    assert (d.impl, d.source) == ("loop", "shipped") and not calls


def test_autotune_off_uses_a_shipped_table(shipped_tables, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_AUTOTUNE", "0")
    args = gl_args()
    store.write_table(shipped_tables / "reference-cpu.json", [_entry("einsum", args)])
    dispatch.clear_memory()
    d = grouped_ops.prewarm("grouped_linear", *args)
    assert (d.impl, d.source) == ("einsum", "shipped")
    assert not store.DiskStore().root.exists()


# ---- export / import ---------------------------------------------------------------------------------

def test_export_import_round_trip(tmp_path, monkeypatch):
    with dispatch.use_timer(fake_timer({"einsum": 1e-6})):
        for n in (1, 2, 3):
            grouped_ops.prewarm("grouped_linear", *gl_args(n=n))
    before = sorted(entries(), key=lambda e: e["key"])
    table = tmp_path / "export.json"
    assert store.write_table(table, store.DiskStore().entries()) == 3
    data = json.loads(table.read_text())
    assert data["format"] == store.FORMAT and [e["key"] for e in data["entries"]] == [e["key"] for e in before]
    assert store.DiskStore().clear() == 3 and entries() == []
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert store.DiskStore().merge(store.read_table(table)) == 3
    assert sorted(entries(), key=lambda e: e["key"]) == before
    dispatch.clear_memory()
    d = grouped_ops.lookup("grouped_linear", *gl_args(n=2))
    assert (d.impl, d.source) == ("einsum", "cache") and d.timings == before[1]["timings"]


def test_import_merges_and_can_keep_existing_entries(tmp_path):
    store.DiskStore().put({"key": "a", "impl": "bmm", "timings": {}})
    store.DiskStore().put({"key": "b", "impl": "bmm", "timings": {}})
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"format": store.FORMAT, "entries": [
        {"key": "b", "impl": "loop", "timings": {}}, {"key": "c", "impl": "loop", "timings": {}},
        {"key": 3, "impl": None}]}))  # the malformed one is dropped
    assert store.DiskStore().merge(store.read_table(table), overwrite=False) == 1
    assert {e["key"]: e["impl"] for e in entries()} == {"a": "bmm", "b": "bmm", "c": "loop"}
    assert store.DiskStore().merge(store.read_table(table)) == 2
    assert {e["key"]: e["impl"] for e in entries()} == {"a": "bmm", "b": "loop", "c": "loop"}


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPED_OPS_CACHE_DIR", str(tmp_path / "mine"))
    assert store.cache_dir() == tmp_path / "mine"
    assert store.DiskStore().root == tmp_path / "mine" / f"v{store.FORMAT}"
    monkeypatch.delenv("GROUPED_OPS_CACHE_DIR")
    assert "grouped_ops" in str(store.cache_dir())  # the platform's user cache folder


# ---- stale and unknown entries are retuned -----------------------------------------------------------

def test_an_entry_naming_an_implementation_that_no_longer_exists_is_retuned(count_tunings):
    x, w, b = gl_args()
    with dispatch.use_timer(FakeTimer()):
        key = grouped_ops.prewarm("grouped_linear", x, w, b).signature.key()
    path = store.DiskStore().path_for(key)
    path.write_text(path.read_text().replace('"impl": "bmm"', '"impl": "renamed_away"'))
    dispatch.clear_memory()
    with dispatch.use_timer(FakeTimer()):
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
    assert (d.impl, d.source) == ("bmm", "tuned")
    assert sum(count_tunings.values()) == 2


def test_a_stale_entry_alone_is_retuned(count_tunings):
    a, b = gl_args(n=2), gl_args(n=3)
    with dispatch.use_timer(FakeTimer({"einsum": 1e-6})):
        key_a = grouped_ops.prewarm("grouped_linear", *a).signature.key()
        key_b = grouped_ops.prewarm("grouped_linear", *b).signature.key()
    make_stale(key_a)
    b_file = store.DiskStore().path_for(key_b)
    b_before = b_file.read_text()
    dispatch.clear_memory()
    count_tunings.clear()
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        da = grouped_ops.prewarm("grouped_linear", *a)
        db = grouped_ops.prewarm("grouped_linear", *b)
    assert (da.impl, da.source) == ("loop", "tuned")
    assert (db.impl, db.source) == ("einsum", "cache")
    assert dict(count_tunings) == {key_a: 1}
    assert b_file.read_text() == b_before
    entry = store.DiskStore().get(key_a)
    assert entry["impl"] == "loop" and entry["fingerprint"] == store.fingerprint(dispatch.impl_set_version(GL))
