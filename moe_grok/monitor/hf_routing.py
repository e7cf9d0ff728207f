"""Routing statistics of Hugging Face transformers MoE models, for `PathwayMonitor`.

A transformers MoE model called with ``output_router_logits=True`` returns ``router_logits``: a
tuple with one tensor per MoE (routing) layer, in layer order, each the raw router logits (before
the softmax) of every token of the batch, padding included, flattened to ``[batch * seq, E]``.
`routing_from_hf` turns them into exactly the per-sample routing fields of
`moe_grok.extraction.routing.RoutingStats` (the same functions compute them:
`extraction.routing.router_softmax` and `routing_summary`), so pathways, distances and
consistency read an HF model as they read moe_grok's own.

Supported families (`SOFTMAX_ROUTERS`): those whose router is a softmax over all experts, of
which the model then keeps the top k:

- ``olmoe`` (OlmoeForCausalLM) and ``mixtral`` (MixtralForCausalLM): every decoder layer routes.
- ``qwen3_moe`` (Qwen3MoeForCausalLM): only its MoE layers route (not those of
  ``mlp_only_layers``, nor those ``decoder_sparse_step`` makes dense); the arrays' layer axis
  counts MoE layers only, as moe_grok's own extraction does.
- ``qwen2_moe`` (Qwen2MoeForCausalLM): as qwen3_moe, and each MoE layer also has a shared expert
  that every token passes through, scaled by its own sigmoid gate (``shared_expert_gate``). That
  expert is outside the router's softmax: it is on every sample's path at every layer, so it
  carries no information about which path a sample takes. Pathways, distances, entropy and
  consistency are over the routed experts only (E = ``num_experts``; the router matrix is
  ``mlp.gate``, not ``shared_expert_gate``).

Any other router raises `UnsupportedRouterError`. DeepSeek-V3 (``deepseek_v3``) scores each expert
with an independent sigmoid, chooses the top k by those scores plus a learned load-balancing bias
within the best expert groups, and normalizes the weights over the chosen experts only: there is
no distribution over all experts whose token mean a pathway (cumulative weight up to tau) could
read, and normalizing the sigmoids would define a routing the model does not use.

The package never imports torch: tensors are read by duck typing (``x.detach().float().cpu()``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from moe_grok.extraction import routing as extraction_routing
from moe_grok.monitor.routing_arrays import summarize_routing, to_numpy

SOFTMAX_ROUTERS: dict[str, str] = {  # model_type -> the transformers class whose router is a softmax over experts
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
"""The transformers families `routing_from_hf` and `router_matrices_from_hf` read."""

_OTHER_ROUTERS = {
    "deepseek_v3": "DeepSeek-V3 scores experts with independent sigmoids and picks them by score plus a learned "
                   "bias within expert groups: its router defines no distribution over all experts",
}

IGNORE_INDEX = -100
"""The label transformers' losses skip (``ignore_index`` of its cross-entropy)."""

# The router matrix of a MoE layer: ``mlp.gate.weight`` [E, D] (``block_sparse_moe.gate.weight`` in
# Mixtral files written before transformers 5). Qwen2-MoE's ``mlp.shared_expert_gate`` and the dense
# layers' ``mlp.gate_proj`` do not match.
_GATE_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")


def is_router_key(name: str) -> bool:
    """Whether a transformers parameter name is a MoE layer's router matrix (``...layers.{i}.mlp.gate.weight``)."""
    return _GATE_KEY.search(name) is not None


class UnsupportedRouterError(ValueError):
    """A model whose router is not a softmax over all experts (or a model_type not known to be one)."""


def check_router_family(model_type: str) -> None:
    """UnsupportedRouterError unless `model_type` is one of `SOFTMAX_ROUTERS`, naming them."""
    if model_type in SOFTMAX_ROUTERS:
        return
    supported = ", ".join(f"{name!r} ({cls})" for name, cls in SOFTMAX_ROUTERS.items())
    reason = _OTHER_ROUTERS.get(model_type, "its router is not known to be a softmax over all experts")
    raise UnsupportedRouterError(f"model_type {model_type!r}: {reason}. Routing pathways read the router softmax "
                                 f"over all experts, which the families {supported} have")


_per_sample_loss = jax.jit(extraction_routing.per_sample_loss)


def routing_from_hf(router_logits: Sequence, attention_mask=None, *, model_type: str,
                    scored_mask=None) -> dict[str, np.ndarray]:
    """Per-sample routing of one batch from a transformers MoE model's ``router_logits``.

    router_logits: the model output's ``router_logits`` (``output_router_logits=True``): one tensor
    per MoE layer in layer order, each ``[batch * seq, E]`` (as transformers returns them) or
    ``[batch, seq, E]``, raw logits (the softmax is taken here, in float32).
    attention_mask: ``[batch, seq]``, 1 = real token (None: every token real; then each layer's
    logits must be ``[batch, seq, E]``). scored_mask: ``[batch, seq]``, 1 = a position whose
    routing is scored (e.g. `scored_positions_from_labels`); optional.
    model_type: the model's ``config.model_type``; one of `SOFTMAX_ROUTERS`, else UnsupportedRouterError.

    Returns numpy float32 {"mean_weights": [batch, L, E] token-mean router softmax over all experts
    over real tokens, "routing_entropy": [batch, L] token-mean entropy of that softmax (nats)}, and
    with scored_mask also "scored_mean_weights" / "scored_routing_entropy" over scored positions
    only (NaN for a sample without any); L counts the MoE layers only. The definitions are
    `extraction.routing.RoutingStats`'.
    """
    check_router_family(model_type)
    if router_logits is None or isinstance(router_logits, Mapping) or len(router_logits) == 0:
        raise ValueError("router_logits holds no MoE layer: call the model with output_router_logits=True and pass "
                         "the output's router_logits (a tuple with one tensor per MoE layer)")
    layers = [to_numpy(layer) for layer in router_logits]
    mask = None if attention_mask is None else to_numpy(attention_mask, np.int32)
    if mask is None:
        if layers[0].ndim != 3:
            raise ValueError(f"router logits of shape {layers[0].shape} (batch and sequence flattened) need the "
                             "attention_mask [batch, seq] to be unflattened")
        mask = np.ones(layers[0].shape[:2], np.int32)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {mask.shape}")
    batch, seq = mask.shape
    experts = layers[0].shape[-1]
    for index, layer in enumerate(layers):
        if layer.shape not in ((batch * seq, experts), (batch, seq, experts)):
            raise ValueError(f"router logits of MoE layer {index} have shape {layer.shape}; with attention_mask "
                             f"[{batch}, {seq}] and {experts} experts expected [{batch * seq}, {experts}] or "
                             f"[{batch}, {seq}, {experts}]")
    logits = np.stack([layer.reshape(batch, seq, experts) for layer in layers], axis=2)  # [B, S, L, E]
    return summarize_routing(logits, mask, scored_mask)


def scored_positions_from_labels(labels, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``[batch, seq]`` int32 1 where a causal LM's prediction is scored: position t predicts
    ``labels[t + 1]`` (transformers shifts the labels inside its loss), so t is scored when that label
    is not `ignore_index`; the last position predicts nothing. The `target_mask` of
    `extraction.routing` for these labels."""
    labels = to_numpy(labels, np.int64)
    scored = np.zeros(labels.shape, np.int32)
    scored[:, :-1] = labels[:, 1:] != ignore_index
    return scored


def per_sample_loss_from_hf(logits, labels, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample loss and correctness of a causal LM from its logits and (unshifted) labels.

    logits: ``[batch, seq, V]``; labels: ``[batch, seq]`` as given to a transformers causal LM
    (position t's logits predict ``labels[t + 1]``; `ignore_index` marks unscored labels).
    Returns (loss [batch] mean next-token NLL in nats over scored positions, correct [batch] share
    of scored positions whose argmax is the label), float32: `extraction.routing.per_sample_loss`.
    A sample without scored positions gets 0 for both, as there.
    """
    logits = to_numpy(logits)
    labels = to_numpy(labels, np.int64)
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"need logits [batch, seq, vocab] and labels [batch, seq]; got {logits.shape} and "
                         f"{labels.shape}")
    target_mask = scored_positions_from_labels(labels, ignore_index)
    targets = np.zeros(labels.shape, np.int64)
    targets[:, :-1] = labels[:, 1:]
    extraction_routing.check_targets(targets, target_mask, logits.shape[-1])
    targets = np.where(target_mask != 0, targets, 0).astype(np.int32)
    loss, correct = _per_sample_loss(logits, targets, target_mask)
    return np.asarray(loss), np.asarray(correct)


def router_matrices_from_hf(model_or_state_dict, model_type: str | None = None) -> np.ndarray:
    """The router matrices W_l of a transformers MoE model: ``[L, E, D]`` float32, row k of layer l
    expert k's router vector (`model.params.router_matrices`' layout), one per MoE layer in layer order
    (layers ordered by their index as a number: "layers.10" after "layers.2").

    model_or_state_dict: the model (its ``state_dict()`` is read; model_type defaults to its
    ``config.model_type``) or a state dict (model_type required) with keys ``...layers.{i}.mlp.gate.weight``
    ([E, D]; the router of a MoE layer; Qwen2-MoE's shared-expert gate is not one).
    """
    if hasattr(model_or_state_dict, "state_dict"):
        if model_type is None:
            model_type = getattr(getattr(model_or_state_dict, "config", None), "model_type", None)
        state = model_or_state_dict.state_dict()
    else:
        state = model_or_state_dict
    if model_type is None:
        raise ValueError("model_type is needed with a state dict (the model's config.model_type)")
    check_router_family(model_type)
    gates: dict[int, object] = {}
    for key, value in state.items():
        match = _GATE_KEY.search(key)
        if match:
            layer = int(match.group(1))
            if layer in gates:
                raise ValueError(f"two router matrices for layer {layer} (e.g. {key!r}): pass one model's state dict")
            gates[layer] = value
    if not gates:
        raise ValueError(f"no router matrix (a key ending in 'layers.<i>.mlp.gate.weight') among the {len(state)} "
                         f"tensors of this {model_type} model")
    matrices = [to_numpy(gates[layer]) for layer in sorted(gates)]
    shapes = {m.shape for m in matrices}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"router matrices must all be [experts, hidden]; got shapes {sorted(shapes)}")
    return np.stack(matrices)
