"""Convert a format-1 or format-2 tuning table (shipped or exported) to format 3, in place or to a new file.

Format 3 adds the partial state (``partial``, ``tunings``). Tables hold full decisions only, so a
format-2 entry becomes a format-3 one by gaining ``"tunings": 1``.

Format 2 keys name the math settings a decision was measured under (``math[...]`` after the
device). Format-1 decisions were all measured at torch's defaults, so each key gets those:

    cpu:  math[fp32=highest,det=0]
    cuda: math[fp32=highest,tf32=0,bf16red=1,fp16red=1,det=0]

The CPU thread count was already in the key (``cpu[<model> x<threads>]``: the thread count of the
measuring process) and stays. Weight layouts keep their names: format 1 timed ``contiguous`` and
``transposed`` weights built by make_inputs, which are still those classes (``shared`` and
``chunked`` are new classes, with no format-1 entries).

    python3 scripts/migrate_cache_keys.py tuning_cache/cpu-amd-epyc-x2.json [--out NEW.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

DEFAULTS = {
    "cpu": {"fp32": "highest", "det": "0"},
    "cuda": {"fp32": "highest", "tf32": "0", "bf16red": "1", "fp16red": "1", "det": "0"},
}
# "<op>(<dims>) <dtype> <device type>[<device name>] " then the layout; the name has no ']'
_HEAD = re.compile(r"^(\S+\(.*?\) \S+ (\w+)\[[^\]]*\]) (?!math\[)")


def migrate_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The format-2 entry for a format-1 one (an already migrated entry comes back unchanged)."""
    key = entry["key"]
    m = _HEAD.match(key)
    if m is None:
        if " math[" in key:
            return entry
        raise ValueError(f"not a format-1 key: {key!r}")
    numerics = DEFAULTS.get(m.group(2), DEFAULTS["cpu"])
    math = ",".join(f"{k}={v}" for k, v in numerics.items())
    out = {**entry, "key": f"{m.group(1)} math[{math}] {key[m.end():]}"}
    if isinstance(entry.get("signature"), dict):
        out["signature"] = {**entry["signature"], "numerics": dict(numerics)}
    return out


def migrate_table(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("format") == 3:
        return data
    if data.get("format") not in (1, 2) or not isinstance(data.get("entries"), list):
        raise ValueError(f"not a format-1 or format-2 table (format {data.get('format')!r})")
    entries = data["entries"] if data["format"] == 2 else [migrate_entry(e) for e in data["entries"]]
    entries = sorted(({"tunings": 1, **e} for e in entries), key=lambda e: e["key"])
    return {"format": 3, "entries": entries}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("table", type=Path)
    p.add_argument("--out", type=Path, help="write here instead of replacing TABLE")
    args = p.parse_args(argv)
    data = migrate_table(json.loads(args.table.read_text(encoding="utf-8")))
    dest = args.out or args.table
    dest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{dest}: {len(data['entries'])} entries, format {data['format']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
