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


# How many times the leanest implementation's footprint (result, gradients, workspace) a candidate
# may need to be timed: chosen from the CPU sweep and the first-call peaks measured in
# docs/benchmarks/first-call-memory.md (scripts/memory_multiple.py, scripts/first_call_memory.py).
MEMORY_MULTIPLE = 2.0


@dataclass(frozen=True)
class Settings:
    autotune: bool  # GROUPED_OPS_AUTOTUNE=0 switches tuning (and every disk write) off
    budget_s: float  # GROUPED_OPS_TUNE_BUDGET_S: time for the repeated timing rounds of one signature
    max_reps: int  # GROUPED_OPS_TUNE_REPS: timed samples per candidate at most
    memory_fraction: float  # GROUPED_OPS_TUNE_MEMORY_FRACTION of free memory a candidate's workspace may take
    memory_bytes: float  # GROUPED_OPS_TUNE_MEMORY_BYTES: an absolute workspace budget (overrides the fraction)
    memory_multiple: float  # GROUPED_OPS_TUNE_MEMORY_MULTIPLE: a candidate's footprint over the leanest's, at most
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
        memory_multiple=max(1.0, _float("GROUPED_OPS_TUNE_MEMORY_MULTIPLE", MEMORY_MULTIPLE)),
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
    (it hands that out before asking the driver). CPU: the kernel's estimate of memory available
    without swapping (``MemAvailable``: free pages plus the page cache it can drop), capped by the
    address space left under ``RLIMIT_AS`` (``ulimit -v``: past it every allocation fails) and by
    a container's cgroup limit (``GROUPED_OPS_CGROUP_ROOT`` or ``cgroup_root`` override the folder,
    for tests); a cgroup-limited job is killed at its limit whatever the host has free.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return float(free + max(cached, 0))
    left = [available_memory(), address_space_left(),
            cgroup_free(cgroup_root or os.environ.get("GROUPED_OPS_CGROUP_ROOT") or "/sys/fs/cgroup")]
    return float(min(x for x in left if x is not None))


def available_memory(meminfo: str | os.PathLike[str] = "/proc/meminfo") -> float:
    """``MemAvailable`` (bytes), else the free pages (``MemFree``; no /proc), else 4 GiB."""
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float(4 << 30)


def address_space_left(status: str | os.PathLike[str] = "/proc/self/status") -> float | None:
    """Bytes of address space left under this process's ``RLIMIT_AS`` (its soft limit less the
    current ``VmSize``), or None without a limit."""
    try:
        import resource  # POSIX only
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmSize:"):
                return float(max(soft - int(line.split()[1]) * 1024, 0))
    except (OSError, ValueError, IndexError):
        pass
    return float(soft)


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
