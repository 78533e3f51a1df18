"""``python -m grouped_ops``: demo, prewarm, cache, explain, bench.

Every subcommand is a plain function over parsed arguments, so tests call :func:`main` with an
argument list and read what it printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, dispatch
from ._errors import GroupedOpsError
from .dispatch import Decision
from .ops import SPECS
from .ops._spec import OpSpec
from .signature import Signature, bucket, bucketing_mode, parse_dtype
from .tuning import store
from .tuning.settings import memory_budget, settings

OPS = tuple(SPECS)


# ---- entry point ---------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "bench" in argv and isinstance(bench := _load_bench(), str):
        print(f"grouped_ops: the benchmark sweep is not available in this build ({bench})", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("grouped_ops").setLevel(logging.INFO)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except GroupedOpsError as e:
        print(f"grouped_ops: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. ``argv`` decides whether the bench module is imported (only for ``bench``)."""
    parser = argparse.ArgumentParser(
        prog="python -m grouped_ops",
        description="grouped_ops: grouped linear layers and weighted combines, autotuned.",
    )
    parser.add_argument("--version", action="version", version=f"grouped_ops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every decision (the 'grouped_ops' logger at INFO)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = sub.add_parser("demo", help="show the main job working on this machine",
                          description="Build a ModuleList of nn.Linear and the equivalent grouped_linear "
                          "(and a weighted_combine), check the results match, show the tuner's choice "
                          "with every candidate's timing, and the speed-up over the loop.")
    demo.add_argument("--batch", type=_positive, default=128)
    demo.add_argument("--groups", type=_positive, default=32)
    demo.add_argument("--in", dest="in_features", type=_positive, default=32)
    demo.add_argument("--out", dest="out_features", type=_positive, default=32)
    demo.add_argument("--dtype", default="float32")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--train", action="store_true", help="also time forward + backward")
    demo.set_defaults(func=cmd_demo)

    prewarm = sub.add_parser("prewarm", help="decide (tune) signatures ahead of time",
                             description="Tune signatures now so the first real calls are fast. Give "
                             "one on the command line, or --from a file written by "
                             "grouped_ops.record()'s Recorder.save.")
    prewarm.add_argument("--from", dest="from_file", metavar="FILE", type=Path,
                         help="JSON lines of signatures (Recorder.save)")

    def prewarm_flags(p: argparse.ArgumentParser, default: Any = False) -> None:
        p.add_argument("--table", action="store_true", default=default, help="print every candidate's timing")
        p.add_argument("--no-progress", action="store_true", default=default, help="no progress bar")
        p.add_argument("--single-opinion", action="store_true", default=default,
                       help="tune each signature once (by default close calls are tuned again after "
                            "the others, and a third time where two tunings disagree)")

    prewarm_flags(prewarm)
    _add_signature_commands(prewarm, many_batches=True, required=False, flags=prewarm_flags)
    prewarm.set_defaults(func=cmd_prewarm)

    explain = sub.add_parser("explain", help="every candidate's timing, or why not, for one signature")
    def explain_flags(p: argparse.ArgumentParser, default: Any = False) -> None:
        p.add_argument("--no-tune", action="store_true", default=default,
                       help="only show what is known; never time anything")

    explain_flags(explain)
    _add_signature_commands(explain, many_batches=False, required=True, flags=explain_flags)
    explain.set_defaults(func=cmd_explain)

    cache = sub.add_parser("cache", help="the tuning cache on disk: list, show, clear, export, import")
    cache_sub = cache.add_subparsers(title="actions", metavar="ACTION", required=True)
    c = cache_sub.add_parser("path", help="print the cache folder")
    c.set_defaults(func=cmd_cache_path)
    c = cache_sub.add_parser("list", help="one line per entry (filter: a substring of the key)")
    c.add_argument("filter", nargs="?", default="")
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
    c.add_argument("file", type=Path)
    c.set_defaults(func=cmd_cache_export)
    c = cache_sub.add_parser("import", help="merge a table (an export or a shipped table) into the cache")
    c.add_argument("file", type=Path)
    c.add_argument("--keep-existing", action="store_true",
                   help="keep local entries whose key is also in FILE (default: FILE wins)")
    c.set_defaults(func=cmd_cache_import)

    bench = sub.add_parser("bench", help="benchmark sweep (tables, CSV/JSON, plots)")
    if "bench" in argv and not isinstance(module := _load_bench(), str):
        # imported only for `bench`: the other commands start faster and work without it
        module.configure_parser(bench)
        bench.set_defaults(func=module.run)
    return parser


def _load_bench() -> Any:
    """The ``grouped_ops.bench`` module, or why it cannot be used."""
    try:
        module = importlib.import_module("grouped_ops.bench")
    except ImportError as e:
        return str(e)
    missing = [name for name in ("configure_parser", "run") if not callable(getattr(module, name, None))]
    return f"grouped_ops.bench has no {', '.join(missing)}" if missing else module


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _features(text: str) -> int:
    """``1024`` or ``32x8x8`` (the feature dims of one branch output, multiplied)."""
    try:
        value = math.prod(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"features must look like 1024 or 32x8x8, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"features must be positive, got {text!r}")
    return value


# ---- signatures from the command line ------------------------------------------------------------

def _add_signature_commands(parser: argparse.ArgumentParser, *, many_batches: bool, required: bool,
                            flags: Callable[[argparse.ArgumentParser, Any], None]) -> None:
    """One sub-command per op, with its size flags. ``flags`` adds the command's own flags to each,
    so they work after the op name too (SUPPRESS: not given there, the command's value stands)."""
    ops = parser.add_subparsers(title="op", metavar="OP", dest="op", required=required)
    batch_kw: dict[str, Any] = {"nargs": "+"} if many_batches else {}
    batch_help = "batch size(s): every leading dim folded into one" if many_batches else "batch size"

    gl = ops.add_parser("grouped_linear", help="input [batch, groups, in] -> [batch, groups, out]")
    gl.add_argument("--batch", type=_positive, required=True, help=batch_help, **batch_kw)
    gl.add_argument("--groups", "-n", type=_positive, required=True)
    gl.add_argument("--in", dest="in_features", type=_positive, required=True)
    gl.add_argument("--out", dest="out_features", type=_positive, required=True)
    gl.add_argument("--no-bias", action="store_true")
    gl.add_argument("--weight-layout", choices=("contiguous", "transposed", "strided"), default="contiguous",
                    help="contiguous [n, out, in]; transposed: W.transpose(1, 2) of an [n, in, out] tensor")
    gl.add_argument("--input-layout", choices=("contiguous", "strided"), default="contiguous")
    gl.add_argument("--grad", action="store_true", help="training: weight and bias need gradients")
    gl.add_argument("--grad-input", action="store_true", help="training: the input needs a gradient too")
    _add_common(gl)
    flags(gl, argparse.SUPPRESS)

    wc = ops.add_parser("weighted_combine", help="k inputs [batch, *features] and weights [batch, k]")
    wc.add_argument("--batch", type=_positive, required=True, help=batch_help, **batch_kw)
    wc.add_argument("--k", type=_positive, required=True)
    wc.add_argument("--features", type=_features, required=True, help="e.g. 1024 or 32x8x8")
    wc.add_argument("--list", action="store_true", help="a list of k tensors instead of one stacked tensor")
    wc.add_argument("--non-contiguous", action="store_true", help="inputs are transposed views")
    wc.add_argument("--grad", action="store_true", help="training: inputs and weights need gradients")
    _add_common(wc)
    flags(wc, argparse.SUPPRESS)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, float64")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise GroupedOpsError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GroupedOpsError(f"device {name!r}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise GroupedOpsError(f"device {name!r}: only cpu and cuda can be tuned")
    return device


def signatures_from_args(args: argparse.Namespace) -> list[tuple[Signature, Signature]]:
    """The signatures the op flags describe (one per bucket), exactly as the op would key them, each
    with the exact signature of its first batch size (where it is timed)."""
    device, dtype = _device(args.device), parse_dtype(args.dtype)
    batches = args.batch if isinstance(args.batch, list) else [args.batch]
    spec = SPECS[args.op]
    requests: list[tuple[Signature, Signature]] = []
    for batch in batches:
        # Shape-only stand-ins on the meta device go through the op's own description, so the
        # key is the one a real call makes; then the real device is put in.
        call_args = _meta_args(args, batch, dtype)
        spec.validate(*call_args)
        with torch.enable_grad():
            m = spec.meta(*call_args)
        sig = dataclasses.replace(spec.signature(m, bucketing_mode() == "pow2"), device=device)
        if all(sig != known for known, _ in requests):
            requests.append((sig, dataclasses.replace(spec.signature(m, False), device=device)))
    return requests


def _meta_args(args: argparse.Namespace, batch: int, dtype: torch.dtype) -> tuple[Any, ...]:
    def empty(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)

    if args.op == "grouped_linear":
        n, inn, out = args.groups, args.in_features, args.out_features
        gin, gparam = args.grad_input, args.grad
        x = empty(batch, n, inn, grad=gin) if args.input_layout == "contiguous" else \
            empty(n, batch, inn, grad=gin).transpose(0, 1)
        if args.weight_layout == "contiguous":
            w = empty(n, out, inn, grad=gparam)
        elif args.weight_layout == "transposed":
            w = empty(n, inn, out, grad=gparam).transpose(1, 2)
        else:
            w = empty(n, out, 2 * inn, grad=gparam)[..., ::2]
        b = None if args.no_bias else empty(n, out, grad=gparam)
        return (x, w, b)
    k, f = args.k, args.features
    if args.list:
        inputs: Any = tuple(empty(batch, f, grad=args.grad) if not args.non_contiguous
                            else empty(f, batch, grad=args.grad).t() for _ in range(k))
    else:
        inputs = empty(batch, k, f, grad=args.grad) if not args.non_contiguous else \
            empty(k, batch, f, grad=args.grad).transpose(0, 1)
    return (inputs, empty(batch, k, grad=args.grad))


def signatures_from_file(path: Path) -> list[tuple[Signature, Signature | None]]:
    """Signatures saved by ``Recorder.save`` (JSON lines), each with the exact signature of its first
    call where the line has ``tune_at_batch``; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GroupedOpsError(f"prewarm: cannot read {path}: {e}") from None
    sigs = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            spec = json.loads(line)
        except ValueError as e:
            raise GroupedOpsError(f"prewarm: {path}:{number} is not JSON ({e})") from None
        sig = Signature.from_spec(spec)
        if sig.op not in SPECS:
            raise GroupedOpsError(f"prewarm: {path}:{number}: unknown op {sig.op!r}; valid ops are {list(OPS)}")
        _device(str(sig.device))
        at = spec.get("tune_at_batch")
        batch = sig.dim("batch")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at <= 0
                               or (at != batch and bucket(at) != batch)):
            raise GroupedOpsError(f"prewarm: {path}:{number}: tune_at_batch={at!r} is not a batch size in "
                                  f"the bucket batch={batch}")
        sigs.append((sig, None if at is None else sig.with_dim("batch", at)))
    return sigs


# ---- prewarm -------------------------------------------------------------------------------------

def cmd_prewarm(args: argparse.Namespace) -> int:
    if args.from_file is not None and args.op is not None:
        raise GroupedOpsError("prewarm: give signatures on the command line or --from FILE, not both")
    if args.from_file is not None:
        requests = signatures_from_file(args.from_file)
    elif args.op is not None:
        requests = signatures_from_args(args)
    else:
        raise GroupedOpsError("prewarm: give an op (grouped_linear or weighted_combine) with its sizes, "
                              "or --from FILE; see `python -m grouped_ops prewarm --help`")
    if not settings().autotune:
        print("note: GROUPED_OPS_AUTOTUNE=0, so nothing is tuned or written", file=sys.stderr)
    with dispatch.progress_bar(not args.no_progress) as progress:
        decisions = dispatch.prewarm_signatures(requests, second_opinion=not args.single_opinion,
                                                progress=progress)
    counts: dict[str, int] = {}
    for (sig, _), decision in zip(requests, decisions, strict=True):
        counts[decision.source] = counts.get(decision.source, 0) + 1
        picks = f"  (picks of {len(decision.opinions)} tunings: {', '.join(decision.opinions)})" \
            if decision.opinions else ""
        print(f"{sig}\n  -> {decision.impl} ({decision.source})  {_timings_line(decision)}{picks}")
        if args.table:
            print(decision.table())
    summary = ", ".join(f"{n} {source}" for source, n in sorted(counts.items()))
    again = sum(1 for d in decisions if d.opinions)
    print(f"prewarmed {len(requests)} signature(s): {summary or 'none'}"
          + (f" ({again} close call(s) tuned again)" if again else "") + f"; cache folder: {store.cache_dir()}")
    return 0


def _timings_line(d: Decision) -> str:
    return "  ".join(f"{name}={t * 1e6:.1f}us" for name, t in sorted(d.timings.items(), key=lambda kv: kv[1]))


# ---- explain -------------------------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    ((sig, at),) = signatures_from_args(args)
    spec = SPECS[sig.op]
    s = settings()
    print(f"signature: {sig}")
    print(f"key:       {sig.key()}")
    print(f"buckets:   {bucketing_mode()} (GROUPED_OPS_BUCKETS)")
    if args.no_tune:
        decision = dispatch._env_impl(spec, sig) or dispatch.known_decision(spec, sig)
        if decision is None:
            print(f"decision:  none yet; auto would tune it on the first call, or use the default rule "
                  f"({spec.default_impl(sig)}) where tuning is not allowed")
    else:
        decision = dispatch.decide_signature(spec, sig, at)
    if decision is not None:
        print(f"decision:  {decision.impl} ({decision.source}: {_SOURCES.get(decision.source, '')})")
    print()
    print(explain_table(spec, sig, decision, memory_budget(sig.device, s)))
    return 0


_SOURCES = {
    "tuned": "timed just now",
    "cache": "from memory, the user cache or a shipped table",
    "default": "the op's default rule; nothing was timed",
    "env": "forced by GROUPED_OPS_IMPL",
    "forced": "forced by a use_impl scope",
    "stale": "a cache entry from other versions, used because tuning is not allowed",
    "nearest": "the choice of the nearest tuned batch size",
    "broadcast": "rank 0's choice under torch.distributed",
}


def explain_table(spec: OpSpec, sig: Signature, decision: Decision | None, budget: float) -> str:
    """Every implementation: its timing (and ratio to the best), or why it was not timed."""
    timings = dict(decision.timings) if decision else {}
    skipped = dict(decision.skipped) if decision else {}
    best = min(timings.values(), default=0.0)
    rows = [f"   {'implementation':<14} {'median':>12}  {'vs best':>7}  notes",
            f"   {'-' * 14} {'-' * 12}  {'-' * 7}  {'-' * 5}"]
    for name, implementation in spec.registry.items():
        mark = "*" if decision is not None and name == decision.impl else " "
        need = implementation.extra_memory(sig)
        notes = []
        if name in skipped:
            notes.append(skipped[name])
        elif name not in timings:
            reasons = implementation.not_supported_reasons(sig)
            if reasons:
                notes.append("unsupported: " + "; ".join(reasons))
            elif need > budget:
                notes.append(f"workspace {_bytes(need)} over the tuning budget {_bytes(budget)}")
            else:
                notes.append("not timed")
        if need:
            notes.append(f"workspace {_bytes(need)}")
        if name in timings:
            t = timings[name]
            ratio = f"x{t / best:.2f}" if best else ""
            rows.append(f" {mark} {name:<14} {t * 1e6:>9.1f} us  {ratio:>7}  {'; '.join(notes)}")
        else:
            rows.append(f" {mark} {name:<14} {'-':>12}  {'':>7}  {'; '.join(notes)}")
    for name, why in skipped.items():
        if name not in spec.registry:
            rows.append(f"   {name:<14} {'':>12}  {'':>7}  {why}")
    return "\n".join(rows)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---- cache ---------------------------------------------------------------------------------------

def cmd_cache_path(args: argparse.Namespace) -> int:
    print(store.DiskStore().root)
    return 0


def _status(entry: dict[str, Any]) -> str:
    op = entry.get("signature", {}).get("op") if isinstance(entry.get("signature"), dict) else None
    if op not in SPECS:
        return "unknown-op"
    current = store.fingerprint(dispatch._impl_set_version(SPECS[op]))
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
                print(f"  {e['impl']:<14} {_status(e):<6} {e['key']}")
        return 0
    disk = store.DiskStore()
    entries = list(disk.entries())
    chosen = _matching(entries, args.filter) if args.filter else entries
    print(f"cache folder: {disk.root}")
    print(f"{len(chosen)} of {len(entries)} entries" + (f" matching {args.filter!r}" if args.filter else ""))
    for e in sorted(chosen, key=lambda e: e["key"]):
        print(f"  {e['impl']:<14} {_status(e):<6} {e['key']}")
    return 0


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
        return 1
    for e in sorted(chosen, key=lambda e: e["key"]):
        print(e["key"])
        print(f"  impl:        {e['impl']} ({_status(e)})")
        print(f"  created:     {e.get('created', '?')}")
        fp = e.get("fingerprint", {})
        print("  fingerprint: " + (", ".join(f"{k}={v}" for k, v in sorted(fp.items())) if isinstance(fp, dict) else str(fp)))
        d = Decision(e["impl"], "cache", {k: float(v) for k, v in e.get("timings", {}).items()},
                     dict(e.get("skipped", {})), opinions=tuple(map(str, e.get("opinions", ()))))
        print(d.table() or "  (no timings: a single candidate, nothing to compare)")
        print()
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
    n = store.write_table(args.file, disk.entries())
    print(f"exported {n} entries from {disk.root} to {args.file}")
    return 0


def cmd_cache_import(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise GroupedOpsError(f"cache import: no such file {args.file}")
    entries = store.read_table(args.file)
    disk = store.DiskStore()
    n = disk.merge(entries, overwrite=not args.keep_existing)
    print(f"imported {n} of {len(entries)} entries from {args.file} into {disk.root}")
    return 0 if n or not entries else 1


# ---- demo ----------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from torch import nn

    import grouped_ops as go

    device, dtype = _device(args.device), parse_dtype(args.dtype)
    batch, n, inn, out = args.batch, args.groups, args.in_features, args.out_features
    torch.manual_seed(0)
    print(f"grouped_ops {__version__}, torch {torch.__version__}, {device} ({_device_label(device)}), "
          f"{torch.get_num_threads()} threads")
    print(f"cache folder: {store.cache_dir()}\n")

    # -- grouped_linear vs a ModuleList of nn.Linear
    layers = nn.ModuleList(nn.Linear(inn, out) for _ in range(n)).to(device, dtype)
    weight = torch.stack([lin.weight for lin in layers]).detach()
    bias = torch.stack([lin.bias for lin in layers]).detach()
    x = torch.randn(batch, n, inn, device=device, dtype=dtype)

    def loop() -> torch.Tensor:
        return torch.stack([lin(x[:, i]) for i, lin in enumerate(layers)], dim=1)

    def grouped() -> torch.Tensor:
        return go.grouped_linear(x, weight, bias)

    print(f"1. grouped_linear: {n} x nn.Linear({inn}, {out}) on input [{batch}, {n}, {inn}]")
    with torch.no_grad():
        decision = go.prewarm("grouped_linear", x, weight, bias)
        _report_match(loop(), grouped(), dtype)
        _report_decision(decision)
        t = _side_by_side({"ModuleList loop": loop, "grouped_linear (auto)": grouped}, device)
    _report_speed(t, "ModuleList loop", "grouped_linear (auto)")

    if args.train:
        wp, bp = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

        def loop_train() -> None:
            loop().sum().backward()

        def grouped_train() -> None:
            go.grouped_linear(x, wp, bp).sum().backward()

        print("\n   training (forward + backward), decided separately:")
        _report_decision(go.prewarm("grouped_linear", x, wp, bp))
        t = _side_by_side({"ModuleList loop": loop_train, "grouped_linear (auto)": grouped_train}, device)
        _report_speed(t, "ModuleList loop", "grouped_linear (auto)")

    # -- weighted_combine vs the stack-multiply-sum idiom
    k, c, hw = 4, 16, 16
    outs = [torch.randn(batch, c, hw, hw, device=device, dtype=dtype) for _ in range(k)]
    w = torch.softmax(torch.randn(batch, k, device=device, dtype=dtype), dim=-1)

    def stack_sum() -> torch.Tensor:
        return (w[:, :, None, None, None] * torch.stack(outs, 1)).sum(1)

    def combine() -> torch.Tensor:
        return go.weighted_combine(outs, w)

    print(f"\n2. weighted_combine: {k} branch outputs [{batch}, {c}, {hw}, {hw}] mixed by weights [{batch}, {k}]")
    with torch.no_grad():
        decision = go.prewarm("weighted_combine", outs, w)
        _report_match(stack_sum(), combine(), dtype)
        _report_decision(decision)
        t = _side_by_side({"stack * w, sum": stack_sum, "weighted_combine (auto)": combine}, device)
    _report_speed(t, "stack * w, sum", "weighted_combine (auto)")
    print("\nNext: `python -m grouped_ops explain grouped_linear --batch 128 --groups 32 --in 32 --out 32` "
          "or `python -m grouped_ops cache list`.")
    return 0


def _device_label(device: torch.device) -> str:
    from .signature import device_name

    return device_name(device)


def _report_match(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() or 1.0
    ok = err <= {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2) * max(scale, 1.0)
    print(f"   results match: {'yes' if ok else 'NO'} (max abs difference {err:.2e})")


def _report_decision(d: Decision) -> None:
    print(f"   auto chose {d.impl} ({d.source}); every candidate, median time per call:")
    print(d.table() or "   (a single candidate: nothing to compare)")


def _report_speed(t: dict[str, float], base: str, ours: str) -> None:
    print(f"   {base}: {t[base] * 1e6:.1f} us   {ours}: {t[ours] * 1e6:.1f} us   "
          f"speed-up x{t[base] / t[ours]:.2f}")


def _side_by_side(fns: dict[str, Callable[[], Any]], device: torch.device, seconds: float = 0.6) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm up and calibrate
        fn()
    sync()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    sync()
    once = max(time.perf_counter() - start, 1e-6)
    number = max(1, int(2e-3 / once * len(fns)))  # each sample lasts ~2 ms
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(next(iter(samples.values()))) < 5:
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / number)
    return {name: statistics.median(v) for name, v in samples.items()}
