"""Agreement across ranks under torch.distributed, by signature, at collective prewarms only.

An op call never enters a collective: the ranks of a job may call the ops in different orders
and on different sets of signatures (sequence lengths, pipeline stages, validation on rank 0
alone), and a collective that only some ranks enter pairs with another one (DDP's gradient
all-reduce) and aborts the job or mixes data. So a first call decides locally, on each rank.

Where ranks must agree (one implementation everywhere, so that every rank computes the same
bits), they prewarm together: :func:`agree` is collective. Every rank passes the signatures it
wants; rank 0 decides the union and broadcasts the decisions keyed by signature; each rank takes
the decision of each of its own signatures by that key, never another signature's, and decides
locally any that its hardware cannot run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._errors import GroupedOpsError
from ..decision import Decision
from ..signature import Signature
from ..tuning.settings import Settings

Request = tuple[Signature, Signature | None]  # (signature, the exact signature to time it at)


def active(s: Settings) -> bool:
    """Whether ranks should agree: torch.distributed is initialised with more than one rank and
    GROUPED_OPS_DISTRIBUTED is not 0."""
    dist = torch.distributed
    return s.distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int | None:
    dist = torch.distributed
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else None


def _object_device() -> torch.device | None:
    # NCCL moves pickled objects through the current CUDA device; the caller must have set it.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def agree(requests: Sequence[Request], decide_all: Callable[[list[Request]], list[Decision]],
          decide_local: Callable[[Request], Decision]) -> list[Decision]:
    """Collective: every rank calls it (with its own ``requests``, possibly different or empty).

    Rank 0 runs ``decide_all`` on the union of all ranks' requests; each rank gets, for each of its
    own requests in order, the decision made for that signature (source ``"broadcast"`` off rank
    0; every other field as rank 0 has it, ``partial``, ``tunings``, ``stored`` and ``not_stored``
    included), or ``decide_local``'s where rank 0's pick cannot run here.

    No rank holds a device's tuning lock (:mod:`grouped_ops.tuning.lock`) across the collectives
    here: rank 0 takes it for each tuning in ``decide_all``, between them, while the others wait in
    the broadcast; a rank that is tuning a first call on its own finishes and lets go before it
    enters this.
    """
    dist = torch.distributed
    mine = [(sig.to_spec(), None if at is None else at.to_spec()) for sig, at in requests]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    me = dist.get_rank()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if me == 0:
        union: dict[str, Request] = {}
        for specs in gathered:
            for spec, at in specs:
                sig = Signature.from_spec(spec)
                union.setdefault(sig.key(), (sig, None if at is None else Signature.from_spec(at)))
        try:
            decisions = decide_all(list(union.values()))
            box[0] = json.dumps({d.signature.key(): _fields(d) for d in decisions if d.signature is not None})
        except BaseException as e:  # the other ranks are already waiting: tell them, then raise
            failure = e
            box[0] = json.dumps({"(error)": f"{type(e).__name__}: {e}"})
    dist.broadcast_object_list(box, src=0, device=_object_device())
    if failure is not None:
        raise failure
    table = json.loads(box[0])
    if "(error)" in table:
        raise GroupedOpsError(f"prewarm: rank 0 failed to decide: {table['(error)']}")
    out = []
    for request in requests:
        sig = request[0]
        data = table.get(sig.key())
        if data is None:  # cannot happen unless ranks disagree on keys (different hardware names)
            out.append(decide_local(request))
            continue
        out.append(Decision(**{**data, "source": data["source"] if me == 0 else "broadcast", "signature": sig,
                               "opinions": tuple(data["opinions"])}))
    return out


def _fields(d: Decision) -> dict[str, Any]:
    """Every field of ``d`` but its signature (the key says it), JSON-able: a rank gets rank 0's
    decision whole, its partial state and whether rank 0 stored it included."""
    fields = {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if f.name != "signature"}
    return {**fields, "timings": dict(d.timings), "skipped": dict(d.skipped), "opinions": list(d.opinions)}
