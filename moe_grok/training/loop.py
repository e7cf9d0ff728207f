"""Training the MoE transformer on algorithmic tasks: jitted AdamW steps, orbax checkpoints, resume.

Layout of a run's workdir:
  moe_config.json         the model's MoEConfig
  checkpoints/<step>/     params at every `checkpoint_every` steps (the "pretraining checkpoints")
  train_state/<step>/     params + optimizer state, latest only (for resuming)
  metrics.jsonl           one JSON object per evaluation (step, losses, accuracies per group)

Minibatches are a pure function of (seed, step), so a run killed and resumed from its
latest train_state reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from moe_grok import sharding
from moe_grok.config import CONFIG_FILE, MoEConfig, toy
from moe_grok.data import tasks
from moe_grok.data.splits import position_targets
from moe_grok.extraction.routing import extract_dataset, make_extractor
from moe_grok.model import params as params_lib
from moe_grok.training import losses


def task_spec(config: ml_collections.ConfigDict) -> tasks.TaskSpec:
    return tasks.TaskSpec(p=config.task.p, ops=tuple(config.task.ops),
                          train_fraction=config.task.train_fraction, seed=config.task.seed)


def model_config_of(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> MoEConfig:
    """The run's MoEConfig: `toy()` with the config's `model` fields, sized for the task."""
    return toy(vocab_size=spec.vocab_size, max_seq_len=tasks.SEQ_LEN, **config.model.to_dict())


def answer_targets(inputs: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets/target_mask [N, SEQ_LEN] scoring only the answer position (for extraction)."""
    return position_targets(inputs, answers, tasks.ANSWER_POSITION)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup to a constant learning rate."""
    schedule = optax.warmup_constant_schedule(0.0, train.learning_rate, train.warmup_steps)
    return optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)


def loss_fn(params, model_config: MoEConfig, inputs, answers, aux_loss_coef: float, z_loss_coef: float):
    """Cross-entropy at the answer position + load-balancing + router z-loss. Returns (loss, metrics)."""
    mask = jnp.ones(inputs.shape, jnp.int32)
    out = params_lib.forward(model_config, params, inputs, mask)
    logits = out.logits[:, tasks.ANSWER_POSITION].astype(jnp.float32)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))
    balance = losses.load_balancing_loss(out.router_logits, mask, model_config.num_experts_per_tok)
    z = losses.router_z_loss(out.router_logits, mask)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == answers)
    loss = ce + aux_loss_coef * balance + z_loss_coef * z
    return loss, {"loss": loss, "ce": ce, "balance_loss": balance, "z_loss": z, "batch_accuracy": accuracy}


def make_train_step(model_config: MoEConfig, tx: optax.GradientTransformation, aux_loss_coef: float,
                    z_loss_coef: float, mesh: jax.sharding.Mesh | None = None):
    """Jitted (params, opt_state, inputs, answers) -> (params, opt_state, metrics)."""

    def step(params, opt_state, inputs, answers):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, model_config, inputs, answers, aux_loss_coef,
                                                         z_loss_coef)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    param_sharding = params_lib.param_shardings(model_config, mesh)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(param_sharding, None, batch, batch),
                   out_shardings=(param_sharding, None, None))


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The minibatch of `step`: a pure function of (seed, step) -> [batch_size] indices < n."""
    return np.random.default_rng([seed, step]).choice(n, size=min(batch_size, n), replace=False)


class RunCheckpoints:
    """The orbax managers of a run: all params checkpoints, and the latest full train state."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self.params = ocp.CheckpointManager(os.path.join(self.workdir, "checkpoints"), options=options)
        self.state = ocp.CheckpointManager(
            os.path.join(self.workdir, "train_state"),
            options=ocp.CheckpointManagerOptions(create=True, max_to_keep=1, enable_async_checkpointing=False))

    def save(self, step: int, params, opt_state) -> None:
        self.params.save(step, args=ocp.args.StandardSave(params))
        self.state.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))

    def steps(self) -> list[int]:
        return sorted(self.params.all_steps())

    def restore_params(self, step: int, abstract_params):
        return self.params.restore(step, args=ocp.args.StandardRestore(abstract_params))

    def restore_latest_state(self, abstract_state):
        step = self.state.latest_step()
        if step is None:
            return None, None
        return step, self.state.restore(step, args=ocp.args.StandardRestore(abstract_state))


def evaluate(model_config: MoEConfig, params, data: tasks.AlgorithmicDataset, extractor, batch_size: int = 2048):
    """Loss and accuracy per split and group at the answer position -> flat dict of floats."""
    result = {}
    for split in ("train", "test"):
        inputs, answers, groups = (getattr(data, f"{split}_{f}") for f in ("inputs", "targets", "groups"))
        targets, target_mask = answer_targets(inputs, answers)
        stats = extract_dataset(model_config, params, inputs, None, targets, target_mask, batch_size=batch_size,
                                extractor=extractor, progress=False)
        result[f"{split}_loss"] = float(stats["loss"].mean())
        result[f"{split}_accuracy"] = float(stats["correct"].mean())
        for g, name in enumerate(data.group_names):
            in_group = groups == g
            result[f"{split}_accuracy/{name}"] = float(stats["correct"][in_group].mean())
    return result


def _rewrite_metrics(path: str, up_to_step: int) -> None:
    """On resume, drop logged evaluations newer than the restored step (they will be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= up_to_step]
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
          stop_at: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a toy run in `workdir`; returns the last evaluation's metrics.

    stop_at: stop after this many total steps without changing the schedule (tests use it
    to simulate a kill).
    """
    train_config = config.train
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    model_config = model_config_of(config, spec)
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        if MoEConfig.load(workdir) != model_config:
            raise ValueError(f"{workdir} holds a run of a different model config; use a new workdir")
    else:
        model_config.save(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    tx = make_optimizer(train_config)
    params = params_lib.init_params(model_config, jax.random.key(train_config.seed), mesh)
    opt_state = tx.init(params)
    ckpts = RunCheckpoints(workdir)
    start, restored = ckpts.restore_latest_state({"params": params, "opt_state": opt_state})
    if restored is not None:
        params, opt_state = restored["params"], restored["opt_state"]
    start = start or 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _rewrite_metrics(metrics_path, start)

    train_step = make_train_step(model_config, tx, train_config.aux_loss_coef, train_config.z_loss_coef, mesh)
    extractor = make_extractor(model_config)
    inputs, answers = jnp.asarray(data.train_inputs), jnp.asarray(data.train_targets)
    n_train = inputs.shape[0]
    end = train_config.steps if stop_at is None else min(stop_at, train_config.steps)
    last: dict[str, Any] = {}
    if start == 0:
        ckpts.save(0, params, opt_state)
        last = {"step": 0, **evaluate(model_config, params, data, extractor)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(last) + "\n")
    bar = tqdm(range(start, end), initial=start, total=train_config.steps, desc="train", disable=not progress)
    started = time.time()
    for step in bar:
        idx = batch_indices(train_config.seed, step, n_train, train_config.batch_size)
        params, opt_state, step_metrics = train_step(params, opt_state, sharding.shard_batch(inputs[idx], mesh),
                                                     sharding.shard_batch(answers[idx], mesh))
        done = step + 1
        if done % train_config.eval_every == 0 or done == train_config.steps:
            last = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                    **evaluate(model_config, params, data, extractor), "elapsed_s": time.time() - started}
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"non-finite training loss at step {done}; last checkpoint kept on disk")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(train_acc=f"{last['train_accuracy']:.2f}", test_acc=f"{last['test_accuracy']:.2f}")
        if done % train_config.checkpoint_every == 0 or done == train_config.steps:
            ckpts.save(done, params, opt_state)
    return last
