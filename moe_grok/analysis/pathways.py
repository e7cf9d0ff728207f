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
from typing import NamedTuple

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


def _ranked(mean_weights_BLE, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """(rank order [B, L, E] expert ids by descending weight, kept [B, L] experts on the pathway)."""
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
    return rank_order, kept


def pathway_expert_lists(mean_weights_BLE, tau: float = 0.7) -> list[list[list[int]]]:
    """Per sample and layer, the pathway experts in rank order.

    mean_weights_BLE: ``[batch, layers, experts]`` token-mean router weights.
    Returns ``result[sample][layer] = [expert ids]``. Experts are ranked by descending
    weight, ties broken by the lower expert id, and kept until the cumulative weight
    (float64 sum of the given values) first strictly exceeds ``tau``; a cumulative weight
    exactly equal to ``tau`` does not stop. If it never exceeds ``tau`` (always so for
    ``tau == 1``), all experts are kept.
    """
    rank_order, kept = _ranked(mean_weights_BLE, tau)
    return [
        [order[:count] for order, count in zip(sample_order, sample_kept, strict=True)]
        for sample_order, sample_kept in zip(rank_order.tolist(), kept.tolist(), strict=True)
    ]


def pathway_lengths(mean_weights_BLE, tau: float = 0.7) -> np.ndarray:
    """``[batch, layers]`` int: experts on each sample's pathway per layer (rule of ``pathway_expert_lists``)."""
    return _ranked(mean_weights_BLE, tau)[1]


class LayerPathways(NamedTuple):
    """The pathways of a batch as codes: ``patterns[ids[b, l]]`` is sample b's experts at layer l.

    A toy split has far fewer distinct pathways than samples, so strings and token tuples are
    built once per distinct pathway, not per sample (with 64 experts and 16 layers nearly every
    sample differs and this is no faster: docs/benchmarks.md).
    """

    ids: np.ndarray  # [batch, layers] int64 index into patterns
    patterns: list[tuple[int, ...]]  # distinct single-layer pathways, experts in rank order
    texts: list[str]  # pathway_string of each pattern ("3,1,5")
    lengths: np.ndarray  # [batch, layers] int experts on the pathway


def layer_pathways(mean_weights_BLE, tau: float = 0.7) -> LayerPathways:
    """``[batch, layers, experts]`` weights -> LayerPathways (rule of ``pathway_expert_lists``)."""
    rank_order, kept = _ranked(mean_weights_BLE, tau)
    batch, layers, experts = rank_order.shape
    on_path = np.where(np.arange(experts) < kept[..., None], rank_order, -1).reshape(-1, experts)
    first, ids = _unique_rows(on_path)
    rows = on_path[first]
    patterns = [tuple(row[:count]) for row, count in zip(rows.tolist(), kept.reshape(-1)[first].tolist(),
                                                          strict=True)]
    texts = [",".join(map(str, pattern)) for pattern in patterns]
    return LayerPathways(ids.reshape(batch, layers), patterns, texts, kept)


def _unique_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of one occurrence of each distinct row, inverse [rows]) of an int array [rows, width].

    Each row is compared as one opaque byte string in the narrowest int dtype that holds the
    values: an order of magnitude faster than ``np.unique(axis=0)``'s column-by-column sort.
    """
    narrow = np.ascontiguousarray(values.astype(np.min_scalar_type(-max(int(values.max()), 1) - 1)))
    keys = narrow.view(np.dtype((np.void, narrow.dtype.itemsize * narrow.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _join_layers(codes: LayerPathways, layer_forms: list, join) -> list:
    """One value per sample: join(per-layer forms), computed once per distinct sample pathway."""
    first, inverse = _unique_rows(codes.ids)
    joined = [join([layer_forms[i] for i in sample]) for sample in codes.ids[first].tolist()]
    return [joined[i] for i in inverse.tolist()]


def strings_of(codes: LayerPathways) -> list[str]:
    """One paper-format pathway string per sample (``pathway_string`` of its experts)."""
    return _join_layers(codes, codes.texts, "-".join)


def tokens_of(codes: LayerPathways) -> list[tuple[int, ...]]:
    """One token tuple per sample (``pathway_token_tuple`` of its experts)."""
    return _join_layers(codes, codes.patterns, pathway_token_tuple)


def layer_strings_of(codes: LayerPathways, layer: int) -> list[str]:
    """One single-layer pathway string per sample: ``pathway_string([experts at layer])``."""
    return [codes.texts[i] for i in codes.ids[:, layer].tolist()]


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
    return strings_of(layer_pathways(mean_weights_BLE, tau))


def pathway_tokens(mean_weights_BLE, tau: float = 0.7) -> list[tuple[int, ...]]:
    """``[batch, layers, experts]`` weights -> one token tuple per sample (-1 between layers)."""
    return tokens_of(layer_pathways(mean_weights_BLE, tau))
