"""One tuning at a time per device on a host, across threads and processes.

Two tunings on one device time each other: eight processes tuning at once on a 2-core machine all
measure contention. So a tuning holds its device's lock: a threading lock for this process's
threads, then a file lock (``filelock``: ``fcntl.flock`` on Unix, ``LockFileEx`` on Windows) for
the other processes of the host.

- The lock files live in a host-local folder, never the cache folder: ``GROUPED_OPS_LOCK_DIR``, else
  ``$XDG_RUNTIME_DIR/grouped_ops``, else ``<temp dir>/grouped_ops-<uid>``. A cache on a shared
  filesystem must not serialise other hosts, and processes with private cache folders (tests, other
  users' jobs sharing a GPU) must still take turns.
- A file is named by the device's identity (:func:`grouped_ops.signature.device_identity`): the CPU
  model, the GPU's UUID. Its contents mean nothing; holding it is the lock.
- A process waits for each tuning under way up to ``GROUPED_OPS_TUNE_WAIT_S``; the holder writes
  who it is and when it started into ``<lock>.holder``, so a waiter behind several tunings in a row
  sees progress and waits on.
- Waiting processes touch ``<lock>.waiting``; a process that lets go and comes straight back for its
  next tuning (a batch prewarm) lets them in first, and loses no time when nobody waits.
- The kernel drops the lock when its process dies, ``kill -9`` included: nothing to clean up.
- Not inherited through ``fork``: a child drops whatever its parent held (its copy of the file
  descriptor closed without unlocking, which would unlock the parent's too) and starts with fresh
  threading locks, which another thread of the parent might have held at the fork.
- Where the folder cannot be used, one WARNING, and this process's threads still take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import torch

from ..signature import device_identity

log = logging.getLogger("grouped_ops")

_GUARD = threading.Lock()  # guards the two tables below
_THREAD_LOCKS: dict[str, threading.Lock] = {}  # device identity -> this process's turn
_FILE_LOCKS: dict[str, filelock.BaseFileLock] = {}  # lock file path -> its lock (reused: one open file each)
_WARNED: set[str] = set()
_RELEASED: dict[str, float] = {}  # lock file path -> when this process last let go of it
_ORPHANS: list[filelock.BaseFileLock] = []  # a forked child's copies of its parent's locks
POLL_S = 0.05  # how often a waiting process tries the file lock again: each try wakes a process on a
               # core the tuning may need (7 waiters polling every 10 ms: 2-5 of 40 tunings noisy, 0-1 at 50 ms)
WAITING_FRESH_S = 0.5  # a ``<lock>.waiting`` touched this recently: another process waits for the lock


def lock_dir(configured: str = "") -> Path:
    """The host-local folder of the lock files (see the module docstring)."""
    if configured:
        return Path(configured).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "grouped_ops"
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"grouped_ops-{uid}"


def lock_path(device: torch.device, configured: str = "") -> Path:
    """The lock file of ``device`` (named by a hash of its identity: UUIDs and CPU names hold
    characters a file name should not)."""
    identity = device_identity(device)
    return lock_dir(configured) / f"tune-{hashlib.sha256(identity.encode()).hexdigest()[:24]}.lock"


@contextlib.contextmanager
def tuning_turn(device: torch.device, wait_s: float, configured_dir: str = "") -> Iterator[bool]:
    """Hold ``device``'s tuning lock for the block. Yields True once held, or False (holding
    nothing) where one tuning under way went on for over ``wait_s`` seconds (negative: wait as long
    as it takes). Each new tuning that starts meanwhile restarts the wait: a process waits behind a
    queue of others' tunings as long as they make progress, each within the bound."""
    with _GUARD:
        turn = _THREAD_LOCKS.setdefault(device_identity(device), threading.Lock())
    if not turn.acquire(timeout=-1 if wait_s < 0 else max(0.0, wait_s)):
        yield False
        return
    try:
        path = lock_path(device, configured_dir)
        held = _file_lock(path)
        got = held is None or _acquire(held, wait_s, path.with_suffix(".holder"))
        try:
            yield got
        finally:
            if got and held is not None:
                held.release()
                _RELEASED[str(path)] = time.monotonic()
    finally:
        turn.release()


def device_count() -> int:
    """How many devices this process has taken a tuning turn on (for tests of bounded tables)."""
    return len(_THREAD_LOCKS)


def _acquire(held: filelock.BaseFileLock, wait_s: float, holder: Path) -> bool:
    # Fairness: waiting processes poll, and say so by touching ``<lock>.waiting`` while they wait;
    # one that has just let go and comes straight back (a batch prewarm's next signature) lets a
    # poll in first, and only then: alone on the host it loses no time.
    waiting = holder.with_suffix(".waiting")
    since = time.monotonic() - _RELEASED.get(str(holder.with_suffix(".lock")), -1e9)
    if since < 1.5 * POLL_S and _touched_within(waiting, WAITING_FRESH_S):
        time.sleep(1.5 * POLL_S - since)  # a poll, and a margin for a late one
    last, deadline = _holder(holder), time.monotonic() + wait_s
    try:
        held.acquire(timeout=0)
        return _now_holding(holder)
    except filelock.Timeout:
        pass
    while True:
        with contextlib.suppress(OSError):
            waiting.touch()
        left = 0.25 if wait_s < 0 else min(0.25, max(0.0, deadline - time.monotonic()))
        try:
            held.acquire(timeout=left, poll_interval=POLL_S)
        except filelock.Timeout:
            seen = _holder(holder)
            if seen != last:  # another tuning started: wait for that one in turn
                last, deadline = seen, time.monotonic() + wait_s
            elif wait_s >= 0 and time.monotonic() >= deadline:
                return False
            continue
        return _now_holding(holder)


def _now_holding(holder: Path) -> bool:
    with contextlib.suppress(OSError):  # who tunes now: what waiting processes watch for progress
        holder.write_text(f"{os.getpid()} {time.time_ns()}\n", encoding="utf-8")
    return True


def _touched_within(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _file_lock(path: Path) -> filelock.BaseFileLock | None:
    """The file lock at ``path``, or None (warned once) where its folder cannot be used."""
    with _GUARD:
        found = _FILE_LOCKS.get(str(path))
        if found is not None:
            return found
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8"):  # fails now, not in the middle of a tuning
                pass
        except OSError as e:
            if str(path.parent) not in _WARNED:
                _WARNED.add(str(path.parent))
                log.warning("grouped_ops: cannot use the tuning lock folder %s (%s); processes on this "
                            "host may tune at the same time and time each other. Set GROUPED_OPS_LOCK_DIR "
                            "to a writable host-local folder.", path.parent, e)
            return None
        found = _FILE_LOCKS[str(path)] = filelock.FileLock(str(path))
        return found


def _after_fork_in_child() -> None:
    # The parent's holds are not the child's: forget them without unlocking (an unlock through the
    # shared open file would release the parent's lock too), closing the child's copies of the
    # descriptors (where filelock has not done so itself), and start with fresh threading locks.
    # The old lock objects are kept, emptied, so that no finaliser of theirs unlocks anything.
    global _GUARD
    for held in _FILE_LOCKS.values():
        context = getattr(held, "_context", None)
        fd = getattr(context, "lock_file_fd", None)
        # filelock 3.x leaves it to us; a version with its own fork handling (4.x) is left to it
        if isinstance(fd, int) and not hasattr(held, "_reset_after_fork_in_child"):
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(AttributeError):
                context.lock_file_fd = None
                context.lock_counter = 0
        _ORPHANS.append(held)
    _FILE_LOCKS.clear()
    _THREAD_LOCKS.clear()
    _RELEASED.clear()
    _GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
