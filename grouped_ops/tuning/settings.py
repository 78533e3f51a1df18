"""Tuning knobs, read from the environment when asked (never on the hot path)."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def settings() -> Settings:
    return Settings(
        autotune=_flag("GROUPED_OPS_AUTOTUNE", True),
        budget_s=_float("GROUPED_OPS_TUNE_BUDGET_S", 0.3),
        max_reps=int(_float("GROUPED_OPS_TUNE_REPS", 25)),
        memory_fraction=_float("GROUPED_OPS_TUNE_MEMORY_FRACTION", 0.25),
        memory_bytes=_float("GROUPED_OPS_TUNE_MEMORY_BYTES", 0.0),
        verbose=_flag("GROUPED_OPS_VERBOSE", False),
        distributed=_flag("GROUPED_OPS_DISTRIBUTED", True),
    )


def memory_budget(device: torch.device, s: Settings) -> float:
    """Bytes of workspace one candidate may use while tuning on ``device``."""
    if s.memory_bytes > 0:
        return s.memory_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    return free * s.memory_fraction
