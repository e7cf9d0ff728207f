"""Training of the synthetic MoE's experts (router frozen): full-batch Adam with an optional ridge
penalty toward the initial parameters, so that in the lazy regime it is kernel ridge regression."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from moe_grok.sharding import shard_batch
from moe_grok.theory.synthetic_model import OneLayerMoE


def expert_only_optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam on the experts; the router gets zero updates (frozen)."""
    def labels(params):
        return {"params": {name: jax.tree.map(lambda _, label="frozen" if name == "router" else "trained": label, sub)
                           for name, sub in params["params"].items()}}

    return optax.multi_transform({"trained": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("model", "steps", "learning_rate"))
def _train(model, params, x, y, offset, ridge, steps, learning_rate):
    optimizer = expert_only_optimizer(learning_rate)
    init_experts = params["params"]["experts"]

    def loss_fn(p):
        mse = jnp.mean((model.apply(p, x) - offset - y) ** 2)
        drift = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p["params"]["experts"], init_experts)
        return mse + ridge / x.shape[0] * sum(jax.tree.leaves(drift)), mse

    def step(carry, _):
        p, opt_state = carry
        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), mse

    (params, _), mses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, mses


def train_experts(
    model: OneLayerMoE, params, x, y, *, steps: int, learning_rate: float, ridge: float = 0.0, mesh: Mesh | None = None
):
    """Full-batch Adam on mean((F(x) - F_init(x) - y)^2) + (ridge/n) |theta_experts - theta_init|^2.

    The router is frozen. In the lazy (NTK) regime the minimizer is kernel ridge regression
    with the routing kernel and ridge ``ridge``. x [n, d], y [n] -> (trained params, training
    MSE before each step [steps]). With ``mesh`` the batch is split over the data axis (n
    divisible by its size).
    """
    x, y = shard_batch((jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), mesh)
    offset = model.apply(params, x)
    return _train(model, params, x, y, offset, ridge, steps, learning_rate)

