"""``python -m grouped_ops cache``: the tuning cache on disk (path, list, show, clear, export, import)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import dispatch
from .._errors import GroupedOpsError
from ..ops import SPECS
from ..tuning import store
from ._common import cache_folder


def add_parser(sub: Any) -> None:
    cache = sub.add_parser("cache", help="the tuning cache on disk: path, list, show, clear, export, import",
                           description="The user tuning cache (GROUPED_OPS_CACHE_DIR, else the platform's "
                           "user cache folder) and the tables shipped with the library.")
    cache_sub = cache.add_subparsers(title="actions", metavar="ACTION", required=True)
    c = cache_sub.add_parser("path", help="print the cache folder")
    c.set_defaults(func=cmd_cache_path)
    c = cache_sub.add_parser("list", help="one line per entry (filter: a substring of the key)")
    c.add_argument("filter", nargs="?", default="", help="only keys containing this")
    c.add_argument("--shipped", action="store_true", help="list the shipped tables instead")
    c.set_defaults(func=cmd_cache_list)
    c = cache_sub.add_parser("show", help="entries in full, with every candidate's timing")
    c.add_argument("filter", metavar="KEY-or-filter", help="a key, or a substring of keys")
    c.add_argument("--shipped", action="store_true", help="look in the shipped tables instead")
    c.set_defaults(func=cmd_cache_show)
    c = cache_sub.add_parser("clear", help="delete the user cache's entries")
    c.add_argument("filter", nargs="?", default="", help="only keys containing this")
    c.set_defaults(func=cmd_cache_clear)
    c = cache_sub.add_parser("export", help="write the user cache as one table (the shipped format)")
    c.add_argument("file", type=Path, help="the JSON file to write")
    c.set_defaults(func=cmd_cache_export)
    c = cache_sub.add_parser("import", help="merge a table (an export or a shipped table) into the cache")
    c.add_argument("file", type=Path, help="a JSON table written by `cache export`, or a shipped table")
    c.add_argument("--keep-existing", action="store_true",
                   help="keep local entries whose key is also in FILE (default: FILE wins)")
    c.set_defaults(func=cmd_cache_import)


def cmd_cache_path(args: argparse.Namespace) -> int:
    print(cache_folder())
    return 0


def _status(entry: dict[str, Any]) -> str:
    op = entry.get("signature", {}).get("op") if isinstance(entry.get("signature"), dict) else None
    if op not in SPECS:
        return "op-not-imported"  # an op registered by a module this process has not imported (--import)
    current = store.fingerprint(dispatch.impl_set_version(SPECS[op]))
    return "fresh" if entry.get("fingerprint") == current else "stale"


def _matching(entries: Iterable[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    exact = [e for e in entries if e["key"] == text]
    if exact:
        return exact
    needle = text.lower()
    return [e for e in entries if needle in e["key"].lower()]


def _shipped() -> list[tuple[Path, list[dict[str, Any]]]]:
    folder = store.shipped_dir()
    return [(p, store.read_table(p)) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def cmd_cache_list(args: argparse.Namespace) -> int:
    if args.shipped:
        tables = _shipped()
        print(f"shipped tables in {store.shipped_dir()}: {len(tables)}")
        for path, entries in tables:
            chosen = _matching(entries, args.filter) if args.filter else entries
            print(f"{path.name}: {len(entries)} entries")
            for e in chosen:
                print(_row(e))
        if tables:
            print(BUCKET_LEGEND)
        return 0
    disk = store.DiskStore()
    entries = list(disk.entries())
    chosen = _matching(entries, args.filter) if args.filter else entries
    print(f"cache folder: {disk.root}")
    print(f"{len(chosen)} of {len(entries)} entries" + (f" matching {args.filter!r}" if args.filter else ""))
    for e in sorted(chosen, key=lambda e: e["key"]):
        print(_row(e))
    if chosen:
        print(BUCKET_LEGEND)
        if any(e.get("partial") for e in chosen):
            print(PARTIAL_LEGEND)
    elif shipped := _shipped_matches(args.filter):
        print(f"({shipped} in the shipped tables: `cache list --shipped{' ' + args.filter if args.filter else ''}`)")
    return 0


def _row(entry: dict[str, Any]) -> str:
    """One line of `cache list`: the pick, fresh or stale, the key, and a partial entry's mark."""
    mark = f"  [partial: {entry['partial']}, {entry.get('tunings', 1)} tuning(s)]" if entry.get("partial") else ""
    return f"  {entry['impl']:<{IMPL_WIDTH}} {_status(entry):<6} {entry['key']}{mark}"


PARTIAL_LEGEND = ("([partial: noise] was measured under noise, [partial: out of memory: ...] without candidates "
                  "that ran out of memory: used, and tuned once more by a later process where its tunings are 1)")


def _shipped_matches(text: str) -> int:
    """How many shipped entries match ``text`` (every one when empty): what an empty user cache hints at."""
    entries = [e for _, table in _shipped() for e in table]
    return len(_matching(entries, text) if text else entries)


# The widest implementation name, so that the columns line up.
IMPL_WIDTH = max(len(name) for spec in SPECS.values() for name in spec.registry)

# Keys show a bucket by its edge; say so once under every listing of keys.
BUCKET_LEGEND = ("(batch=B in a key is a bucket: batch sizes B/2+1..B share its decision; "
                 "with GROUPED_OPS_BUCKETS=exact, B is the exact size)")


def cmd_cache_show(args: argparse.Namespace) -> int:
    if args.shipped:
        entries = [e for _, table in _shipped() for e in table]
        where = f"the shipped tables in {store.shipped_dir()}"
    else:
        disk = store.DiskStore()
        entries = list(disk.entries())
        where = str(disk.root)
    chosen = _matching(entries, args.filter)
    if not chosen:
        print(f"no entry matches {args.filter!r} in {where} ({len(entries)} entries)")
        if not args.shipped and (shipped := _shipped_matches(args.filter)):
            print(f"{shipped} in the shipped tables: `cache show --shipped {args.filter}`")
        return 1
    for e in sorted(chosen, key=lambda e: e["key"]):
        print(e["key"])
        print(f"  impl:        {e['impl']} ({_status(e)})")
        print(f"  created:     {e.get('created', '?')}")
        fp = e.get("fingerprint", {})
        print("  fingerprint: " + (", ".join(f"{k}={v}" for k, v in sorted(fp.items())) if isinstance(fp, dict) else str(fp)))
        d = store.decision_of(e, "cache")
        print(d.table() or "  (no timings: a single candidate, nothing to compare)")
        print()
    print(BUCKET_LEGEND)
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    disk = store.DiskStore()
    if args.filter:
        removed = 0
        for e in _matching(list(disk.entries()), args.filter):
            path = disk.path_for(e["key"])
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    else:
        removed = disk.clear()
    dispatch.clear_memory()
    print(f"removed {removed} entries from {disk.root}")
    return 0


def cmd_cache_export(args: argparse.Namespace) -> int:
    disk = store.DiskStore()
    entries = list(disk.entries())
    n = store.write_table(args.file, entries)
    print(f"exported {n} entries from {disk.root} to {args.file}")
    if partial := sum(1 for e in entries if e.get("partial")):
        print(f"left out {partial} partial entries (a table holds full decisions only): re-tune them on a "
              "quiet machine (`prewarm --retune`) to export them")
    return 0


def cmd_cache_import(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise GroupedOpsError(f"cache import: no such file {args.file}")
    entries = store.read_table(args.file)
    if not entries:  # read_table has said why (not a table, another format, no entries)
        raise GroupedOpsError(f"cache import: {args.file} holds no entries to import")
    disk = store.DiskStore()
    n = disk.merge(entries, overwrite=not args.keep_existing)
    print(f"imported {n} of {len(entries)} entries from {args.file} into {disk.root}")
    return 0 if n or not entries else 1
