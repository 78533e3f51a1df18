"""Signatures: what the tuner keys its decisions on.

A :class:`Signature` says everything about a call that can change which implementation is fastest:
the op, its sizes (leading dims folded into one batch size, bucketed by default), dtype, device,
layout class and which arguments need gradients. It is hashable, printable and JSON-able.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ._errors import GroupedOpsError


def bucket(size: int) -> int:
    """The power of two at or above ``size``: batch sizes 1..512 fall into ten buckets."""
    return 1 << (size - 1).bit_length() if size > 0 else 0


def bucketing_mode() -> str:
    """``pow2`` (default) or ``exact``, from ``GROUPED_OPS_BUCKETS``."""
    mode = os.environ.get("GROUPED_OPS_BUCKETS", "pow2").strip().lower() or "pow2"
    if mode not in ("pow2", "exact"):
        raise GroupedOpsError(f"GROUPED_OPS_BUCKETS must be 'pow2' or 'exact', got {mode!r}")
    return mode


def bucket_note(sig: Signature) -> str:
    """Says that a signature's batch size is a bucket's edge (empty when it is an exact size)."""
    if bucketing_mode() != "pow2" or "batch" not in dict(sig.dims):
        return ""
    edge = sig.dim("batch")
    if edge <= 2:
        return ""
    return (f"batch={edge} is a bucket: batch sizes {edge // 2 + 1}..{edge} share this decision "
            "(GROUPED_OPS_BUCKETS=exact keys every size)")


def device_name(device: torch.device) -> str:
    """A stable name for the hardware behind ``device``: the GPU model and compute capability, or the
    CPU model and torch's thread count *now* (``torch.set_num_threads`` changes the winner)."""
    if device.type == "cpu":
        return f"{_device_model(device)} x{torch.get_num_threads()}"
    return _device_model(device)


def device_identity(device: torch.device) -> str:
    """Which physical device ``device`` is on this host, for what must not run twice at once on it
    (a tuning): the CPU model for a CPU (every process shares it), the GPU's UUID for CUDA (its
    index changes with CUDA_VISIBLE_DEVICES; its model is shared by other GPUs of the host)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return f"cuda-{uuid}" if uuid is not None else f"cuda{index}-{_device_model(device)}"
    return _device_model(device) if device.type == "cpu" else device.type


@functools.cache
def _device_model(device: torch.device) -> str:
    # Cached: reading /proc/cpuinfo or the CUDA properties is slow, and neither changes in a process.
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"
    if device.type == "cpu":
        return cpu_model()
    return device.type


def numerics(device_type: str) -> tuple[tuple[str, str], ...]:
    """The global math settings that change which implementation is fastest on ``device_type``, as
    (name, value) pairs: float32 matmul precision (TF32 on CUDA, bf16 passes on some CPUs) and
    deterministic algorithms everywhere; on CUDA also cuBLAS's TF32 and reduced-precision
    reduction switches. Cheap (a few flag reads): built once per new signature, never per call."""
    pairs = [("fp32", torch.get_float32_matmul_precision())]
    if device_type == "cuda":
        matmul = torch.backends.cuda.matmul
        pairs += [("tf32", _on(matmul.allow_tf32)),
                  ("bf16red", _on(matmul.allow_bf16_reduced_precision_reduction)),
                  ("fp16red", _on(matmul.allow_fp16_reduced_precision_reduction))]
    pairs.append(("det", _on(torch.are_deterministic_algorithms_enabled())))
    return tuple(pairs)


def _on(flag: object) -> str:
    return "1" if flag else "0"


@contextlib.contextmanager
def applied_numerics(sig: Signature) -> Iterator[None]:
    """Run the block under ``sig``'s math settings (a signature read from a file may have been
    recorded under others than the process has now), restoring the previous ones after."""
    want = dict(sig.numerics)
    before = dict(numerics(sig.device_type))
    setters = _setters(sig.device_type)
    try:
        for name, value in want.items():
            if name in setters and before.get(name) != value:
                setters[name](value)
        yield
    finally:
        for name, value in before.items():
            if name in setters and want.get(name, value) != value:
                setters[name](value)


def _setters(device_type: str) -> dict[str, Any]:
    def det(v: str) -> None:
        torch.use_deterministic_algorithms(v == "1", warn_only=torch.is_deterministic_algorithms_warn_only_enabled())

    out: dict[str, Any] = {"fp32": torch.set_float32_matmul_precision, "det": det}
    if device_type == "cuda":
        matmul = torch.backends.cuda.matmul
        out["tf32"] = lambda v: setattr(matmul, "allow_tf32", v == "1")
        out["bf16red"] = lambda v: setattr(matmul, "allow_bf16_reduced_precision_reduction", v == "1")
        out["fp16red"] = lambda v: setattr(matmul, "allow_fp16_reduced_precision_reduction", v == "1")
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise GroupedOpsError(f"unknown dtype {name!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return dtype


@dataclass(frozen=True)
class Signature:
    """A tuning key. ``dims``, ``layout`` are ordered (name, value) pairs; ``grad`` names the
    arguments that need gradients (empty for inference); ``numerics`` the math settings it was
    made under (:func:`numerics`; the current ones when not given)."""

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: torch.dtype
    device: torch.device
    layout: tuple[tuple[str, str], ...]
    grad: tuple[str, ...]
    numerics: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.numerics:
            object.__setattr__(self, "numerics", numerics(self.device.type))

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]

    def layout_of(self, name: str) -> str:
        return dict(self.layout)[name]

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def needs_grad(self) -> bool:
        return bool(self.grad)

    def with_dim(self, name: str, value: int) -> Signature:
        return Signature(
            self.op,
            tuple((k, value if k == name else v) for k, v in self.dims),
            self.dtype, self.device, self.layout, self.grad, self.numerics,
        )

    def key(self) -> str:
        """The persistent key: device *model*, not index, so identical GPUs share decisions."""
        return f"{self.family_key()} batch={self.dim('batch')}"

    def family_key(self) -> str:
        """The key without the batch size: signatures that differ only in batch are neighbours."""
        dims = ",".join(f"{k}={v}" for k, v in self.dims if k != "batch")
        layout = ",".join(f"{k}={v}" for k, v in self.layout)
        grad = ",".join(self.grad) or "-"
        math = ",".join(f"{k}={v}" for k, v in self.numerics)
        return (f"{self.op}({dims}) {_dtype_name(self.dtype)} {self.device.type}[{device_name(self.device)}]"
                f" math[{math}] {layout} grad={grad}")

    def __str__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims)
        layout = ", ".join(f"{k}={v}" for k, v in self.layout)
        grad = ",".join(self.grad) or "none"
        return f"{self.op}({dims}; {_dtype_name(self.dtype)} on {self.device}; {layout}; grad={grad})"

    def to_spec(self) -> dict[str, Any]:
        """A JSON-able description that :meth:`from_spec` turns back into this signature."""
        return {
            "op": self.op,
            "dims": dict(self.dims),
            "dtype": _dtype_name(self.dtype),
            "device": str(self.device),
            "layout": dict(self.layout),
            "grad": list(self.grad),
            "numerics": dict(self.numerics),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Signature:
        try:
            return cls(
                op=str(spec["op"]),
                dims=tuple((str(k), int(v)) for k, v in spec["dims"].items()),
                dtype=parse_dtype(spec.get("dtype", "float32")),
                device=torch.device(spec.get("device", "cpu")),
                layout=tuple((str(k), str(v)) for k, v in spec.get("layout", {}).items()),
                grad=tuple(spec.get("grad", ())),
                numerics=tuple((str(k), str(v)) for k, v in spec.get("numerics", {}).items()),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GroupedOpsError(f"not a signature spec ({e}): {spec!r}") from None
