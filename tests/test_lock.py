"""One tuning at a time per device on a host (grouped_ops/tuning/lock.py): processes take turns,
wait for each other's decision instead of timing their own, give up after GROUPED_OPS_TUNE_WAIT_S
as if tuning were not allowed, survive a holder's kill -9, and a forked child holds nothing."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import FakeTimer, gl_args

import grouped_ops
from grouped_ops import dispatch, grouped_linear
from grouped_ops.tuning import lock, store

CPU = torch.device("cpu")

HOLD = textwrap.dedent("""
    import sys, time, torch
    from grouped_ops.tuning import lock
    with lock.tuning_turn(torch.device("cpu"), 5.0, sys.argv[1]) as turn:
        print("held" if turn else "missed", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold_in_another_process(seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, os.environ["GROUPED_OPS_LOCK_DIR"], str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_is_host_local_and_named_by_the_device():
    path = lock.lock_path(CPU, os.environ["GROUPED_OPS_LOCK_DIR"])
    assert path.parent == lock.lock_dir(os.environ["GROUPED_OPS_LOCK_DIR"])
    assert not path.is_relative_to(store.cache_dir())  # never in the (maybe shared) cache folder
    assert lock.lock_path(CPU, "") != path and lock.lock_path(CPU, "").parent != store.cache_dir()


def test_a_lock_held_by_a_killed_process_is_free_again():
    proc = hold_in_another_process(60)
    try:
        with lock.tuning_turn(CPU, 0.2, os.environ["GROUPED_OPS_LOCK_DIR"]) as turn:
            assert not turn  # held over there
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of its "tuning"
        proc.wait(timeout=10)
        start = time.monotonic()
        with lock.tuning_turn(CPU, 5.0, os.environ["GROUPED_OPS_LOCK_DIR"]) as turn:
            assert turn
        assert time.monotonic() - start < 2
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_tuning_process_leaves_the_next_one_free_to_tune(tmp_path):
    # kill -9 during a real tuning (a timer that sleeps): the next process tunes and stores.
    code = textwrap.dedent("""
        import sys, time, torch, grouped_ops
        from grouped_ops import dispatch
        def timer(name, fn, number):
            print("tuning", flush=True); time.sleep(60); return 1e-4
        x, w = torch.randn(8, 4, 16), torch.randn(4, 8, 16)
        with dispatch.use_timer(timer):
            grouped_ops.prewarm("grouped_linear", x, w)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "tuning"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        d = grouped_ops.prewarm("grouped_linear", torch.randn(8, 4, 16), torch.randn(4, 8, 16))
    assert (d.source, d.impl, d.stored) == ("tuned", "loop", True)


def test_a_forked_child_does_not_hold_its_parents_lock():
    locks = os.environ["GROUPED_OPS_LOCK_DIR"]
    read, write = os.pipe()
    with lock.tuning_turn(CPU, 1.0, locks) as turn:
        assert turn
        pid = os.fork()
        if pid == 0:  # the child: the lock is its parent's, not its own
            try:
                with lock.tuning_turn(CPU, 0.3, locks) as mine:
                    os.write(write, b"H" if mine else b"-")
                time.sleep(3)  # alive, with whatever it inherited, while the parent lets go
            finally:
                os._exit(0)
        tried = os.read(read, 1)  # the parent holds on until the child has tried
    try:
        assert tried == b"-", "the child thought it held its parent's lock"
        # the parent has let go and the child is still alive: a third process gets the lock at once
        proc = hold_in_another_process(0)
        proc.wait(timeout=30)
    finally:
        os.waitpid(pid, 0)


def test_a_tuning_that_cannot_get_the_lock_decides_as_when_tuning_is_not_allowed(monkeypatch, caplog, count_tunings):
    monkeypatch.setenv("GROUPED_OPS_TUNE_WAIT_S", "0.3")
    proc = hold_in_another_process(60)
    try:
        with caplog.at_level(logging.WARNING, "grouped_ops"), dispatch.use_timer(FakeTimer({"loop": 1e-6})):
            d = grouped_ops.prewarm("grouped_linear", *gl_args())
        assert not count_tunings
        assert (d.source, d.stored) == ("default", False)
        assert "GROUPED_OPS_TUNE_WAIT_S" in d.not_stored and "GROUPED_OPS_TUNE_WAIT_S" in caplog.text
    finally:
        proc.kill()
        proc.wait()
    with dispatch.use_timer(FakeTimer({"loop": 1e-6})):  # nothing was remembered: once free, it tunes
        assert grouped_ops.prewarm("grouped_linear", *gl_args()).impl == "loop"
    assert sum(count_tunings.values()) == 1


@pytest.mark.parametrize("what", ["GROUPED_OPS_CACHE_DIR", "GROUPED_OPS_LOCK_DIR"])
def test_an_unusable_folder_still_tunes_with_one_warning(what, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(what, str(blocker / "sub"))  # cannot be created, even by root
    with caplog.at_level(logging.WARNING, "grouped_ops"), dispatch.use_timer(FakeTimer({"loop": 1e-6})):
        decisions = [grouped_ops.prewarm("grouped_linear", *gl_args(batch)) for batch in (8, 64, 512)]
        grouped_linear(*gl_args(8))
    assert [(d.source, d.impl) for d in decisions] == [("tuned", "loop")] * 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(blocker) in warnings[0].getMessage()
    if what == "GROUPED_OPS_CACHE_DIR":
        assert all(not d.stored and "not writable" in d.not_stored for d in decisions)
    else:
        assert all(d.stored for d in decisions)


PREWARM = textwrap.dedent("""
    import json, sys, torch, grouped_ops
    torch.set_num_threads(1)
    first, count, start = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    open(start + ".ready-" + sys.argv[1] + "-" + str(__import__("os").getpid()), "w").close()
    while not __import__("os").path.exists(start):  # all start together, once all have imported
        __import__("time").sleep(0.01)
    out = []
    for i in range(first, first + count):
        batch, n = (4, 16, 64, 256)[i % 4], (4, 8, 16, 32, 64)[i // 4 % 5]
        x, w, b = torch.randn(batch, n, 16), torch.randn(n, 16, 16), torch.randn(n, 16)
        if i >= 20:
            w.requires_grad_(True)
        d = grouped_ops.prewarm("grouped_linear", x, w, b)
        out.append({"key": d.signature.key(), "source": d.source, "partial": d.partial, "stored": d.stored})
    print(json.dumps(out))
""")


def prewarm_in_processes(tmp_path, parts: list[tuple[int, int]]) -> list[dict]:
    start = tmp_path / "start"
    procs = [subprocess.Popen([sys.executable, "-c", PREWARM, str(first), str(count), str(start)],
                              stdout=subprocess.PIPE, text=True) for first, count in parts]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("start.ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    start.write_text("")
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        results += json.loads(out.strip().splitlines()[-1])
    return results


def check_shared(tmp_path, processes: int, signatures: int) -> None:
    # Each signature is tuned once on the host; the other processes take its decision from disk
    # (one marked noise too: peers running alongside leave its re-tuning to a later process).
    results = prewarm_in_processes(tmp_path, [(0, signatures)] * processes)
    tuned = collections.Counter(r["key"] for r in results if r["source"] == "tuned")
    entries = {e["key"]: e for e in store.DiskStore().entries()}
    assert len(entries) == signatures
    assert dict(tuned) == {k: 1 for k in entries}, "a signature tuned more than once on the host"
    assert all(e["tunings"] == 1 for e in entries.values())


def test_processes_prewarming_the_same_signatures_tune_each_once_on_the_host(tmp_path):
    check_shared(tmp_path, 3, 3)


@pytest.mark.slow
def test_eight_processes_prewarming_the_same_five_signatures_tune_five_times(tmp_path):
    check_shared(tmp_path, 8, 5)


@pytest.mark.slow
def test_eight_processes_prewarming_five_signatures_each_store_all_forty(tmp_path, monkeypatch):
    monkeypatch.delenv("GROUPED_OPS_TUNE_BUDGET_S")  # the default budget, as users tune
    results = prewarm_in_processes(tmp_path, [(5 * p, 5) for p in range(8)])
    entries = list(store.DiskStore().entries())
    assert len({r["key"] for r in results}) == 40 and len(entries) == 40
    assert sum(1 for e in entries if e.get("partial")) <= 4


def test_coming_straight_back_steps_aside_only_for_a_waiting_process():
    configured = os.environ["GROUPED_OPS_LOCK_DIR"]
    waiting = lock.lock_path(CPU, configured).with_suffix(".waiting")
    waiting.unlink(missing_ok=True)

    def turn_after_a_turn() -> float:
        with lock.tuning_turn(CPU, 5.0, configured) as turn:
            assert turn
        start = time.monotonic()
        with lock.tuning_turn(CPU, 5.0, configured) as turn:
            assert turn
        return time.monotonic() - start

    assert turn_after_a_turn() < lock.POLL_S  # alone on the host: a batch prewarm loses no time
    waiting.touch()  # another process says it waits
    assert turn_after_a_turn() >= lock.POLL_S
