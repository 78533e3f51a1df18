"""A transformers (>= 5) mixture-of-experts backend on grouped_ops: ``"grouped_ops"``.

    >>> from grouped_ops.integrations.transformers import register
    >>> model.set_experts_implementation(register())     # or from_config(..., experts_implementation=)

transformers' experts modules (Mixtral, Qwen3-MoE, OLMoE, GPT-OSS, ... everything decorated with
``use_experts_implementation``) call ``fn(self, hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`` for the backend their config names. This one routes with
:func:`grouped_ops.moe_routing`, runs both projections as the ragged ``grouped_linear`` (its tuned
implementation: a loop over the experts that got rows, a padded bmm, ...) and un-permutes and
combines with :func:`grouped_ops.unpermute_combine`, in the hidden states' dtype (float32 routing
weights included). docs/moe.md has the numbers.

The experts module's attributes are read as the installed transformers has them: ``gate_up_proj``
(or ``up_proj`` without ``has_gate``), ``down_proj``, their ``*_bias`` with ``has_bias``,
``is_transposed`` (``[E, in, out]`` storage, as GPT-OSS), ``num_experts``, ``_apply_gate`` (the
model's own gating: GPT-OSS clamps and interleaves), ``act_fn``, ``has_post_expert_norm`` /
``post_expert_norm`` and ``_is_expert_parallel`` (ids ``>= num_experts`` are other ranks' tokens:
they get no rows and no weight). An attribute an older version lacks takes transformers' default.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..functional import grouped_linear, unpermute_combine
from ..routing import moe_routing

NAME = "grouped_ops"


def experts_forward(self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``"grouped_ops"`` experts backend: ``[T, H]`` hidden states, ``[T, k]`` expert ids and
    routing weights -> ``[T, H]`` in ``hidden_states``' dtype. Gradients flow to the hidden states,
    the routing weights and every expert parameter."""
    num_experts = int(self.num_experts)
    parallel = bool(getattr(self, "_is_expert_parallel", False))
    routing = moe_routing(top_k_index, num_experts, top_k_weights, expert_parallel=parallel)
    x = hidden_states[routing.token_index]  # [T*k, H] in expert order
    gated = getattr(self, "has_gate", True)
    first = "gate_up_proj" if gated else "up_proj"
    h = _project(self, first, x, routing.offsets)
    h = self._apply_gate(h) if gated else self.act_fn(h)
    y = _project(self, "down_proj", h, routing.offsets)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    weights = top_k_weights
    if parallel:  # a sentinel's weight is zero already; masking keeps it out of the router's gradient
        weights = weights.masked_fill(top_k_index >= num_experts, 0.0)
    return unpermute_combine(y, routing.inverse, weights, out_dtype=hidden_states.dtype)


def _project(self: Any, name: str, x: Tensor, offsets: Tensor) -> Tensor:
    weight = getattr(self, name)
    if getattr(self, "is_transposed", False):  # stored [E, in, out]: a view, the ragged op takes any strides
        weight = weight.transpose(1, 2)
    bias = getattr(self, name + "_bias") if getattr(self, "has_bias", False) else None
    return grouped_linear(x if x.dtype == weight.dtype else x.to(weight.dtype), weight, bias, offsets=offsets)


def register(name: str = NAME) -> str:
    """Register the backend with transformers' ``ExpertsInterface`` under ``name`` and return it,
    for ``model.set_experts_implementation(name)``, ``from_config(..., experts_implementation=name)``
    or ``config._experts_implementation``. Registering again replaces the entry (harmless).

    Raises:
        ImportError: transformers is not installed, or is older than 5 (no ``ExpertsInterface``).
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:
        raise ImportError("grouped_ops.integrations.transformers needs transformers >= 5: "
                          'pip install "grouped_ops[transformers]"') from e
    ExpertsInterface.register(name, experts_forward)
    return name



