"""Where decisions live on disk: the user's cache folder and the shipped tables.

The user cache holds one small JSON file per signature, written atomically (temp file + rename),
so concurrent writers never clobber each other's entries and a reader never sees half a file.
A corrupted file is reported by name and ignored; the next write for that key heals it.

Shipped tables (``tuning_cache/*.json`` in the repo, installed as ``grouped_ops.tuning_cache``)
and exports share one format: ``{"format": 3, "entries": [entry, ...]}``.

Format 3 adds the partial state to an entry: ``"partial"`` (why the decision is partial: measured
under noise, or some candidates ran out of memory; absent for a full decision) and ``"tunings"`` (how
many tunings it comes from). An older version reading a partial entry would take it as full, so the
user cache moved to ``<cache>/v3``; ``<cache>/v2`` and format-2 tables are no longer read (a format-2
table is ignored with a warning naming ``scripts/migrate_cache_keys.py``, which converts one).
Format 2 named the math settings, ``math[...]``, the live CPU thread count, and the weight layouts
``shared``/``chunked`` in its keys; format 1 did not.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..decision import Decision
from ..signature import Signature

log = logging.getLogger("grouped_ops")
FORMAT = 3  # 3: the partial state (partial, tunings); 2: math settings, thread count, weight layouts in the key
_warned_unwritable: set[str] = set()


def cache_dir() -> Path:
    """``GROUPED_OPS_CACHE_DIR``, else the platform's user cache folder for grouped_ops."""
    env = os.environ.get("GROUPED_OPS_CACHE_DIR", "").strip()
    return Path(env).expanduser() if env else _user_cache_dir()


def _user_cache_dir() -> Path:
    # platformdirs where installed; without it (a bare GPU image), the same folder it would give on
    # Linux and macOS, so that installing it later keeps the cache where it was.
    try:
        import platformdirs
    except ImportError:
        if sys.platform == "darwin":
            return Path.home() / "Library" / "Caches" / "grouped_ops"
        if os.name == "nt":
            return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "grouped_ops" / "Cache"
        return Path(os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache") / "grouped_ops"
    return Path(platformdirs.user_cache_dir("grouped_ops"))


def entry_of(decision: Decision, op_version: str) -> dict[str, Any]:
    """The cache entry (JSON-able) that stores ``decision``, for an op at ``op_version``."""
    sig = decision.signature
    assert sig is not None
    return {
        "key": sig.key(),
        "signature": sig.to_spec(),
        "impl": decision.impl,
        "timings": dict(decision.timings),
        "skipped": dict(decision.skipped),
        **({"opinions": list(decision.opinions)} if decision.opinions else {}),
        **({"partial": decision.partial} if decision.partial else {}),
        "tunings": decision.tunings,
        "fingerprint": fingerprint(op_version),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def decision_of(entry: dict[str, Any], source: str, sig: Signature | None = None) -> Decision:
    """The Decision an entry stores, reported as ``source``."""
    return Decision(entry["impl"], source, {k: float(v) for k, v in entry.get("timings", {}).items()},
                    dict(entry.get("skipped", {})), sig, tuple(map(str, entry.get("opinions", ()))),
                    partial=str(entry.get("partial", "")), tunings=int(entry.get("tunings", 1)))


def created_at(entry: dict[str, Any]) -> float | None:
    """When ``entry`` was written (seconds since the epoch), or None where it does not say."""
    try:
        return datetime.datetime.strptime(str(entry["created"]), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, ValueError):
        return None


def fingerprint(op_version: str) -> dict[str, str]:
    """What an entry's validity depends on; an entry whose fingerprint differs is re-tuned alone."""
    from .._version import __version__

    return {
        "grouped_ops": __version__,
        "torch": torch.__version__.split("+")[0],
        "cuda": str(torch.version.cuda),
        "impls": op_version,
    }


class DiskStore:
    """One JSON file per decision under ``root/v<FORMAT>`` (older formats' folders are not read)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_dir()) / f"v{FORMAT}"

    def path_for(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        entry = _read_entry(path)
        if entry is not None and entry.get("key") != key:
            return None  # a hash collision, in theory; treat as a miss
        return entry

    def put(self, entry: dict[str, Any]) -> bool:
        """Write atomically; on an unwritable folder warn once and return False."""
        path = self.path_for(entry["key"])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # the temp name must not match "*.json": a concurrent `entries()` would read it half-written
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".partial")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(entry, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            if str(self.root) not in _warned_unwritable:
                _warned_unwritable.add(str(self.root))
                log.warning("grouped_ops: cannot write the tuning cache at %s (%s); decisions are kept "
                            "in memory only. Set GROUPED_OPS_CACHE_DIR to a writable folder.", self.root, e)
            return False
        return True

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            if path.name.startswith("."):
                continue
            entry = _read_entry(path)
            if entry is not None:
                yield entry

    def clear(self) -> int:
        removed = 0
        if self.root.is_dir():
            for path in self.root.glob("*.json"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def merge(self, entries: Iterable[dict[str, Any]], *, overwrite: bool = True) -> int:
        """Import entries (e.g. from another machine's export); returns how many were written.

        An imported entry replaces the local one of the same key unless ``overwrite`` is false.
        """
        return sum(self.put(e) for e in entries
                   if _valid_entry(e) and (overwrite or self.get(e["key"]) is None))


def _valid_entry(entry: Any) -> bool:
    """What a reader relies on: a string key and impl, numeric timings, string reasons."""
    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("impl"), str)):
        return False
    timings, skipped = entry.get("timings", {}), entry.get("skipped", {})
    tunings = entry.get("tunings", 1)
    return (isinstance(timings, dict) and isinstance(skipped, dict)
            and isinstance(entry.get("partial", ""), str)
            and isinstance(tunings, int) and not isinstance(tunings, bool) and tunings >= 1
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in timings.values())
            and all(isinstance(v, str) for v in skipped.values()))


def _read_entry(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # a miss; an unusable folder is reported on write
        return None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        log.warning("grouped_ops: ignoring unreadable tuning cache file %s (%s); it will be rewritten "
                    "the next time this signature is tuned", path, e)
        return None
    if not _valid_entry(entry):
        log.warning("grouped_ops: ignoring malformed tuning cache file %s", path)
        return None
    return entry


def read_table(path: Path) -> list[dict[str, Any]]:
    """Entries of a shipped or exported table; a broken file is reported and yields nothing. A table
    holds full decisions only: a partial entry in one is left out, with a warning."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = data["entries"] if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("no 'entries' list")
        if data.get("format") != FORMAT:
            hint = "; convert it with scripts/migrate_cache_keys.py" if data.get("format") in (1, 2) else ""
            raise ValueError(f"format {data.get('format')!r}, this version reads format {FORMAT}{hint}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("grouped_ops: ignoring tuning table %s (%s)", path, e)
        return []
    valid = [e for e in entries if _valid_entry(e)]
    full = [e for e in valid if not e.get("partial")]
    if len(full) < len(valid):
        log.warning("grouped_ops: ignoring %d partial entries of tuning table %s (tables hold full decisions only)",
                    len(valid) - len(full), path)
    return full


def write_table(path: Path, entries: Iterable[dict[str, Any]]) -> int:
    """Write entries as a table (the shipped/export format), atomically; returns how many. Partial
    entries are left out: shipped tables and exports hold full decisions only."""
    path = Path(path)
    rows = sorted((e for e in entries if _valid_entry(e) and not e.get("partial")), key=lambda e: e["key"])
    text = json.dumps({"format": FORMAT, "entries": rows}, indent=1, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a table is for sharing; mkstemp's 0600 would hide it from others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(rows)


def shipped_dir() -> Path:
    """``GROUPED_OPS_SHIPPED_DIR`` if set (your own reference tables, or an empty folder to use
    none), else the tables installed with the package."""
    env = os.environ.get("GROUPED_OPS_SHIPPED_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    try:
        root = resources.files("grouped_ops.tuning_cache")
        return Path(str(root))
    except ModuleNotFoundError:  # running from a source checkout that was never installed
        return Path(__file__).resolve().parents[2] / "tuning_cache"


@functools.lru_cache(maxsize=1)
def shipped_entries() -> dict[str, dict[str, Any]]:
    """Every shipped table's entries by key (read once per process)."""
    table: dict[str, dict[str, Any]] = {}
    folder = shipped_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            for entry in read_table(path):
                table[entry["key"]] = entry
    return table
