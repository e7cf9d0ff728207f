"""The optimizer of a toy run: AdamW from `config.train`."""
from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZER_KEYS = ("learning_rate", "warmup_steps", "b1", "b2", "adam_eps", "weight_decay", "grad_clip_norm",
                  "router_weight_decay", "aux_loss_coef", "z_loss_coef",
                  "label_smoothing")  # train keys the compiled step depends on


def _is_router(path) -> bool:
    return any(getattr(key, "key", None) == "router" for key in path)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup to a constant learning rate; optionally global-norm gradient
    clipping first, and the routers ([L, D, E]) left out of the weight decay."""
    schedule = optax.warmup_constant_schedule(0.0, train.learning_rate, train.warmup_steps)
    decay_mask = None
    if not train.router_weight_decay:
        decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: not _is_router(p), params)
    adamw = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.adam_eps, weight_decay=train.weight_decay,
                        mask=decay_mask)
    if train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw)
    return adamw
