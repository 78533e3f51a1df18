"""The float64 references, the tolerance, and :func:`assert_implementations_agree`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .._errors import GroupedOpsError
from ..functional import implementations, public
from ..ops import SPECS
from ..ops._spec import OpSpec
from ..ops.grouped_linear import reference as reference_grouped_linear
from ..ops.weighted_combine import reference as reference_weighted_combine
from ..registry import tolerance as _dtype_tolerance

__all__ = ["assert_implementations_agree", "reference_grouped_linear", "reference_weighted_combine", "tolerance"]


def tolerance(dtype: torch.dtype, length: int = 1) -> tuple[float, float]:
    """``(rtol, atol)`` for a result of ``dtype`` that sums ``length`` products.

    A result passes when ``‖got − ref‖ ≤ rtol·‖mag‖ + atol·√numel`` and no element is off by more
    than ``4·rtol·mag + atol``, where ``mag`` is the reference computed on absolute values
    (``|W|·|x| + |b|``): the scale of the rounding errors, which cancellation in ``ref`` cannot shrink.
    ``rtol`` grows like √length beyond 16 terms (rounding errors add up like a random walk).
    """
    tol = _dtype_tolerance(dtype)  # the rtol and atol columns of grouped_ops.registry.TOLERANCE
    return tol.rtol * max(1.0, math.sqrt(length / 16)), tol.atol


# ---- the agreement check -------------------------------------------------------------------------

def _normalize(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[OpSpec, tuple[Any, ...]]:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    if name not in SPECS:
        raise GroupedOpsError(f"assert_implementations_agree: unknown op {name!r}; valid ops are {sorted(SPECS)}")
    spec = SPECS[name]
    return spec, spec.normalize(args, dict(kwargs), "assert_implementations_agree")


def _named_tensors(spec: OpSpec, args: tuple[Any, ...]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor argument with a readable name (``inputs[2]`` in a sequence), in argument order."""
    named: list[tuple[str, torch.Tensor]] = []
    for a, value in zip(spec.arguments, args, strict=True):
        if isinstance(value, torch.Tensor):
            named.append((a.name, value))
        elif isinstance(value, (tuple, list)):
            named += [(f"{a.name}[{i}]", t) for i, t in enumerate(value)]
    return named


def _describe(name: str, t: Any) -> str:
    if t is None:
        return f"{name}: None"
    if not isinstance(t, torch.Tensor):
        return f"{name}: {type(t).__name__}"
    return (f"{name}: shape {tuple(t.shape)}, stride {t.stride()}, "
            f"{str(t.dtype).removeprefix('torch.')}, {t.device}, requires_grad={t.requires_grad}")


def _upcast(args: tuple[Any, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, ...]:
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():  # integer offsets stay as they are
            return t
        return fn(t.detach().to(torch.float64)).requires_grad_(t.requires_grad)
    return tuple(type(a)(one(t) for t in a) if isinstance(a, (tuple, list)) else one(a) for a in args)


def _cast(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g.to(dtype)`` that keeps stride-0 (broadcast) dims, like the gradient ``out.sum()`` sends."""
    if g.dtype == dtype:
        return g
    small = g
    for d, (size, step) in enumerate(zip(g.shape, g.stride(), strict=True)):
        if step == 0 and size > 1:
            small = small.narrow(d, 0, 1)
    return small.to(dtype).expand(g.shape)


def _run(fn: Callable[..., torch.Tensor], args: tuple[Any, ...], targets: list[torch.Tensor],
         grad_output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    with torch.enable_grad() if targets else torch.no_grad():
        out = fn(*args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"returned {type(out).__name__}, not a tensor")
        grads: list[torch.Tensor | None] = []
        if targets and out.shape == grad_output.shape:
            if not out.requires_grad:
                raise RuntimeError("the output does not require grad, so no gradient flows to the arguments")
            grads = list(torch.autograd.grad(out, targets, _cast(grad_output, out.dtype),
                                              allow_unused=True))
    return out.detach(), grads


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _effective_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The precision float32 matmuls really run at: TF32 (about float16's mantissa) or bfloat16
    when ``torch.set_float32_matmul_precision`` or ``allow_tf32`` allow it."""
    if dtype != torch.float32:
        return dtype
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return torch.bfloat16
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return torch.float16 if precision == "high" or tf32 else dtype


def _compare(what: str, got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor,
             dtype: torch.dtype, length: int) -> str | None:
    """None when ``got`` matches ``ref`` (float64) within the tolerance of ``dtype``; else why not."""
    if tuple(got.shape) != tuple(ref.shape):
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if got.numel() == 0:
        return None
    g = got.detach().to(device=ref.device, dtype=torch.float64)
    finite = ref.isfinite()
    if not bool(finite.all()):  # non-finite reference entries must be reproduced exactly
        off = ~finite & ~((g == ref) | (g.isnan() & ref.isnan()))
        if bool(off.any()):
            idx = tuple(int(i) for i in off.nonzero()[0])
            return f"{what}: {float(g[idx])} at index {idx} where the reference has {float(ref[idx])}"
        g, ref, mag = g[finite], ref[finite], mag[finite]
    diff = (g - ref).abs()
    rtol, atol = tolerance(dtype, length)
    max_err = float(diff.max()) if diff.numel() else 0.0
    scale = float(mag.norm())
    err = float(diff.norm())
    allowed = rtol * scale + atol * math.sqrt(diff.numel())
    elementwise_ok = bool((diff <= 4 * rtol * mag.abs() + atol).all())
    if err <= allowed and elementwise_ok:  # both false for nan
        return None
    where = ""
    if diff.numel() and got.shape == ref.shape:
        flat = int(torch.nan_to_num(diff, nan=math.inf).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(ref.shape)))
        where = f" at index {idx} (got {float(g[idx]):.6g}, expected {float(ref[idx]):.6g})"
    rel = err / scale if scale > 0 else math.inf
    return (f"{what}: max abs err {max_err:.3g}{where}; normwise rel err {rel:.3g} "
            f"(relative to ‖|a|·|b|‖ = {scale:.3g}), tolerance rtol={rtol:.3g} atol={atol:.3g} "
            f"({str(dtype).removeprefix('torch.')}, sum of {length} terms)"
            + ("" if elementwise_ok or not (err <= allowed) else "; normwise fine but elementwise off"))


def assert_implementations_agree(
    op: str | Callable[..., Any],
    *args: Any,
    reference: Callable[..., torch.Tensor] | None = None,
    impls: Iterable[str] | None = None,
    grad_output: torch.Tensor | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[str, ...]:
    """Check every implementation of ``op`` against a float64 reference, forward and backward.

    Each implementation that supports the arguments (see ``grouped_ops.implementations(op)``) runs
    through the public op with ``impl=name``. Its output and the gradient of every argument that
    requires grad (from ``torch.autograd.grad`` with a random ``grad_output``) are compared with the
    reference evaluated in float64 on upcast copies of the arguments; see :func:`tolerance`. It
    also checks that no implementation changed its arguments.

    Example:
        >>> x, w, b = torch.randn(8, 4, 16), torch.randn(4, 32, 16), torch.randn(4, 32)
        >>> assert_implementations_agree("grouped_linear", x, w.requires_grad_(), b)
        ('bmm', 'bmm_weight_left', 'einsum', 'grouped_mm', 'loop', 'masked_dense')

    Args:
        op: ``"grouped_linear"``, ``"weighted_combine"``, a registered op's name (or the public
            function itself).
        *args: the op's arguments (any of them may be given by keyword, e.g. ``bias=``).
        reference: a function taking the same arguments (float64 copies) that computes the right
            answer differentiably; default the op's own (:func:`reference_grouped_linear`,
            :func:`reference_weighted_combine`, ``OpSpec.reference``).
        impls: the implementation names to check (``"auto"`` allowed); default all of them.
            Those that do not support the arguments are skipped.
        grad_output: the gradient of the output to back-propagate; default seeded random normal.
        seed: seeds the default ``grad_output``.

    Returns:
        The implementation names that were checked.

    Raises:
        AssertionError: listing each implementation that differs, in the output or which gradient,
            with its errors, the tolerance and the arguments' shapes, strides and dtypes.
        GroupedOpsError: an unknown op, or arguments that do not fit or are invalid for ``op``.
    """
    spec, args = _normalize(op, args, kwargs)
    name = spec.name
    spec.validate(*args)
    default_reference = spec.reference or reference
    if default_reference is None:
        raise TypeError(f"assert_implementations_agree: {name} has no reference; pass reference=")
    names = list(implementations(name)) if impls is None else list(impls)
    for impl in names:
        if impl != "auto":
            spec.registry[impl]  # raises a GroupedOpsError listing the valid names

    named = _named_tensors(spec, args)
    dtype = named[0][1].dtype
    device = named[0][1].device
    targets = [(n, t) for n, t in named if t.requires_grad]
    lengths = spec.reduction_lengths(args) if spec.reduction_lengths else {}

    # the reference and the rounding-error scale |a|·|b|, in float64 without autocast
    ref_fn = reference or default_reference
    has_autocast = torch.amp.is_autocast_available(device.type)
    with torch.autocast(device.type, enabled=False) if has_autocast else contextlib.nullcontext():
        args64 = _upcast(args, lambda t: t)
        abs64 = _upcast(args, torch.abs)
        out_shape = default_reference(*abs64).shape
        if grad_output is None:
            gen = torch.Generator().manual_seed(seed)
            # rounded to the arguments' dtype, so the reference sees exactly what the impls see
            g64 = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype).to(torch.float64)
        else:
            g64 = _cast(grad_output.detach(), torch.float64)
        g64 = g64.to(device)
        if tuple(g64.shape) != tuple(out_shape):
            raise TypeError(f"grad_output has shape {tuple(g64.shape)}; expected {tuple(out_shape)}")
        t64 = [t for n, t in _named_tensors(spec, args64) if t.requires_grad]
        try:
            ref_out, ref_grads = _run(ref_fn, args64, t64, g64)
        except Exception as e:
            raise TypeError(f"assert_implementations_agree: the reference failed on float64 copies of the "
                            f"arguments ({type(e).__name__}: {e}); it must be differentiable when an "
                            f"argument requires grad") from e
        if ref_out.dtype != torch.float64:
            ref_out = ref_out.double()
        if tuple(ref_out.shape) != tuple(out_shape):
            raise TypeError(f"reference returned shape {tuple(ref_out.shape)}; expected {tuple(out_shape)}")
        t_abs = [t for n, t in _named_tensors(spec, abs64) if t.requires_grad]
        mag_out, mag_grads = _run(default_reference, abs64, t_abs, g64.abs())

    snapshot = [(n, t.detach().clone()) for n, t in named]
    meta = spec.meta(*args)
    sig = spec.signature(meta, False)
    autocast = has_autocast and torch.is_autocast_enabled(device.type)
    fn = public(spec)
    checked: list[str] = []
    failures: list[str] = []
    skipped: list[str] = []
    for impl in names:
        if impl != "auto":
            reasons = spec.registry[impl].not_supported_reasons(sig)
            if reasons:
                skipped.append(f"{impl} ({'; '.join(reasons)})")
                continue
        checked.append(impl)
        try:
            out, grads = _run(lambda *a, impl=impl: fn(*a, impl=impl), args,
                              [t for _, t in targets], g64)
        except Exception as e:  # an implementation that raises is a disagreement, reported as such
            failures.append(f"[{impl}] raised {type(e).__name__}: {e}")
            continue
        problems = []
        if out.device != device:
            problems.append(f"forward: output on {out.device}, expected {device}")
        if not autocast and out.dtype != dtype:
            problems.append(f"forward: output dtype {out.dtype}, expected {dtype}")
        low = _effective_dtype(out.dtype if out.dtype.itemsize < dtype.itemsize else dtype, device)
        problems.append(_compare("forward", out, ref_out, mag_out, low, lengths.get("forward", 1)))
        if out.shape == ref_out.shape:
            for (tname, t), g, rg, mg in zip(targets, grads, ref_grads, mag_grads, strict=True):
                g = torch.zeros_like(t) if g is None else g
                rg = torch.zeros_like(t, dtype=torch.float64) if rg is None else rg
                mg = torch.zeros_like(rg) if mg is None else mg
                if g.dtype != t.dtype:
                    problems.append(f"grad {tname}: dtype {g.dtype}, expected {t.dtype}")
                key = tname.split("[", 1)[0]  # inputs[2]: the length of its argument
                problems.append(_compare(f"grad {tname}", g, rg.double(), mg, low,
                                         lengths.get(tname, lengths.get(key, 1))))
        for (aname, before), (_, now) in zip(snapshot, named, strict=True):
            if not _same_values(before, now.detach()):
                problems.append(f"modified its argument {aname} in place")
        failures += [f"[{impl}] {p}" for p in problems if p]

    if failures:
        lines = [f"{name}: implementations disagree with the float64 reference "
                 f"({'given reference' if reference else 'default reference'}):"]
        lines += [f"  {f}" for f in failures]
        lines.append("arguments:")
        lines += [f"  {_describe(n, t)}" for n, t in _named_tensors(spec, args)]
        lines += [f"  {a.name}: None" for a, v in zip(spec.arguments, args, strict=True) if v is None]
        lines.append(f"signature: {sig}")
        culprits = {f.split("]", 1)[0] for f in failures}
        if len(checked) > 1 and len(culprits) == len(checked):
            lines.append(f"all {len(checked)} implementations disagree: if they agree with each other, "
                         "suspect the reference")
        if skipped:
            lines.append("not run (unsupported): " + ", ".join(skipped))
        raise AssertionError("\n".join(lines))
    return tuple(checked)
