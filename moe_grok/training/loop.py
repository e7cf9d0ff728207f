"""Training the MoE transformer on algorithmic tasks: the loop over steps, per-seed threads, resume.

Layout of a run's workdir:
  run.json                the run's identity (task, split, model, optimizer, seed; see run_dir)
  moe_config.json         the model's MoEConfig
  config.json             the full config of the latest invocation
  checkpoints/<step>/     params at every `checkpoint_every` steps (the "pretraining checkpoints")
  train_state/<step>/     params + optimizer state, the latest two (for resuming; see checkpointing)
  metrics.jsonl           one JSON object per evaluation (step, losses, accuracies per group, routing)
  tensorboard/            the same rows as TensorBoard scalars (training.metrics_log)
  train.lock              held by the process training the run

What happens at a step besides the optimizer update is done by periodic callbacks (training.callbacks):
the built-in ones evaluate, log and checkpoint at the config's cadence; a caller adds its own.

Minibatches are a pure function of (seed, step), so a run killed and resumed from its
latest train state reproduces the uninterrupted run exactly.

Several seeds of one config train together (`train_runs`, used by `multiseed`): every seed
runs the same compiled single-seed step, each seed in its own thread between the steps where
callbacks are due, so seed s of a multi-seed run is bitwise the single-seed run of seed s (a
single-seed run is the one-seed case of the same loop).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_grok import atomic_files, sharding
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.training import run_dir
from moe_grok.training.callbacks import Callback, RunState, next_due_step, run_due, step_callbacks
from moe_grok.training.checkpointing import RunCheckpoints, has_training_output
from moe_grok.training.evaluation import evaluation_extractor
from moe_grok.training.metrics_log import MetricsLog
from moe_grok.training.optimizer import make_optimizer
from moe_grok.training.run_config import model_config_of, task_spec
from moe_grok.training.step import batch_indices, compiled_train_step, initial_params
from moe_grok.writers.progress import progress as progress_display

MAX_SEED_THREADS = 16  # most seeds advanced concurrently, one thread each


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict, model_config: MoEConfig) -> None:
    """Check (or record) the run's identity, then write its configs."""
    os.makedirs(workdir, exist_ok=True)
    run_dir.check_or_record_identity(workdir, run_dir.run_identity(config, model_config),
                                     has_training_output(workdir))
    model_config.save(workdir)
    atomic_files.write_text(os.path.join(workdir, "config.json"), config.to_json(indent=2))


def _restore_common_state(runs: list[RunState], start_states: list) -> int | None:
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
               callbacks: Sequence[Callback] = ()) -> list[dict[str, Any]]:
    """Train (or resume) one run per (seed, workdir), all seeds together; returns each run's last
    logged metrics row. `config.train.seed` is replaced by each run's seed.

    Every run trains the same steps; on resume all restart from the newest train state they
    all have. stop_at: stop after this many total steps without changing the schedule (tests
    use it to simulate a kill). callbacks: the caller's, called at their cadence in each seed's
    thread, around the built-in ones (training.callbacks.step_callbacks).
    """
    train_config = config.train
    run_dir.validate_train_config(train_config)
    ordered_callbacks = step_callbacks(config, callbacks)
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    model_config = model_config_of(config, spec)
    if len({os.path.abspath(workdir) for _, workdir in runs}) != len(runs):
        raise ValueError(f"every seed needs its own workdir, got {runs}")
    splits = tasks.evaluation_splits(data)
    seed_runs = []
    for seed, workdir in runs:
        seed_config = config.copy_and_resolve_references()
        seed_config.train.seed = seed
        seed_runs.append(RunState(seed, workdir, seed_config, model_config, splits, evaluation_extractor(model_config),
                                  mesh, train_config.steps))

    with contextlib.ExitStack() as locks:
        for run in seed_runs:
            os.makedirs(run.workdir, exist_ok=True)
            locks.enter_context(run_dir.workdir_lock(run.workdir))
        for run in seed_runs:
            _prepare_workdir(run.workdir, run.config, model_config)
            run.checkpoints = RunCheckpoints(run.workdir)
            run.metrics_log = MetricsLog(run.workdir)
            locks.callback(run.metrics_log.close)
        return _train_locked(config, seed_runs, data, mesh, stop_at, progress, ordered_callbacks)


def _mean_logged(runs: list[RunState], key: str) -> float:
    """The mean over runs of `key` in their last logged row (nan where one has none)."""
    return float(np.mean([run.metrics_log.last.get(key, np.nan) for run in runs]))


def _committed(tree, mesh: jax.sharding.Mesh | None):
    """Every leaf committed to a device (replicated over the mesh unless already placed), as restored
    states and step outputs are: fresh and resumed runs then share one compiled step."""
    target = jax.devices()[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, target), tree)


def _train_locked(config, seed_runs: list[RunState], data, mesh, stop_at, progress, callbacks: list[Callback]):
    train_config = config.train
    model_config = seed_runs[0].model_config
    tx = make_optimizer(train_config)
    for run in seed_runs:
        run.params = _committed(initial_params(model_config, run.seed, mesh), mesh)
        run.opt_state = _committed(tx.init(run.params), mesh)
    restored = _restore_common_state(seed_runs, [{"params": r.params, "opt_state": r.opt_state} for r in seed_runs])
    for run in seed_runs:
        # Rows after the restored state will be logged again; a fresh start logs all of them again.
        run.metrics_log.keep_up_to(-1 if restored is None else restored)
    start = restored or 0
    train_step = compiled_train_step(model_config, train_config, mesh)
    inputs, answers = jnp.asarray(data.train_inputs), jnp.asarray(data.train_targets)
    n_train = inputs.shape[0]
    end = train_config.steps if stop_at is None else min(stop_at, train_config.steps)
    if restored is None:  # the callbacks of step 0 (the initial params) run once, before any step
        for run in seed_runs:
            run.begin_step(0)
            run_due(callbacks, run)
    bar = progress_display(train_config.steps, initial=start, enabled=progress, unit="step",
                           desc=f"train {len(seed_runs)} seed{'s' if len(seed_runs) > 1 else ''}")
    progress_lock, seed_steps = threading.Lock(), {run.seed: start for run in seed_runs}

    def advance(run: RunState, first: int, last: int) -> None:
        """Run `run`'s steps first..last-1, wait for its device work, then its callbacks due at `last`."""
        for step in range(first, last):
            idx = batch_indices(run.seed, step, n_train, train_config.batch_size)
            batch = sharding.shard_batch(inputs[idx], mesh), sharding.shard_batch(answers[idx], mesh)
            run.params, run.opt_state, run.step_metrics = train_step(run.params, run.opt_state, *batch)
            with progress_lock:  # the bar shows the slowest seed
                seed_steps[run.seed] = step + 1
                bar.update(min(seed_steps.values()) - bar.n)
        jax.block_until_ready(run.params)
        run.begin_step(last)
        run_due(callbacks, run)

    started = time.time()
    for run in seed_runs:
        run.stepping_since = started
    # Seeds run in their own threads between the steps where callbacks are due: the CPU runtime
    # executes one dispatching thread's programs one after another, and one toy step uses the cores
    # only partly (docs/training.md). With a mesh the seeds stay in one thread, so every process
    # launches its collective programs in the same order.
    workers = 1 if mesh is not None else min(len(seed_runs), MAX_SEED_THREADS)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        each_run = map if workers == 1 else pool.map
        step = start
        while step < end:
            done = min(end, next_due_step(callbacks, step, train_config.steps) or end)
            # A seed runs its callbacks as soon as its own steps are done, beside the others' steps.
            list(each_run(lambda run, first=step, last=done: advance(run, first, last), seed_runs))
            step = done
            bar.set_postfix({f"{split}_acc": f"{_mean_logged(seed_runs, f'{split}_accuracy'):.2f}"
                             for split in ("train", "test")})
    bar.close()
    return [run.metrics_log.last for run in seed_runs]


def train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
          stop_at: int | None = None, progress: bool = True, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (or resume) the run of `config.train.seed` in `workdir`; returns its last logged
    metrics row.

    stop_at: stop after this many total steps without changing the schedule (tests use it
    to simulate a kill); callbacks: see train_runs.
    """
    return train_runs(config, [(config.train.seed, workdir)], mesh, stop_at, progress, callbacks)[0]
