"""Routing pathways of samples (docs/method.md, "Pathway of a sample").

A sample's pathway lists, for each MoE layer, the experts whose token-mean router weight
is largest, in rank order, until their cumulative weight first exceeds ``tau``.

Two symbolic forms:

* string (paper default): experts of a layer joined by ``","`` in rank order, layers joined
  by ``"-"``, e.g. ``"3,1,5-9,1"``;
* tokens: one symbol per expert id, with ``LAYER_BOUNDARY`` (-1) between layers, e.g.
  ``(3, 1, 5, -1, 9, 1)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYER_BOUNDARY = -1
"""Token-level symbol separating consecutive layers."""


@jax.jit
def token_mean_weights(router_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean router weights over each sample's non-padding tokens.

    router_probs: ``[batch, seq, layers, experts]``, softmax over all experts.
    mask: ``[batch, seq]``, 1 for real tokens, 0 for padding.
    Returns ``[batch, layers, experts]`` float32. A sample without real tokens gives NaN
    (0/0); call ``check_nonempty(mask)`` on the host to fail early instead.
    """
    if router_probs.ndim != 4 or mask.shape != router_probs.shape[:2]:
        raise ValueError(
            f"need router_probs [batch, seq, layers, experts] and mask [batch, seq]; "
            f"got {router_probs.shape} and {mask.shape}"
        )
    mask = mask.astype(jnp.float32)
    summed = jnp.einsum("bsle,bs->ble", router_probs.astype(jnp.float32), mask)
    return summed / mask.sum(axis=1)[:, None, None]


def check_nonempty(mask) -> None:
    """Raise ValueError naming the samples of ``mask [batch, seq]`` with no real token."""
    empty = np.flatnonzero(np.asarray(mask).sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"samples without non-padding tokens (indices {empty.tolist()})")


def _validate_tau(tau: float) -> None:
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")


def pathway_expert_lists(mean_weights_BLE, tau: float = 0.7) -> list[list[list[int]]]:
    """Per sample and layer, the pathway experts in rank order.

    mean_weights_BLE: ``[batch, layers, experts]`` token-mean router weights.
    Returns ``result[sample][layer] = [expert ids]``. Experts are ranked by descending
    weight, ties broken by the lower expert id, and kept until the cumulative weight
    (float64 sum of the given values) first strictly exceeds ``tau``; a cumulative weight
    exactly equal to ``tau`` does not stop. If it never exceeds ``tau`` (always so for
    ``tau == 1``), all experts are kept.
    """
    _validate_tau(tau)
    weights = np.asarray(mean_weights_BLE, dtype=np.float64)
    if weights.ndim != 3 or weights.shape[-1] == 0:
        raise ValueError(f"need mean weights [batch, layers, experts>0], got shape {weights.shape}")
    bad = np.flatnonzero(~np.isfinite(weights).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"non-finite (NaN/inf) mean weights in samples {bad.tolist()}")
    num_experts = weights.shape[-1]
    rank_order = np.argsort(-weights, axis=-1, kind="stable")  # stable: ties -> lower id first
    cumulative = np.cumsum(np.take_along_axis(weights, rank_order, axis=-1), axis=-1)
    exceeds = cumulative > tau if tau < 1.0 else np.zeros_like(cumulative, dtype=bool)
    kept = np.where(exceeds.any(axis=-1), exceeds.argmax(axis=-1) + 1, num_experts)
    # Sliced as Python lists: one tolist() of the whole array, not one per (sample, layer), is what
    # keeps this cheap for whole splits (the analysis calls it per split, checkpoint and tau).
    return [
        [order[:count] for order, count in zip(sample_order, sample_kept, strict=True)]
        for sample_order, sample_kept in zip(rank_order.tolist(), kept.tolist(), strict=True)
    ]


def pathway_experts(mean_weights_LE, tau: float = 0.7) -> list[list[int]]:
    """Pathway experts of one sample: ``[layers, experts]`` weights -> per layer expert ids.

    Same rule as ``pathway_expert_lists``.
    """
    weights = np.asarray(mean_weights_LE)
    if weights.ndim != 2:
        raise ValueError(f"need mean weights [layers, experts], got shape {weights.shape}")
    return pathway_expert_lists(weights[None], tau)[0]


def pathway_string(experts_per_layer: Sequence[Sequence[int]]) -> str:
    """Paper format: ``[[3, 1, 5], [9, 1]] -> "3,1,5-9,1"``."""
    return "-".join(",".join(map(str, layer)) for layer in experts_per_layer)


def pathway_token_tuple(experts_per_layer: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Token form: ``[[3, 1, 5], [9, 1]] -> (3, 1, 5, -1, 9, 1)``."""
    tokens: list[int] = []
    for layer_index, layer in enumerate(experts_per_layer):
        if layer_index:
            tokens.append(LAYER_BOUNDARY)
        tokens.extend(layer)
    return tuple(tokens)


def pathway_strings(mean_weights_BLE, tau: float = 0.7) -> list[str]:
    """``[batch, layers, experts]`` weights -> one pathway string per sample."""
    return [pathway_string(sample) for sample in pathway_expert_lists(mean_weights_BLE, tau)]


def pathway_tokens(mean_weights_BLE, tau: float = 0.7) -> list[tuple[int, ...]]:
    """``[batch, layers, experts]`` weights -> one token tuple per sample (-1 between layers)."""
    return [pathway_token_tuple(sample) for sample in pathway_expert_lists(mean_weights_BLE, tau)]
