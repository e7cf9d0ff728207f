"""Training the MoE transformer on algorithmic tasks: jitted AdamW steps, orbax checkpoints, resume.

Layout of a run's workdir:
  run.json                the run's identity (task, split, model, optimizer, seed; see run_dir)
  moe_config.json         the model's MoEConfig
  config.json             the full config of the latest invocation
  checkpoints/<step>/     params at every `checkpoint_every` steps (the "pretraining checkpoints")
  train_state/<step>/     params + optimizer state, the latest two (for resuming)
  metrics.jsonl           one JSON object per evaluation (step, losses, accuracies per group, routing)
  train.lock              held by the process training the run

Minibatches are a pure function of (seed, step), so a run killed and resumed from its
latest train state reproduces the uninterrupted run exactly.

Several seeds of one config train together (`train_runs`, used by `multiseed`): every seed
runs the same compiled single-seed step, each seed in its own thread between evaluations, so
seed s of a multi-seed run is bitwise the single-seed run of seed s (a single-seed run is the
one-seed case of the same loop).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from moe_grok import sharding
from moe_grok.analysis import pathways
from moe_grok.config import MoEConfig, toy
from moe_grok.data import tasks
from moe_grok.data.splits import EvalSplit
from moe_grok.extraction.routing import extract_splits, make_extractor
from moe_grok.model import params as params_lib
from moe_grok.training import losses, run_dir

CHECKPOINTS_DIR = "checkpoints"  # below a run's workdir: params at every checkpoint step
MONITOR_TAU = 0.7  # pathway threshold of the logged pathway length (the analysis' default tau)
STATES_KEPT = 2  # train states kept: a corrupt latest one falls back to the one before
MAX_SEED_THREADS = 16  # most seeds advanced concurrently, one thread each


def task_spec(config: ml_collections.ConfigDict) -> tasks.TaskSpec:
    task = config.task
    return tasks.TaskSpec(p=task.p, ops=tuple(task.ops), train_fraction=task.train_fraction, seed=task.seed,
                          random_labels=task.random_labels)


def model_config_of(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> MoEConfig:
    """The run's MoEConfig: `toy()` with the config's `model` fields, sized for the task."""
    return toy(vocab_size=spec.vocab_size, max_seq_len=tasks.SEQ_LEN, **config.model.to_dict())


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


def loss_fn(params, model_config: MoEConfig, inputs, answers, aux_loss_coef: float, z_loss_coef: float,
            label_smoothing: float = 0.0):
    """Cross-entropy at the answer position (against labels smoothed by `label_smoothing`) +
    load-balancing + router z-loss. Returns (loss, metrics); metrics' "ce" is the optimized
    (smoothed) cross-entropy, "nll" the plain one."""
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


OPTIMIZER_KEYS = ("learning_rate", "warmup_steps", "b1", "b2", "adam_eps", "weight_decay", "grad_clip_norm",
                  "router_weight_decay", "aux_loss_coef", "z_loss_coef",
                  "label_smoothing")  # train keys the compiled step depends on


@functools.lru_cache(maxsize=16)
def _cached_train_step(model_config: MoEConfig, settings: tuple, mesh: jax.sharding.Mesh | None):
    train = ml_collections.ConfigDict(dict(settings))
    return make_train_step(model_config, make_optimizer(train), train.aux_loss_coef, train.z_loss_coef, mesh,
                           train.label_smoothing)


def compiled_train_step(model_config: MoEConfig, train: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh | None = None):
    """make_train_step for `config.train`, shared by every run of one process with the same
    model, optimizer and mesh (so the seeds of a multi-seed run, and repeated runs, compile once)."""
    return _cached_train_step(model_config, tuple((k, train[k]) for k in OPTIMIZER_KEYS), mesh)


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


# XLA's CPU backend hands only matmuls to its YNNPACK library, not elementwise ops and reductions:
# for the toy step's many small [B, S, H, Dh] fusions its own loops are faster (docs/benchmarks.md).
CPU_TRAIN_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


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


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The minibatch of `step`: a pure function of (seed, step) -> [batch_size] indices < n."""
    return np.random.default_rng([seed, step]).choice(n, size=min(batch_size, n), replace=False)


class RunCheckpoints:
    """The orbax managers of a run: all params checkpoints, and the latest two full train states.

    A train state that cannot be restored is moved to ``workdir/corrupt/`` with a warning naming
    it, and the one before is used; if none can be restored, RuntimeError names them all.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self.params = ocp.CheckpointManager(os.path.join(self.workdir, CHECKPOINTS_DIR), options=options)
        self._open_state()

    def _open_state(self) -> None:
        self.state = ocp.CheckpointManager(
            os.path.join(self.workdir, "train_state"),
            options=ocp.CheckpointManagerOptions(create=True, max_to_keep=STATES_KEPT,
                                                 enable_async_checkpointing=False))

    def save(self, step: int, params, opt_state) -> bool:
        """Params and train state at `step`; True if the params were written now (orbax skips a step at
        or below its newest one, e.g. on resume: what is on disk is left as it is, resume being exact)."""
        written = self.params.save(step, args=ocp.args.StandardSave(params))
        self.state.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        return bool(written)

    def steps(self) -> list[int]:
        return sorted(self.params.all_steps())

    def state_steps(self) -> list[int]:
        return sorted(self.state.all_steps())

    def restore_params(self, step: int, abstract_params):
        return self.params.restore(step, args=ocp.args.StandardRestore(abstract_params))

    def _state_dir(self, step: int) -> str:
        return str(ocp.step.find_step_path(self.state.directory, ocp.step.standard_name_format(), step=step))

    def restore_state(self, step: int, abstract_state):
        """The train state at `step`; on failure it is moved aside and RuntimeError names it."""
        try:
            return self.state.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax / TensorStore raise many types for damaged files
            bad = self._state_dir(step)
            corrupt_dir = os.path.join(self.workdir, "corrupt")
            os.makedirs(corrupt_dir, exist_ok=True)
            moved = os.path.join(corrupt_dir, f"train_state_{step}.{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(bad, moved)
            self._open_state()
            raise RuntimeError(f"train state {bad} cannot be restored ({type(e).__name__}: {str(e)[:300]}); "
                               f"moved to {moved}") from e

    def restore_latest_state(self, abstract_state, at_most: int | None = None):
        """(step, state) of the newest restorable train state (<= at_most), or (None, None) when the
        run has none yet. Falls back over damaged states with a warning; RuntimeError if all are."""
        failures = []
        for step in reversed(self.state_steps()):
            if at_most is not None and step > at_most:
                continue
            try:
                return step, self.restore_state(step, abstract_state)
            except RuntimeError as e:
                logging.warning("%s; falling back to the previous train state", e)
                failures.append(str(e))
        if failures:
            raise RuntimeError(f"no usable train state in {self.workdir}/train_state: " + " | ".join(failures))
        return None, None


@functools.lru_cache(maxsize=16)
def _cached_extractor(model_config: MoEConfig):
    return make_extractor(model_config)


@functools.lru_cache(maxsize=16)
def _cached_init(model_config: MoEConfig):
    """init_params compiled once per process and model: runs and seeds share it."""
    return jax.jit(functools.partial(params_lib.init_params, model_config))


def _init_params(model_config: MoEConfig, seed: int, mesh: jax.sharding.Mesh | None):
    """The seed's initial params; with a mesh, made on one device and then placed (the same values
    as a single-device run, and no sharded compile of the initializer)."""
    params = _cached_init(model_config)(jax.random.key(seed))
    return params if mesh is None else jax.device_put(params, params_lib.param_shardings(model_config, mesh))


def _mean_pathway_length(mean_weights: np.ndarray, tau: float) -> float:
    """Mean over samples and layers of the experts on the pathway. mean_weights: [N, L, E]."""
    return float(np.mean(pathways.pathway_lengths(mean_weights, tau)))


LOGGED_SPLITS = {"train": ("train",), "test": ("test", "validation")}  # logged split: its evaluation splits
"""metrics.jsonl's "test" metrics are over all held-out pairs: both halves tasks.evaluation_splits cuts."""

EvaluationCallback = Callable[[str, int, Any, dict[str, EvalSplit], dict[str, dict[str, np.ndarray]]], None]
"""(workdir, step, params, splits, extracted): called after a checkpoint at an evaluated step is saved."""


def evaluate(model_config: MoEConfig, params, splits: dict[str, EvalSplit], extractor, batch_size: int
             ) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Run tasks.evaluation_splits' `splits` through `params` together (extract_splits, `batch_size`
    rows per batch) -> (metrics, extracted).

    metrics, per LOGGED_SPLITS split: loss and accuracy at the answer position (overall and per
    group), routing entropy (nats, token mean, averaged over layers and samples) and pathway length
    (experts per layer at tau = MONITOR_TAU), as a flat dict of floats. extracted: extract_splits'
    per-sample outputs per evaluation split (what the analysis caches per checkpoint).
    """
    extracted = extract_splits(model_config, params,
                               {name: split.arrays() for name, split in splits.items()},
                               batch_size=batch_size, extractor=extractor, progress=False)
    group_names = splits["train"].group_names
    result = {}
    for logged, parts in LOGGED_SPLITS.items():
        groups = np.concatenate([splits[part].groups for part in parts])
        stats = {field: np.concatenate([extracted[part][field] for part in parts])
                 for field in ("loss", "correct", "routing_entropy", "mean_weights")}
        result[f"{logged}_loss"] = float(stats["loss"].mean())
        result[f"{logged}_accuracy"] = float(stats["correct"].mean())
        for g, name in enumerate(group_names):
            in_group = groups == g
            result[f"{logged}_accuracy/{name}"] = float(stats["correct"][in_group].mean())
            result[f"{logged}_loss/{name}"] = float(stats["loss"][in_group].mean())
        result[f"{logged}_routing_entropy"] = float(stats["routing_entropy"].mean())
        result[f"{logged}_pathway_length"] = _mean_pathway_length(stats["mean_weights"], MONITOR_TAU)
    return result, extracted


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts (a line cut short by a kill at the end is skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not valid JSON ({e}); remove or repair that line") from e
    return rows


class _SeedRun:
    """One seed's workdir, checkpoints, metrics log and training state while training."""

    def __init__(self, workdir: str, seed: int):
        self.workdir, self.seed = workdir, seed
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.checkpoints: RunCheckpoints | None = None
        self.params = self.opt_state = self.step_metrics = None
        self.last: dict[str, Any] = {}

    def prepare(self, config: ml_collections.ConfigDict, model_config: MoEConfig) -> None:
        """Check (or record) the run's identity, then write its configs."""
        os.makedirs(self.workdir, exist_ok=True)
        started = any(os.path.isdir(os.path.join(self.workdir, d)) and os.listdir(os.path.join(self.workdir, d))
                      for d in (CHECKPOINTS_DIR, "train_state"))
        run_dir.check_or_record_identity(self.workdir, run_dir.run_identity(config, model_config), started)
        model_config.save(self.workdir)
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    def logged(self) -> list[dict[str, Any]]:
        return read_metrics(self.workdir) if os.path.exists(self.metrics_path) else []

    def keep_metrics_up_to(self, step: int) -> None:
        """On resume, drop logged evaluations newer than the restored step (they will be redone)."""
        kept = [row for row in self.logged() if row["step"] <= step]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        self.last = kept[-1] if kept else {}

    def log(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.last = row


def _restore_common_state(runs: list[_SeedRun], start_states: list) -> int | None:
    """Put every run at the step all of them can restore: the smallest of their newest usable
    train states. Returns that step, or None (fresh start) when some run has no state yet."""
    latest = [run.checkpoints.restore_latest_state(state) for run, state in zip(runs, start_states, strict=True)]
    if any(step is None for step, _ in latest):
        return None
    start = min(step for step, _ in latest)
    for run, (step, state), target in zip(runs, latest, start_states, strict=True):
        if step != start:
            if start not in run.checkpoints.state_steps():
                raise RuntimeError(f"seed {run.seed} has train states {run.checkpoints.state_steps()} in "
                                   f"{run.workdir} but not step {start}, where the other seeds resume")
            state = run.checkpoints.restore_state(start, target)
        run.params, run.opt_state = state["params"], state["opt_state"]
    return start


def train_runs(config: ml_collections.ConfigDict, runs: list[tuple[int, str]], mesh: jax.sharding.Mesh | None = None,
               stop_at: int | None = None, progress: bool = True,
               on_evaluated_checkpoint: EvaluationCallback | None = None) -> list[dict[str, Any]]:
    """Train (or resume) one run per (seed, workdir), all seeds together; returns each run's last
    evaluation. `config.train.seed` is replaced by each run's seed.

    Every run trains the same steps; on resume all restart from the newest train state they
    all have. stop_at: stop after this many total steps without changing the schedule (tests
    use it to simulate a kill). on_evaluated_checkpoint: called in the seed's thread with
    (workdir, step, params, the evaluation's splits, its extracted outputs) once a checkpoint at an
    evaluated step is saved (e.g. studies.toy_run.analysis_cache_writer).
    """
    train_config = config.train
    run_dir.validate_train_config(train_config)
    if mesh is not None and on_evaluated_checkpoint is not None:
        # A mesh changes the evaluation's float rounding: its outputs are not what the analysis computes.
        logging.warning("training on a mesh: on_evaluated_checkpoint is not called (the analysis extracts itself)")
        on_evaluated_checkpoint = None
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    model_config = model_config_of(config, spec)
    seed_runs = [_SeedRun(workdir, seed) for seed, workdir in runs]
    if len({os.path.abspath(r.workdir) for r in seed_runs}) != len(seed_runs):
        raise ValueError(f"every seed needs its own workdir, got {runs}")

    with contextlib.ExitStack() as locks:
        for run in seed_runs:
            os.makedirs(run.workdir, exist_ok=True)
            locks.enter_context(run_dir.workdir_lock(run.workdir))
        for run in seed_runs:
            seed_config = config.copy_and_resolve_references()
            seed_config.train.seed = run.seed
            run.prepare(seed_config, model_config)
            run.checkpoints = RunCheckpoints(run.workdir)
        return _train_locked(config, seed_runs, data, model_config, mesh, stop_at, progress,
                             on_evaluated_checkpoint)


def _committed(tree, mesh: jax.sharding.Mesh | None):
    """Every leaf committed to a device (replicated over the mesh unless already placed), as restored
    states and step outputs are: fresh and resumed runs then share one compiled step."""
    target = jax.devices()[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, target), tree)


def _next_boundary(step: int, train) -> int:
    """The first step after `step` with an evaluation or a checkpoint."""
    return min((step // every + 1) * every for every in (train.eval_every, train.checkpoint_every))


def _train_locked(config, seed_runs: list[_SeedRun], data, model_config: MoEConfig, mesh, stop_at, progress,
                  on_evaluated_checkpoint: EvaluationCallback | None):
    train_config = config.train
    tx = make_optimizer(train_config)
    for run in seed_runs:
        run.params = _committed(_init_params(model_config, run.seed, mesh), mesh)
        run.opt_state = _committed(tx.init(run.params), mesh)
    start = _restore_common_state(seed_runs, [{"params": r.params, "opt_state": r.opt_state} for r in seed_runs]) or 0
    for run in seed_runs:
        run.keep_metrics_up_to(start)

    train_step = compiled_train_step(model_config, train_config, mesh)
    extractor = _cached_extractor(model_config)
    splits = tasks.evaluation_splits(data)
    inputs, answers = jnp.asarray(data.train_inputs), jnp.asarray(data.train_targets)
    n_train = inputs.shape[0]
    end = train_config.steps if stop_at is None else min(stop_at, train_config.steps)
    if start == 0:
        for run in seed_runs:
            written = run.checkpoints.save(0, run.params, run.opt_state)
            if not run.last:
                metrics, extracted = evaluate(model_config, run.params, splits, extractor, train_config.eval_batch_size)
                run.log({"step": 0, **metrics})
                if written and on_evaluated_checkpoint is not None:
                    on_evaluated_checkpoint(run.workdir, 0, run.params, splits, extracted)
    bar = tqdm(total=train_config.steps, initial=start, disable=not progress,
               desc=f"train {len(seed_runs)} seed{'s' if len(seed_runs) > 1 else ''}")
    progress_lock, seed_steps = threading.Lock(), {run.seed: start for run in seed_runs}

    def advance(run: _SeedRun, first: int, last: int) -> None:
        """Run `run`'s steps first..last-1, then wait for its device work."""
        for step in range(first, last):
            idx = batch_indices(run.seed, step, n_train, train_config.batch_size)
            batch = sharding.shard_batch(inputs[idx], mesh), sharding.shard_batch(answers[idx], mesh)
            run.params, run.opt_state, run.step_metrics = train_step(run.params, run.opt_state, *batch)
            with progress_lock:  # the bar shows the slowest seed
                seed_steps[run.seed] = step + 1
                bar.update(min(seed_steps.values()) - bar.n)
        jax.block_until_ready(run.params)

    def at_boundary(run: _SeedRun, done: int) -> None:
        """Log the evaluation at `done`, then save the checkpoint (in this order: a run killed in
        between resumes from the previous checkpoint and redoes the evaluation), then hand the
        evaluation to on_evaluated_checkpoint if this checkpoint was written now."""
        extracted = None
        if done % train_config.eval_every == 0 or done == train_config.steps:
            row = {"step": done, **{k: float(v) for k, v in run.step_metrics.items()}}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"non-finite training loss at step {done} of seed {run.seed} "
                                         f"({run.workdir}); its last checkpoint is kept on disk")
            metrics, extracted = evaluate(model_config, run.params, splits, extractor, train_config.eval_batch_size)
            run.log({**row, **metrics, "elapsed_s": time.time() - started})
        if done % train_config.checkpoint_every == 0 or done == train_config.steps:
            written = run.checkpoints.save(done, run.params, run.opt_state)
            if written and extracted is not None and on_evaluated_checkpoint is not None:
                on_evaluated_checkpoint(run.workdir, done, run.params, splits, extracted)

    started = time.time()
    # Seeds run in their own threads between evaluations: the CPU runtime executes one dispatching
    # thread's programs one after another, and one toy step uses the cores only partly
    # (docs/training.md). With a mesh the seeds stay in one thread, so every process launches its
    # collective programs in the same order.
    workers = 1 if mesh is not None else min(len(seed_runs), MAX_SEED_THREADS)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        each_run = map if workers == 1 else pool.map
        step = start
        while step < end:
            done = min(end, _next_boundary(step, train_config))
            # A seed evaluates and saves as soon as its own steps are done, beside the others' steps.
            list(each_run(lambda run, first=step, last=done: (advance(run, first, last), at_boundary(run, last)),
                          seed_runs))
            step = done
            bar.set_postfix(train_acc=f"{np.mean([r.last['train_accuracy'] for r in seed_runs]):.2f}",
                            test_acc=f"{np.mean([r.last['test_accuracy'] for r in seed_runs]):.2f}")
    bar.close()
    return [run.last for run in seed_runs]


def train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
          stop_at: int | None = None, progress: bool = True,
          on_evaluated_checkpoint: EvaluationCallback | None = None) -> dict[str, Any]:
    """Train (or resume) the run of `config.train.seed` in `workdir`; returns its last evaluation.

    stop_at: stop after this many total steps without changing the schedule (tests use it
    to simulate a kill); on_evaluated_checkpoint: see train_runs.
    """
    return train_runs(config, [(config.train.seed, workdir)], mesh, stop_at, progress, on_evaluated_checkpoint)[0]
