"""What the routing adapters (`hf_routing`, `flax_routing`) share: host arrays from any framework's
tensors, and the per-sample routing fields of stacked router outputs, computed by the one
definition of them (`extraction.routing.router_softmax` and `routing_summary`)."""
from __future__ import annotations

import jax
import numpy as np

from moe_grok.analysis.pathways import check_nonempty
from moe_grok.extraction import routing as extraction_routing


def to_numpy(x, dtype=np.float32) -> np.ndarray:
    """A host numpy array of a torch tensor (by duck typing: the package never imports torch), a JAX
    array or anything numpy reads, as `dtype`. A torch tensor's values are copied: ``.numpy()`` of a
    CPU tensor shares its memory, which the next optimizer step would overwrite in place."""
    if hasattr(x, "detach"):
        x = x.detach()
        x = x.float() if np.dtype(dtype).kind == "f" else x
        return np.array(x.cpu().numpy(), dtype, copy=True)
    return np.asarray(x, dtype)


_from_logits = jax.jit(lambda logits, mask, scored: extraction_routing.routing_summary(
    extraction_routing.router_softmax(logits), mask, scored))
_from_probs = jax.jit(extraction_routing.routing_summary)


def summarize_routing(router: np.ndarray, mask, scored_mask=None, *, probs: bool = False) -> dict[str, np.ndarray]:
    """The adapters' dict from stacked router outputs of one batch.

    router: ``[batch, seq, L, E]`` raw router logits (the softmax over all experts is taken here, in
    float32), or with ``probs=True`` that softmax itself. mask: ``[batch, seq]`` 1 = real token (every
    sample needs one); scored_mask: ``[batch, seq]`` 1 = scored position, or None.
    Returns numpy float32 {"mean_weights": [batch, L, E], "routing_entropy": [batch, L] nats} and, with
    scored_mask, "scored_mean_weights" / "scored_routing_entropy" (NaN for a sample without scored
    positions): `extraction.routing.RoutingStats`' fields.
    """
    mask = to_numpy(mask, np.int32)
    router = to_numpy(router)
    if router.ndim != 4 or router.shape[:2] != mask.shape:
        raise ValueError(f"need router outputs [batch, seq, layers, experts] and mask [batch, seq]; got "
                         f"{router.shape} and {mask.shape}")
    check_nonempty(mask)
    scored = mask if scored_mask is None else to_numpy(scored_mask, np.int32)
    if scored.shape != mask.shape:
        raise ValueError(f"scored_mask shape {scored.shape} != mask shape {mask.shape}")
    summary = [np.asarray(x) for x in (_from_probs if probs else _from_logits)(router, mask, scored)]
    result = {"mean_weights": summary[0], "routing_entropy": summary[2]}
    if scored_mask is not None:
        result.update(scored_mean_weights=summary[1], scored_routing_entropy=summary[3])
    return result
