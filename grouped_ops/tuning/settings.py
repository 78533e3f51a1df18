"""Tuning knobs, read from the environment when asked (never on the hot path)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .._errors import GroupedOpsError


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise GroupedOpsError(f"{name} must be a number, got {raw!r}") from None


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    autotune: bool  # GROUPED_OPS_AUTOTUNE=0 switches tuning (and every disk write) off
    budget_s: float  # GROUPED_OPS_TUNE_BUDGET_S: time for the repeated timing rounds of one signature
    max_reps: int  # GROUPED_OPS_TUNE_REPS: timed samples per candidate at most
    memory_fraction: float  # GROUPED_OPS_TUNE_MEMORY_FRACTION of free memory a candidate's workspace may take
    memory_bytes: float  # GROUPED_OPS_TUNE_MEMORY_BYTES: an absolute workspace budget (overrides the fraction)
    verbose: bool  # GROUPED_OPS_VERBOSE=1 prints every decision to stderr
    distributed: bool  # GROUPED_OPS_DISTRIBUTED=0: no cross-rank agreement even under torch.distributed
    wait_s: float  # GROUPED_OPS_TUNE_WAIT_S: how long to wait for another process's tuning on the device
    lock_dir: str  # GROUPED_OPS_LOCK_DIR: the host-local folder of the per-device tuning locks ("": default)


def settings() -> Settings:
    return Settings(
        autotune=_flag("GROUPED_OPS_AUTOTUNE", True),
        budget_s=_float("GROUPED_OPS_TUNE_BUDGET_S", 0.3),
        max_reps=int(_float("GROUPED_OPS_TUNE_REPS", 25)),
        memory_fraction=_float("GROUPED_OPS_TUNE_MEMORY_FRACTION", 0.25),
        memory_bytes=_float("GROUPED_OPS_TUNE_MEMORY_BYTES", 0.0),
        verbose=_flag("GROUPED_OPS_VERBOSE", False),
        distributed=_flag("GROUPED_OPS_DISTRIBUTED", True),
        wait_s=_float("GROUPED_OPS_TUNE_WAIT_S", 60.0),
        lock_dir=os.environ.get("GROUPED_OPS_LOCK_DIR", "").strip(),
    )


def memory_budget(device: torch.device, s: Settings, *, cgroup_root: str | os.PathLike[str] | None = None) -> float:
    """Bytes of workspace one candidate may use while tuning on ``device``: the fraction
    ``s.memory_fraction`` of :func:`free_memory`, or ``s.memory_bytes`` when that is set."""
    if s.memory_bytes > 0:
        return s.memory_bytes
    return free_memory(device, cgroup_root=cgroup_root) * s.memory_fraction


def free_memory(device: torch.device, *, cgroup_root: str | os.PathLike[str] | None = None) -> float:
    """Bytes that a new allocation on ``device`` can take.

    CUDA: the driver's free memory plus what torch's caching allocator holds reserved but unused
    (it hands that out before asking the driver). CPU: the host's available pages, capped by a
    container's cgroup limit (``GROUPED_OPS_CGROUP_ROOT`` or ``cgroup_root`` override the folder,
    for tests); a cgroup-limited job is killed at its limit whatever the host has free.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return float(free + max(cached, 0))
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 4 << 30
    limit = cgroup_free(cgroup_root or os.environ.get("GROUPED_OPS_CGROUP_ROOT") or "/sys/fs/cgroup")
    return float(free if limit is None else min(free, limit))


_NO_LIMIT = 1 << 60  # v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)


def cgroup_free(root: str | os.PathLike[str], self_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> float | None:
    """Bytes left under the tightest cgroup memory limit on this process, or None without one.

    Looks in the process's own cgroup (its path from ``self_cgroup``, below ``root``) and at
    ``root`` itself (inside a container the namespace puts the process's cgroup there), for
    cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory/memory.limit_in_bytes``,
    ``memory/memory.usage_in_bytes``)."""
    v2, v1 = "", ""
    try:
        for line in Path(self_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2 = path.strip().lstrip("/")
            elif "memory" in controllers.split(","):
                v1 = path.strip().lstrip("/")
    except (OSError, ValueError):
        pass
    base = Path(root)
    pairs = [(base / v2 / "memory.max", base / v2 / "memory.current"),
             (base / "memory.max", base / "memory.current"),
             (base / "memory" / v1 / "memory.limit_in_bytes", base / "memory" / v1 / "memory.usage_in_bytes"),
             (base / "memory" / "memory.limit_in_bytes", base / "memory" / "memory.usage_in_bytes"),
             (base / "memory.limit_in_bytes", base / "memory.usage_in_bytes")]
    left = [x for limit, usage in dict.fromkeys(pairs) if (x := _left(limit, usage)) is not None]
    return min(left, default=None)


def _left(limit_file: Path, usage_file: Path) -> float | None:
    try:
        raw_limit, raw_usage = limit_file.read_text().strip(), usage_file.read_text().strip()
        if raw_limit == "max":
            return None
        limit, usage = int(raw_limit), int(raw_usage)
    except (OSError, ValueError):
        return None
    return None if limit >= _NO_LIMIT else float(max(limit - usage, 0))
