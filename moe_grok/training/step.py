"""The compiled programs of training: the initial params, the loss and the jitted optimizer step.

Every program is compiled once per process and model (and optimizer and mesh for the step), so the
seeds of a multi-seed run, and repeated runs, share it. Minibatches are a pure function of
(seed, step) (`batch_indices`): a resumed run reproduces the uninterrupted one exactly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from moe_grok import sharding
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.model import params as params_lib
from moe_grok.training import losses
from moe_grok.training.optimizer import OPTIMIZER_DEFAULTS, OPTIMIZER_KEYS, make_optimizer

# XLA's CPU backend hands only matmuls to its YNNPACK library, not elementwise ops and reductions:
# for the toy step's many small [B, S, H, Dh] fusions its own loops are faster (docs/benchmarks.md).
CPU_TRAIN_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def loss_fn(params, model_config: MoEConfig, inputs, answers, aux_loss_coef: float, z_loss_coef: float,
            label_smoothing: float = 0.0):
    """Cross-entropy at the answer position (against labels smoothed by `label_smoothing`) +
    load-balancing + router z-loss, for inputs [B, S] and answers [B]. Returns (loss, metrics);
    metrics' "ce" is the optimized (smoothed) cross-entropy, "nll" the plain one (nats)."""
    mask = jnp.ones(inputs.shape, jnp.int32)
    out = params_lib.forward(model_config, params, inputs, mask)
    logits = out.logits[:, tasks.ANSWER_POSITION].astype(jnp.float32)
    nll = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))
    if label_smoothing:
        labels = optax.smooth_labels(jax.nn.one_hot(answers, logits.shape[-1]), label_smoothing)
        ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    else:
        ce = nll
    balance = losses.load_balancing_loss(out.router_logits, mask, model_config.num_experts_per_tok)
    z = losses.router_z_loss(out.router_logits, mask)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == answers)
    loss = ce + aux_loss_coef * balance + z_loss_coef * z
    return loss, {"loss": loss, "ce": ce, "nll": nll, "balance_loss": balance, "z_loss": z, "batch_accuracy": accuracy}


def step_function(model_config: MoEConfig, tx: optax.GradientTransformation, aux_loss_coef: float,
                  z_loss_coef: float, label_smoothing: float = 0.0):
    """The un-jitted optimizer step (params, opt_state, inputs [B, S], answers [B]) ->
    (params, opt_state, metrics)."""

    def step(params, opt_state, inputs, answers):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, model_config, inputs, answers, aux_loss_coef,
                                                         z_loss_coef, label_smoothing)
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


@functools.lru_cache(maxsize=4)
def train_step_compiler_options(platform: str) -> dict[str, str] | None:
    """CPU_TRAIN_STEP_OPTIONS on CPU when this XLA accepts them (the option is experimental), else None."""
    if platform != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_TRAIN_STEP_OPTIONS).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError as e:
        logging.warning("XLA CPU option %s not accepted (%s); compiling the train step without it",
                        CPU_TRAIN_STEP_OPTIONS, str(e)[:200])
        return None
    return CPU_TRAIN_STEP_OPTIONS


def make_train_step(model_config: MoEConfig, tx: optax.GradientTransformation, aux_loss_coef: float,
                    z_loss_coef: float, mesh: jax.sharding.Mesh | None = None, label_smoothing: float = 0.0):
    """Jitted step_function (params and optimizer state donated; with a mesh: batch over "data",
    experts over "expert")."""
    step = step_function(model_config, tx, aux_loss_coef, z_loss_coef, label_smoothing)
    platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
    options = train_step_compiler_options(platform)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1), compiler_options=options)
    param_sharding = params_lib.param_shardings(model_config, mesh)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(param_sharding, None, batch, batch),
                   out_shardings=(param_sharding, None, None), compiler_options=options)


@functools.lru_cache(maxsize=16)
def _cached_train_step(model_config: MoEConfig, settings: tuple, mesh: jax.sharding.Mesh | None):
    train = ml_collections.ConfigDict(dict(settings))
    return make_train_step(model_config, make_optimizer(train), train.aux_loss_coef, train.z_loss_coef, mesh,
                           train.label_smoothing)


def compiled_train_step(model_config: MoEConfig, train: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh | None = None):
    """make_train_step for `config.train`, shared by every run of one process with the same
    model, optimizer and mesh (so the seeds of a multi-seed run, and repeated runs, compile once)."""
    settings = tuple((k, train.get(k, OPTIMIZER_DEFAULTS.get(k))) for k in OPTIMIZER_KEYS)
    return _cached_train_step(model_config, settings, mesh)


@functools.lru_cache(maxsize=16)
def _compiled_init(model_config: MoEConfig):
    return jax.jit(functools.partial(params_lib.init_params, model_config))


def initial_params(model_config: MoEConfig, seed: int, mesh: jax.sharding.Mesh | None = None):
    """The seed's initial params (init_params compiled once per process and model). With a mesh,
    made on one device and then placed: the same values as a single-device run, and no sharded
    compile of the initializer."""
    params = _compiled_init(model_config)(jax.random.key(seed))
    return params if mesh is None else jax.device_put(params, params_lib.param_shardings(model_config, mesh))


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The minibatch of `step`: a pure function of (seed, step) -> [batch_size] indices < n."""
    return np.random.default_rng([seed, step]).choice(n, size=min(batch_size, n), replace=False)
