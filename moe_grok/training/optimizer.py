"""The optimizer of a toy run: AdamW from `config.train`."""
from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZER_KEYS = ("learning_rate", "warmup_steps", "b1", "b2", "adam_eps", "weight_decay", "grad_clip_norm",
                  "router_weight_decay", "aux_loss_coef", "z_loss_coef",
                  "label_smoothing", "cosine_decay_steps")  # train keys the compiled step depends on
OPTIMIZER_DEFAULTS = {"cosine_decay_steps": 0}  # keys added later: the value configs without them trained with


def _is_router(path) -> bool:
    return any(getattr(key, "key", None) == "router" for key in path)


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup over `warmup_steps` to `learning_rate`; then constant (`cosine_decay_steps` = 0, the
    default) or a cosine decay that reaches 0 at step `cosine_decay_steps` and stays there. The decay's end
    is a setting of its own, not `steps`, so that a run extended to more steps keeps its trajectory."""
    decay_steps = train.get("cosine_decay_steps", 0)
    if not decay_steps:
        return optax.warmup_constant_schedule(0.0, train.learning_rate, train.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, train.learning_rate, train.warmup_steps, decay_steps, end_value=0.0)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with `learning_rate_schedule(train)`; optionally global-norm gradient
    clipping first, and the routers ([L, D, E]) left out of the weight decay."""
    schedule = learning_rate_schedule(train)
    decay_mask = None
    if not train.router_weight_decay:
        decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: not _is_router(p), params)
    adamw = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.adam_eps, weight_decay=train.weight_decay,
                        mask=decay_mask)
    if train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw)
    return adamw
