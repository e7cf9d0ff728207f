"""The one-layer MoE of the synthetic theory check: a frozen random router over ReLU experts.

NTK parameterization, matches ``kernels.relu_ntk``; all parameters ~ N(0, 1):
    probs(x)  = softmax(router_scale * x W_r / sqrt(d))             [E], W_r frozen
    gates(x)  = probs (soft routing, top_k=0) or probs masked to the top-k experts
                (no renormalization, OLMoE style)
    f_j(x)    = (1/sqrt(m)) sum_r a_jr relu(w_jr . x / sqrt(d))
    F(x)      = sum_j gates_j(x) f_j(x)
``router_scale`` is an inverse softmax temperature: larger values give sharper routing.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_grok.theory import kernels


class ReluExperts(nn.Module):
    """``num_experts`` one-hidden-layer ReLU networks (NTK parameterization). x [b, d] -> [b, E]."""

    num_experts: int
    width: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        hidden = self.param("hidden", nn.initializers.normal(1.0), (self.num_experts, d, self.width))
        output = self.param("output", nn.initializers.normal(1.0), (self.num_experts, self.width))
        pre = jnp.einsum("bd,edm->bem", x, hidden, precision=kernels.HIGHEST) / math.sqrt(d)
        return jnp.einsum("bem,em->be", jax.nn.relu(pre), output, precision=kernels.HIGHEST) / math.sqrt(self.width)


class OneLayerMoE(nn.Module):
    """F(x) = sum_j gates_j(x) f_j(x). x [b, d] -> [b]; ``routing(x)`` -> (probs, gates) [b, E]."""

    num_experts: int = 16
    width: int = 128
    router_scale: float = 1.0
    top_k: int = 0

    def setup(self):
        self.router = nn.Dense(self.num_experts, use_bias=False, kernel_init=nn.initializers.normal(1.0))
        self.experts = ReluExperts(self.num_experts, self.width)

    def routing(self, x):
        logits = self.router_scale * self.router(x) / math.sqrt(x.shape[-1])
        probs = jax.nn.softmax(logits, axis=-1)
        if not self.top_k:
            return probs, probs
        kth = jax.lax.top_k(probs, self.top_k)[0][:, -1:]
        return probs, jnp.where(probs >= kth, probs, 0.0)

    def __call__(self, x):
        _, gates = self.routing(x)
        return jnp.sum(gates * self.experts(x), axis=-1)


def init_moe(model: OneLayerMoE, dim: int, router_seed: int, expert_seed: int):
    """Parameters with the router drawn from ``router_seed`` and the experts from ``expert_seed``."""
    dummy = jnp.zeros((1, dim), jnp.float32)
    router = model.init(jax.random.PRNGKey(router_seed), dummy)["params"]["router"]
    experts = model.init(jax.random.PRNGKey(expert_seed), dummy)["params"]["experts"]
    return {"params": {"router": router, "experts": experts}}

