"""A transformers (>= 5) mixture-of-experts backend on grouped_ops: ``"grouped_ops"``.

    >>> from grouped_ops.integrations.transformers import register
    >>> model.set_experts_implementation(register())     # or from_config(..., experts_implementation=)

transformers' experts modules (Mixtral, Qwen3-MoE, OLMoE, GPT-OSS, ... everything decorated with
``use_experts_implementation``) call ``fn(self, hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`` for the backend their config names. This one routes with
:func:`grouped_ops.moe_routing`, runs both projections as the ragged ``grouped_linear`` (its tuned
implementation: a loop over the experts that got rows, a padded bmm, ...) and un-permutes and
combines with :func:`grouped_ops.unpermute_combine`, in the hidden states' dtype (float32 routing
weights included). One token in inference on the CPU (a decode step; two in float32) skips the
routing: its k experts' products in turn, then one ``[1, k] @ [k, H]`` weighted sum, token by
token. docs/moe.md has the numbers.

The experts module's attributes are read as the installed transformers has them: ``gate_up_proj``
(or ``up_proj`` without ``has_gate``), ``down_proj``, their ``*_bias`` with ``has_bias``,
``is_transposed`` (``[E, in, out]`` storage, as GPT-OSS), ``num_experts``, ``_apply_gate`` (the
model's own gating: GPT-OSS clamps and interleaves), ``act_fn``, ``has_post_expert_norm`` /
``post_expert_norm`` and ``_is_expert_parallel`` (ids ``>= num_experts`` are other ranks' tokens:
they get no rows and no weight). An attribute an older version lacks takes transformers' default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._errors import GroupedOpsError
from ..functional import grouped_linear, unpermute_combine
from ..routing import moe_routing

NAME = "grouped_ops"


def decode_tokens(dtype: torch.dtype) -> int:
    """Up to how many tokens an inference call on the CPU takes the decode path (each token's
    experts in turn): one in any dtype, two in float32 and float64. Measured (one thread, Mixtral-,
    Qwen3- and GPT-OSS-like blocks, against the general path, interleaved): two tokens 0.78-0.90x
    the time in float32, three 0.94-1.00x, four 1.00-1.09x; in bfloat16, where each small product
    has a ~20 us fixed cost on this CPU that the general path's padded_bmm pays once, 1.10-1.34x at
    two tokens."""
    return 2 if dtype in (torch.float32, torch.float64) else 1


def experts_forward(self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``"grouped_ops"`` experts backend: ``[T, H]`` hidden states, ``[T, k]`` expert ids and
    routing weights -> ``[T, H]`` in ``hidden_states``' dtype. Gradients flow to the hidden states,
    the routing weights and every expert parameter."""
    num_experts = int(self.num_experts)
    parallel = bool(getattr(self, "_is_expert_parallel", False))
    if isinstance(hidden_states, Tensor) and isinstance(top_k_index, Tensor) and \
            (hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape[0] != hidden_states.shape[0]):
        # (two rows of hidden states with one row of ids returned one row)
        raise GroupedOpsError(f"grouped_ops experts backend: hidden_states must be [T, H] and top_k_index [T, k] "
                              f"with the same T; hidden_states.shape={tuple(hidden_states.shape)}, "
                              f"top_k_index.shape={tuple(top_k_index.shape)}")
    tokens = hidden_states.shape[0]
    if 0 < tokens <= decode_tokens(hidden_states.dtype) and _decodes(self, hidden_states, top_k_index, top_k_weights):
        rows = top_k_index.tolist()  # (on the host: free)
        # (an id out of range: the routing's to refuse)
        if all(not ids or (min(ids) >= 0 and (parallel or max(ids) < num_experts)) for ids in rows):
            if tokens == 1:
                return _one_token(self, hidden_states, rows[0], top_k_weights, num_experts)
            return torch.cat([_one_token(self, hidden_states[t:t + 1], ids, top_k_weights[t:t + 1], num_experts)
                              for t, ids in enumerate(rows)])
    routing = moe_routing(top_k_index, num_experts, top_k_weights, expert_parallel=parallel)
    x = hidden_states[routing.token_index]  # [T*k, H] in expert order
    gated = getattr(self, "has_gate", True)
    h = _project(self, _first(self), x, routing.offsets)
    h = self._apply_gate(h) if gated else self.act_fn(h)
    y = _project(self, "down_proj", h, routing.offsets)
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    weights = top_k_weights
    if parallel:  # a sentinel's weight is zero already; masking keeps it out of the router's gradient
        weights = weights.masked_fill(top_k_index >= num_experts, 0.0)
    return unpermute_combine(y, routing.inverse, weights, out_dtype=hidden_states.dtype)


def _first(self: Any) -> str:
    """The first projection's weight: the fused gate and up projection, or the up projection alone."""
    return "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj"


def _decodes(self: Any, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> bool:
    """Whether a call of a few tokens may take :func:`_one_token` for each: inference on the CPU
    (its ids are read on the host for free), plain tensors of agreeing shapes and the weights' input
    size (anything else is the general path's to refuse), no autocast, no tracing, weights and
    biases in the hidden states' dtype. Training keeps the ragged op, whose backward gives the
    experts no token chose zero gradients without a fill per expert."""
    return (hidden_states.device.type == "cpu" and not torch.is_grad_enabled() and type(hidden_states) is Tensor
            and hidden_states.dim() == 2
            and type(top_k_index) is Tensor and top_k_index.dtype in (torch.int64, torch.int32)
            and top_k_index.dim() == 2 and top_k_index.shape[0] == hidden_states.shape[0]
            and type(top_k_weights) is Tensor
            and top_k_weights.shape == top_k_index.shape and top_k_weights.is_floating_point()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and self.down_proj.dtype == hidden_states.dtype == getattr(self, _first(self)).dtype
            and hidden_states.shape[1] == _in_features(self)
            and (not getattr(self, "has_bias", False) or all(
                getattr(self, name + "_bias").dtype == hidden_states.dtype for name in (_first(self), "down_proj"))))


def _in_features(self: Any) -> int:
    """The first projection's input features (its weight ``[E, out, in]``, ``[E, in, out]`` where transposed)."""
    weight = getattr(self, _first(self))
    return weight.shape[1] if getattr(self, "is_transposed", False) else weight.shape[2]


def _one_token(self: Any, hidden_states: Tensor, ids: list[int], top_k_weights: Tensor, num_experts: int) -> Tensor:
    """One token (a decode step): each chosen expert's two projections in turn, then the weighted
    sum as one ``[1, k] @ [k, H]`` product. With one row per expert there is nothing to group: the
    ragged op's loop would run these same products, after routing, un-permuting and per-call
    bookkeeping that cost 120-160 us here (docs/moe.md). Sentinel ids ``>= E`` (expert parallelism)
    are other ranks' and are left out."""
    chosen = [j for j, e in enumerate(ids) if e < num_experts]
    if not chosen:
        return hidden_states.new_zeros(hidden_states.shape)
    gated, first = getattr(self, "has_gate", True), _first(self)
    h = torch.cat([_one_product(self, first, hidden_states, ids[j]) for j in chosen])
    h = self._apply_gate(h) if gated else self.act_fn(h)
    y = torch.cat([_one_product(self, "down_proj", h[i:i + 1], ids[j]) for i, j in enumerate(chosen)])
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    weights = top_k_weights if len(chosen) == len(ids) else top_k_weights[:, chosen]
    return torch.mm(weights.to(y.dtype), y)  # (the sum over k accumulated as the combine's matmul does)


def _one_product(self: Any, name: str, x: Tensor, expert: int) -> Tensor:
    weight = getattr(self, name)[expert]
    bias = getattr(self, name + "_bias")[expert] if getattr(self, "has_bias", False) else None
    if getattr(self, "is_transposed", False):  # stored [in, out]: x @ W, the operand as stored
        return x @ weight if bias is None else torch.addmm(bias, x, weight)
    return F.linear(x, weight, bias)


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



