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

from moe_grok import model as model_lib
from moe_grok import analysis, sharding, tasks
from moe_grok.config import MoEConfig, toy
from moe_grok.convert import CONFIG_FILE
from moe_grok.extraction import extract_dataset, make_extractor


def task_spec(config: ml_collections.ConfigDict) -> tasks.TaskSpec:
    return tasks.TaskSpec(p=config.task.p, ops=tuple(config.task.ops),
                          train_fraction=config.task.train_fraction, seed=config.task.seed)


def model_config(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> MoEConfig:
    return toy(vocab_size=spec.vocab_size, max_seq_len=tasks.SEQ_LEN, **config.model.to_dict())


def answer_targets(inputs: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets/target_mask [N, SEQ_LEN] scoring only the answer position (for extraction)."""
    targets = np.zeros_like(inputs)
    targets[:, tasks.ANSWER_POSITION] = answers
    target_mask = np.zeros_like(inputs)
    target_mask[:, tasks.ANSWER_POSITION] = 1
    return targets, target_mask


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warmup to a constant learning rate."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, train.learning_rate, train.warmup_steps), optax.constant_schedule(train.learning_rate)],
        [train.warmup_steps])
    return optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay)


def loss_fn(params, config: MoEConfig, inputs, answers, aux_loss_coef: float, z_loss_coef: float):
    """Cross-entropy at the answer position + load-balancing + router z-loss. Returns (loss, metrics)."""
    mask = jnp.ones(inputs.shape, jnp.int32)
    out = model_lib.forward(config, params, inputs, mask)
    logits = out.logits[:, tasks.ANSWER_POSITION].astype(jnp.float32)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, answers))
    balance = model_lib.load_balancing_loss(out.router_logits, mask, config.num_experts_per_tok)
    z = model_lib.router_z_loss(out.router_logits, mask)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == answers)
    loss = ce + aux_loss_coef * balance + z_loss_coef * z
    return loss, {"loss": loss, "ce": ce, "balance_loss": balance, "z_loss": z, "batch_accuracy": accuracy}


def make_train_step(config: MoEConfig, tx: optax.GradientTransformation, aux_loss_coef: float,
                    z_loss_coef: float, mesh: jax.sharding.Mesh | None = None):
    """Jitted (params, opt_state, inputs, answers) -> (params, opt_state, metrics)."""

    def step(params, opt_state, inputs, answers):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, config, inputs, answers, aux_loss_coef, z_loss_coef)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    p_shard = model_lib.param_shardings(config, mesh)
    batch = lambda ndim: jax.sharding.NamedSharding(mesh, sharding.batch_spec(mesh, ndim))  # noqa: E731
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(p_shard, None, batch(2), batch(1)),
                   out_shardings=(p_shard, None, None))


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


def evaluate(config: MoEConfig, params, data: tasks.AlgorithmicDataset, extractor, batch_size: int = 2048):
    """Loss and accuracy per split and group at the answer position -> flat dict of floats."""
    result = {}
    for split in ("train", "test"):
        inputs, answers, groups = (getattr(data, f"{split}_{f}") for f in ("inputs", "targets", "groups"))
        targets, target_mask = answer_targets(inputs, answers)
        stats = extract_dataset(config, params, inputs, None, targets, target_mask, batch_size=batch_size,
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
    train_cfg = config.train
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    mconfig = model_config(config, spec)
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            if MoEConfig.from_json(f.read()) != mconfig:
                raise ValueError(f"{workdir} holds a run of a different model config; use a new workdir")
    else:
        with open(config_path, "w") as f:
            f.write(mconfig.to_json())
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    tx = make_optimizer(train_cfg)
    params = model_lib.init_params(mconfig, jax.random.key(train_cfg.seed), mesh)
    opt_state = tx.init(params)
    ckpts = RunCheckpoints(workdir)
    start, restored = ckpts.restore_latest_state({"params": params, "opt_state": opt_state})
    if restored is not None:
        params, opt_state = restored["params"], restored["opt_state"]
    start = start or 0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    _rewrite_metrics(metrics_path, start)

    train_step = make_train_step(mconfig, tx, train_cfg.aux_loss_coef, train_cfg.z_loss_coef, mesh)
    extractor = make_extractor(mconfig)
    inputs, answers = jnp.asarray(data.train_inputs), jnp.asarray(data.train_targets)
    n_train = inputs.shape[0]
    end = train_cfg.steps if stop_at is None else min(stop_at, train_cfg.steps)
    last: dict[str, Any] = {}
    if start == 0:
        ckpts.save(0, params, opt_state)
        last = {"step": 0, **evaluate(mconfig, params, data, extractor)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(last) + "\n")
    bar = tqdm(range(start, end), initial=start, total=train_cfg.steps, desc="train", disable=not progress)
    started = time.time()
    for step in bar:
        idx = batch_indices(train_cfg.seed, step, n_train, train_cfg.batch_size)
        params, opt_state, step_metrics = train_step(params, opt_state, sharding.shard_batch(inputs[idx], mesh),
                                                     sharding.shard_batch(answers[idx], mesh))
        done = step + 1
        if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
            last = {"step": done, **{k: float(v) for k, v in step_metrics.items()},
                    **evaluate(mconfig, params, data, extractor), "elapsed_s": time.time() - started}
            if not np.isfinite(last["loss"]):
                raise FloatingPointError(f"non-finite training loss at step {done}; last checkpoint kept on disk")
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(train_acc=f"{last['train_accuracy']:.2f}", test_acc=f"{last['test_accuracy']:.2f}")
        if done % train_cfg.checkpoint_every == 0 or done == train_cfg.steps:
            ckpts.save(done, params, opt_state)
    return last


# ----------------------------------------------------------------------------------------
# Analysis of a finished (or running) toy run: the same code path as the OLMoE pipeline.
# ----------------------------------------------------------------------------------------
def run_checkpoint_sources(workdir: str) -> list[analysis.CheckpointSource]:
    """One CheckpointSource per saved params checkpoint of a run."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        mconfig = MoEConfig.from_json(f.read())
    ckpts = RunCheckpoints(workdir)
    abstract = model_lib.param_shapes(mconfig)
    return [analysis.CheckpointSource(step, f"step {step}",
                                      lambda step=step: (mconfig, ckpts.restore_params(step, abstract)))
            for step in ckpts.steps()]


def task_splits(data: tasks.AlgorithmicDataset) -> dict[str, analysis.EvalSplit]:
    """Train and test splits scored at the answer position, groups = operations."""
    splits = {}
    for split in ("train", "test"):
        inputs = np.asarray(getattr(data, f"{split}_inputs"))
        targets, target_mask = answer_targets(inputs, getattr(data, f"{split}_targets"))
        splits[split] = analysis.EvalSplit(inputs, np.ones_like(inputs), targets, target_mask,
                                           np.asarray(getattr(data, f"{split}_groups")), data.group_names)
    return splits


def analyze_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
                progress: bool = True) -> dict[str, Any]:
    """analysis.run_pipeline over the run's checkpoints (cache in workdir/analysis/cache,
    report files in workdir/analysis/report). Returns the report."""
    data = tasks.make_dataset(task_spec(config))
    a = config.analysis
    options = analysis.AnalysisOptions(tau=a.tau, delta=a.delta, target_fraction=tuple(a.target_fraction),
                                       distance_level=a.distance_level, max_pairs=a.max_pairs)
    return analysis.run_pipeline(run_checkpoint_sources(workdir), task_splits(data),
                                 os.path.join(workdir, "analysis"), test_split="test", options=options,
                                 batch_size=a.batch_size, mesh=mesh, progress=progress)
