"""The one-layer MoE of the synthetic theory check: a frozen random router over ReLU experts.

NTK parameterization, matches ``kernels.relu_ntk``; all parameters ~ N(0, 1):
    probs(x)  = softmax(router_scale * x W_r / sqrt(d))             [E], W_r frozen
    gates(x)  = probs (soft routing, top_k=0) or probs masked to the top-k experts
                (no renormalization, OLMoE style)
    f_j(x)    = (1/sqrt(m)) sum_r a_jr relu(w_jr . x / sqrt(d))
    F(x)      = sum_j gates_j(x) f_j(x)
``router_scale`` is an inverse softmax temperature: larger values give sharper routing.
``expert_ntk_gram`` is the model's empirical NTK w.r.t. the expert parameters (router frozen).
"""
from __future__ import annotations

import functools
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


def _gated_neuron_factors(model: OneLayerMoE, params, x):
    """Per-neuron factors of the MoE's expert Jacobian. x [b, d] -> (x / sqrt(d) [b, d],
    hidden factor [b, E*m], output factor [b, E*m]), both factors divided by sqrt(m).

    dF/d hidden_j[:, r] = g_j(x) a_jr 1{w_jr.x > 0} x / sqrt(d m)   (an outer product per sample)
    dF/d output_j[r]    = g_j(x) relu(w_jr.x / sqrt(d)) / sqrt(m)
    """
    _, gates = model.apply(params, x, method=OneLayerMoE.routing)
    experts = params["params"]["experts"]
    d, width = x.shape[-1], experts["output"].shape[-1]
    pre = jnp.einsum("bd,edm->bem", x, experts["hidden"], precision=kernels.HIGHEST) / math.sqrt(d)
    hidden_factor = gates[:, :, None] * jnp.where(pre > 0, experts["output"][None], 0.0) / math.sqrt(width)
    output_factor = gates[:, :, None] * jax.nn.relu(pre) / math.sqrt(width)
    flat = lambda a: a.reshape(a.shape[0], -1)
    return x / math.sqrt(d), flat(hidden_factor), flat(output_factor)


@functools.partial(jax.jit, static_argnames="model")
def _expert_ntk_gram(model, params, x, x2):
    x, x2 = (jnp.asarray(a, jnp.float32) for a in (x, x2))
    xs, hidden, output = _gated_neuron_factors(model, params, x)
    xs2, hidden2, output2 = _gated_neuron_factors(model, params, x2)
    dot = lambda a, b: jnp.dot(a, b.T, precision=kernels.HIGHEST)
    return dot(xs, xs2) * dot(hidden, hidden2) + dot(output, output2)


def expert_ntk_gram(model: OneLayerMoE, params, x, x2=None):
    """Empirical NTK of the MoE w.r.t. its expert parameters at ``params`` (the router frozen, not
    differentiated): H_ab = J(x_a) . J(x2_b), J(x) = dF(x)/d(hidden, output weights of every expert).
    x [n, d], x2 [m, d] (default x) -> [n, m], float32.

    Computed from the Jacobian's per-neuron factors (``_gated_neuron_factors``), never J itself:
        H = (x x2^T / d) * (P P2^T) + Q Q2^T,   P = [g_j a_jr 1{w_jr.x > 0}] / sqrt(m),
                                                 Q = [g_j relu(w_jr.x / sqrt(d))] / sqrt(m)  ([n, E*m]),
    i.e. sum_j g_j(x) g_j(x') K_j(x, x') with K_j expert j's finite-width empirical NTK; memory
    O((n + m) E width), not O(n x parameters). Equal to J J^T from jax.jacrev (tests/test_theory.py).
    """
    return _expert_ntk_gram(model, params, x, x if x2 is None else x2)
