"""What several subcommands share: signatures described by flags or read from a file, the device
check, the cache folder and how a signature's bucket is described."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._errors import GroupedOpsError
from ..ops import SPECS
from ..signature import Signature, bucket, bucketing_mode, parse_dtype
from ..tuning import store

OPS = tuple(SPECS)


def cache_folder() -> Path:
    """The folder the user cache's entries are in: what every command prints as "cache folder"."""
    return store.DiskStore().root


def bucket_note(sig: Signature) -> str:
    """Says that a signature's batch size is a bucket's edge (empty when it is an exact size)."""
    if bucketing_mode() != "pow2" or "batch" not in dict(sig.dims):
        return ""
    edge = sig.dim("batch")
    if edge <= 2:
        return ""
    return (f"batch={edge} is a bucket: batch sizes {edge // 2 + 1}..{edge} share this decision "
            "(GROUPED_OPS_BUCKETS=exact keys every size)")


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def features(text: str) -> int:
    """``1024`` or ``32x8x8`` (the feature dims of one branch output, multiplied)."""
    try:
        value = math.prod(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"features must look like 1024 or 32x8x8, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"features must be positive, got {text!r}")
    return value



# ---- signatures from the command line ------------------------------------------------------------

def add_signature_commands(parser: argparse.ArgumentParser, *, many_batches: bool, required: bool,
                            flags: Callable[[argparse.ArgumentParser, Any], None]) -> None:
    """One sub-command per op, with its size flags. ``flags`` adds the command's own flags to each,
    so they work after the op name too (SUPPRESS: not given there, the command's value stands)."""
    ops = parser.add_subparsers(title="op", metavar="OP", dest="op", required=required)
    batch_kw: dict[str, Any] = {"nargs": "+"} if many_batches else {}
    batch_help = "batch size(s): every leading dim folded into one" if many_batches else "batch size"

    gl = ops.add_parser("grouped_linear", help="input [batch, groups, in] -> [batch, groups, out]")
    gl.add_argument("--batch", type=positive, required=True, help=batch_help, **batch_kw)
    gl.add_argument("--groups", "-n", type=positive, required=True, help="number of groups n")
    gl.add_argument("--in", dest="in_features", type=positive, required=True, help="input features per group")
    gl.add_argument("--out", dest="out_features", type=positive, required=True,
                    help="output features per group")
    gl.add_argument("--no-bias", action="store_true", help="bias=None")
    gl.add_argument("--weight-layout", choices=("contiguous", "transposed", "chunked", "shared", "strided"),
                    default="contiguous",
                    help="contiguous [n, out, in]; transposed: W.transpose(1, 2) of an [n, in, out] tensor; "
                    "chunked: groups further apart than out*in; shared: one weight expanded to n groups")
    gl.add_argument("--input-layout", choices=("contiguous", "strided"), default="contiguous",
                    help="contiguous [batch, n, in]; strided: a [batch, n, in] view of an [n, batch, in] tensor")
    gl.add_argument("--grad", action="store_true", help="training: weight and bias need gradients")
    gl.add_argument("--grad-input", action="store_true", help="training: the input needs a gradient too")
    _add_common(gl)
    flags(gl, argparse.SUPPRESS)

    wc = ops.add_parser("weighted_combine", help="k inputs [batch, *features] and weights [batch, k]")
    wc.add_argument("--batch", type=positive, required=True, help=batch_help, **batch_kw)
    wc.add_argument("--k", type=positive, required=True, help="number of inputs (branches) combined")
    wc.add_argument("--features", type=features, required=True,
                    help="the feature dims of one input, e.g. 1024 or 32x8x8")
    wc.add_argument("--list", action="store_true", help="a list of k tensors instead of one stacked tensor")
    wc.add_argument("--non-contiguous", action="store_true", help="inputs are transposed views")
    wc.add_argument("--grad", action="store_true", help="training: inputs and weights need gradients")
    _add_common(wc)
    flags(wc, argparse.SUPPRESS)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, float64")
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
        call_args = _meta_args(args, batch, dtype)
        spec.validate(*call_args)
        with torch.enable_grad():
            m = spec.meta(*call_args)
        sig = dataclasses.replace(spec.signature(m, bucketing_mode() == "pow2"), device=dev)
        if all(sig != known for known, _ in requests):
            requests.append((sig, dataclasses.replace(spec.signature(m, False), device=dev)))
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
        try:
            sig = Signature.from_spec(spec)
        except GroupedOpsError as e:
            raise GroupedOpsError(f"prewarm: {path}:{number}: {e}") from None
        if sig.op not in SPECS:
            raise GroupedOpsError(f"prewarm: {path}:{number}: unknown op {sig.op!r}; valid ops are {list(OPS)}")
        device(str(sig.device))
        at = spec.get("tune_at_batch")
        batch = sig.dim("batch")
        if at is not None and (not isinstance(at, int) or isinstance(at, bool) or at <= 0
                               or (at != batch and bucket(at) != batch)):
            raise GroupedOpsError(f"prewarm: {path}:{number}: tune_at_batch={at!r} is not a batch size in "
                                  f"the bucket batch={batch}")
        sigs.append((sig, None if at is None else sig.with_dim("batch", at)))
    return sigs


