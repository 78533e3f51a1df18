"""What several subcommands share: signatures described by flags or read from a file, the device
check, the cache folder and how a signature's bucket is described."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._errors import GroupedOpsError
from ..ops import SPECS, OpSpec
from ..registry import FLOATING
from ..signature import Signature, bucket, bucketing_mode, numerics, parse_dtype
from ..tuning import store


def cache_folder() -> Path:
    """The folder the user cache's entries are in: what every command prints as "cache folder"."""
    return store.DiskStore().root


def positive(text: str) -> int:
    value = int(text)
    if not 0 < value <= _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be a positive integer up to 2**40, got {text}")
    return value


_MAX_SIZE = 1 << 40  # past any real size; torch's int64 sizes would overflow far later in a product


def floating_dtype(text: str) -> str:
    """A ``--dtype`` value the ops compute in (float16, bfloat16, float32, float64)."""
    try:
        dtype = parse_dtype(text)
    except GroupedOpsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if dtype not in FLOATING:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; use float16, bfloat16, float32 or float64")
    return text


# ---- signatures from the command line ------------------------------------------------------------

def add_signature_commands(parser: argparse.ArgumentParser, *, many_batches: bool, required: bool,
                            flags: Callable[[argparse.ArgumentParser, Any], None]) -> None:
    """One sub-command per op (``OpSpec.cli``), with its size flags. ``flags`` adds the command's own flags to each,
    so they work after the op name too (SUPPRESS: not given there, the command's value stands)."""
    ops = parser.add_subparsers(title="op", metavar="OP", dest="op", required=required)
    batch_kw: dict[str, Any] = {"nargs": "+"} if many_batches else {}
    batch_help = "batch size(s): every leading dim folded into one" if many_batches else "batch size"
    for spec in SPECS.values():
        if spec.cli is None:
            continue
        try:  # on a scratch parser first: a registered op whose flags clash must not break the others
            _add_op_flags(argparse.ArgumentParser(add_help=False), spec, batch_help, batch_kw, flags)
        except argparse.ArgumentError as e:
            print(f"grouped_ops: op {spec.name!r} has no sub-command here: its flags clash ({e})", file=sys.stderr)
            continue
        _add_op_flags(ops.add_parser(spec.name, help=spec.cli.help), spec, batch_help, batch_kw, flags)


def _add_op_flags(sub: argparse.ArgumentParser, spec: OpSpec, batch_help: str, batch_kw: dict[str, Any],
                  flags: Callable[[argparse.ArgumentParser, Any], None]) -> None:
    assert spec.cli is not None
    sub.add_argument("--batch", type=positive, required=True, help=batch_help, **batch_kw)
    for flag in spec.cli.flags:
        if flag.dim is not None:
            sub.add_argument(*flag.names, dest=flag.dest, type=flag.type or positive, required=True,
                             metavar=flag.dest.removeprefix("op_").upper(), help=flag.help)
        elif flag.choices:
            sub.add_argument(*flag.names, dest=flag.dest, choices=flag.choices, default=flag.choices[0],
                             help=flag.help)
        else:
            sub.add_argument(*flag.names, dest=flag.dest, action="store_true", help=flag.help)
    _add_common(sub)
    flags(sub, argparse.SUPPRESS)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", type=floating_dtype, help="float32, bfloat16, float16, float64")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def device(name: str) -> torch.device:
    """``name`` as a torch device that can be tuned here, or a readable error."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise GroupedOpsError(f"unknown device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GroupedOpsError(f"device {name!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise GroupedOpsError(f"device {name!r}: only cpu and cuda can be tuned")
    return dev


def signatures_from_args(args: argparse.Namespace) -> list[tuple[Signature, Signature]]:
    """The signatures the op flags describe (one per bucket), exactly as the op would key them, each
    with the exact signature of its first batch size (where it is timed)."""
    dev, dtype = device(args.device), parse_dtype(args.dtype)
    batches = args.batch if isinstance(args.batch, list) else [args.batch]
    spec = SPECS[args.op]
    requests: list[tuple[Signature, Signature]] = []
    for batch in batches:
        # Shape-only stand-ins on the meta device go through the op's own description, so the
        # key is the one a real call makes; then the real device is put in.
        call_args = _meta_args(spec, args, batch, dtype)
        spec.validate(*call_args)
        with torch.enable_grad():
            m = spec.meta(*call_args)
        sig = dataclasses.replace(spec.signature(m, bucketing_mode() == "pow2"), device=dev)
        if all(sig != known for known, _ in requests):
            requests.append((sig, dataclasses.replace(spec.signature(m, False), device=dev)))
    return requests


def _in_call_order(sig: Signature, where: str) -> Signature:
    """``sig`` with its dims, layout, grad and math settings in the order the op's own calls describe them.
    The key is a string in that order, so a hand-written line that lists them in another order would
    be tuned under a key no call makes (silently, before). Names the op does not describe are refused."""
    spec = SPECS[sig.op]
    try:  # shape-only stand-ins of the signature, described as a call would be
        stand_ins = spec.make_inputs(dataclasses.replace(sig, device=torch.device("meta")),
                                     torch.Generator().manual_seed(0))
        with torch.enable_grad():
            probe = spec.signature(spec.meta(*stand_ins), False)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise GroupedOpsError(f"{where}: not a signature of {sig.op} ({type(e).__name__}: {e}); "
                              f"a call of it is described as {_names(sig.op)}") from None
    for part in ("dims", "layout"):
        if sorted(k for k, _ in getattr(sig, part)) != sorted(k for k, _ in getattr(probe, part)):
            raise GroupedOpsError(f"{where}: {part} {[k for k, _ in getattr(sig, part)]} do not match the "
                                  f"op's {[k for k, _ in getattr(probe, part)]}")
    if sorted(sig.grad) != sorted(probe.grad):
        raise GroupedOpsError(f"{where}: grad {list(sig.grad)} names arguments {sig.op} cannot take a "
                              f"gradient for (it described {list(probe.grad)})")
    dims, layout = dict(sig.dims), dict(sig.layout)
    order = [k for k, _ in numerics(sig.device.type)]  # the math settings' own order, then any others
    math = sorted(sig.numerics, key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return dataclasses.replace(sig, dims=tuple((k, dims[k]) for k, _ in probe.dims),
                               layout=tuple((k, layout[k]) for k, _ in probe.layout), grad=probe.grad,
                               numerics=tuple(math))


def _names(op: str) -> str:
    spec = SPECS[op]
    if spec.cli is None:
        return "its signature"
    dims = ["batch", *(f.dim for f in spec.cli.flags if f.dim is not None)]
    layout = [f.layout for f in spec.cli.flags if f.layout is not None]
    return f"dims {dims}, layout {layout}"


def _meta_args(spec: OpSpec, args: argparse.Namespace, batch: int, dtype: torch.dtype) -> tuple[Any, ...]:
    """Shape-only arguments (meta device) laid out as the op's flags say."""
    assert spec.cli is not None
    dims, layout, grad = [("batch", batch)], [], []
    for flag in spec.cli.flags:
        value = getattr(args, flag.dest)
        if flag.dim is not None:
            dims.append((flag.dim, value))
        elif flag.layout is not None:
            layout.append((flag.layout, flag.switch[bool(value)] if flag.switch else value))
        elif value:
            grad += flag.grad
    sig = Signature(spec.name, tuple(dims), dtype, torch.device("meta"), tuple(layout), tuple(grad))
    return spec.make_inputs(sig, torch.Generator().manual_seed(0))


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
        try:
            sig = Signature.from_spec(spec)
        except GroupedOpsError as e:
            raise GroupedOpsError(f"prewarm: {path}:{number}: {e}") from None
        if sig.op not in SPECS:
            raise GroupedOpsError(f"prewarm: {path}:{number}: unknown op {sig.op!r}; valid ops are {list(SPECS)}")
        device(str(sig.device))
        sig = _in_call_order(sig, f"prewarm: {path}:{number}")
        at = spec.get("tune_at_batch")
        batch = sig.dim("batch")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at <= 0
                               or (at != batch and bucket(at) != batch)):
            raise GroupedOpsError(f"prewarm: {path}:{number}: tune_at_batch={at!r} is not a batch size in "
                                  f"the bucket batch={batch}")
        sigs.append((sig, None if at is None else sig.with_dim("batch", at)))
    return sigs


