"""Training losses: cross-entropy at the answer position and the auxiliary router losses.

router_logits: [B, S, L, E] float32 (as `model.params.forward` returns them); mask: [B, S].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(router_logits, mask, top_k: int):
    """HF's load_balancing_loss_func: E * sum_e f_e * P_e over all layers' tokens.

    router_logits: [B, S, L, E]; mask: [B, S] (1 = real token). f_e = fraction of top-k
    assignments to expert e, P_e = mean router probability, both over real tokens of all layers.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, top_idx = jax.lax.top_k(probs, top_k)
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, :, None], probs.shape[:3])  # [B, S, L]
    total = jnp.sum(weight)
    counts = jnp.sum(jax.nn.one_hot(top_idx, num_experts) * weight[..., None, None], axis=(0, 1, 2, 3))
    prob_sum = jnp.sum(probs * weight[..., None], axis=(0, 1, 2))
    return num_experts * jnp.sum((counts / total) * (prob_sum / total))


def router_z_loss(router_logits, mask):
    """ST-MoE router z-loss: mean over real tokens and layers of logsumexp(logits)^2."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2  # [B, S, L]
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, :, None], z.shape)
    return jnp.sum(z * weight) / jnp.sum(weight)
