"""Decision: which implementation a signature uses, and why; one table renderer for every report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .signature import Signature

# Sources whose decision was measured on this hardware (guesses must not seed further guesses).
MEASURED = frozenset({"tuned", "cache", "shipped", "broadcast"})


@dataclass(frozen=True)
class Decision:
    """Which implementation a signature uses, and why.

    source: ``"cache"`` (memory or the user's disk cache), ``"shipped"`` (a table shipped with the
    library, timed on a machine of this kind when the table was made), ``"tuned"`` (this call timed it),
    ``"forced"`` (a ``use_impl`` scope), ``"env"`` (GROUPED_OPS_IMPL), ``"broadcast"`` (taken
    from rank 0 at a collective prewarm), ``"stale"`` (an entry from other library/torch versions,
    used because tuning is not allowed here), ``"nearest"`` (the decision of the nearest tuned batch
    size) or ``"default"`` (the op's documented rule).
    timings: median seconds per call of each timed candidate; skipped: why the others were not timed.
    opinions: where batch prewarm tuned a close call again, each tuning's pick in order (the
    decision is their majority); empty otherwise.
    provisional: timed where timings are not representative (under a profiler): used in this
    process until one clean re-tuning, never written to disk.
    partial: why a measured decision is partial, or ``""`` for a full one: ``"noise"`` (its
        timings stayed unstable to the end of the tuning budget) or ``"out of memory: a, b"``
        (those candidates ran out of memory, so it picks among the ones that fitted). A partial
        decision is stored and used like a full one, and re-tuned once where tuning is allowed: by
        the first process started after it was stored that may tune (one per host: the tuning
        lock), or by batch prewarm's later pass; the process that measured it and its peers
        running alongside do not repeat it.
    tunings: how many tunings this decision comes from (a partial decision re-tuned once has 2;
        after that it is kept as it is).
    stored: whether this call wrote the decision to the user's disk cache (under torch.distributed,
        a broadcast decision says what rank 0's call did).
    not_stored: why it was not written (empty when it was, or when it came from a store): an
        unwritable cache folder, a tuning under a profiler or exclusions, or a guess's reason for
        not tuning. A decision remembered from an earlier call keeps it.
    """

    impl: str
    source: str
    timings: Mapping[str, float] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    signature: Signature | None = None
    opinions: tuple[str, ...] = ()
    provisional: bool = False
    partial: str = ""
    tunings: int = 1
    stored: bool = False
    not_stored: str = ""

    def __str__(self) -> str:
        return f"{self.impl} ({self.source})" + (f" for {self.signature}" if self.signature else "")

    def table(self) -> str:
        """Every candidate's timing or the reason it was not timed, fastest first."""
        rows = []
        best = min(self.timings.values(), default=None)
        w = max((len(n) for n in (*self.timings, *self.skipped)), default=0) + 1  # one column per name
        for name, t in sorted(self.timings.items(), key=lambda kv: kv[1]):
            mark = "*" if name == self.impl else " "
            ratio = f"x{t / best:.2f}" if best else ""
            rows.append(f" {mark} {name:<{w}} {t * 1e6:>12.1f} us   {ratio}")
        for name, why in self.skipped.items():
            if name not in self.timings:
                rows.append(f"   {name:<{w}} {'-':>12}      {why}")
            else:
                rows.append(f"   {'':<{w}} {'':>12}      ({name}: {why})")
        if self.opinions:
            rows.append(f"   picks of {len(self.opinions)} tunings: {', '.join(self.opinions)}")
        if self.partial:
            rows.append(f"   {partial_note(self)}")
        return "\n".join(rows)


def partial_note(d: Decision) -> str:
    """One line on a partial decision: why, and whether it is still to be tuned once more."""
    again = "tuned once more where tuning is allowed" if d.tunings < 2 else "kept as it is"
    return f"partial: {d.partial} (from {d.tunings} tuning{'s' if d.tunings != 1 else ''}; {again})"
