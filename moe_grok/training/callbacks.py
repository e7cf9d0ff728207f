"""Periodic callbacks of the training loop: the protocol, the state they see, and the built-in ones.

A callback is any object with

  name: str                 names it in errors
  every_steps: int | None   called at every multiple of this step count (0 included: a fresh run's
                            initial params), or never by cadence when None
  at_end: bool              called after the last step of the schedule (`config.train.steps`)
  before_checkpoint: bool   optional (False when absent): see the order below
  on_step(state) -> None    the work, given the seed's RunState

At each step where callbacks are due, the loop calls the due ones in the order `step_callbacks`
gives: the built-in measuring callbacks (TrainStepMetrics, Evaluation), the caller's callbacks with
`before_checkpoint` (what they add to `state.metrics` is logged: e.g. a live monitor), the built-in
writers (LogMetrics, then SaveCheckpoint), then the caller's other callbacks (they see
`state.checkpoint_written`: e.g. studies.toy_run.AnalysisCacheWriter). Callbacks run in the seed's
thread: with several seeds, one callback object is called concurrently for different seeds (each
with its own state). A resumed run restarts after its restored train state: steps up to it are not
called again, steps after it are (they are trained again, with the same numbers). An exception in
a callback stops training; a note on it names the callback, the step and the seed.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from moe_grok.config import MoEConfig
from moe_grok.data.splits import EvalSplit
from moe_grok.training.checkpointing import RunCheckpoints
from moe_grok.training.evaluation import DEFAULT_PATHWAY_TAU, evaluate
from moe_grok.training.metrics_log import MetricsLog


@dataclasses.dataclass(eq=False)
class RunState:
    """One seed's run while it trains: what callbacks read and the per-step results they share.

    Set by the loop for the whole run: seed, workdir, config (the seed's config: `train.seed` is
    the seed), model_config, splits (tasks.evaluation_splits: "train", "test", "validation"),
    extractor (the compiled routing extractor of model_config, for extract_splits), mesh (None on
    one device), total_steps (config.train.steps), checkpoints (the run's RunCheckpoints) and
    metrics_log (its metrics.jsonl).

    Set by the loop before each step's callbacks: step (optimizer steps done), params and opt_state
    (after `step` steps), step_metrics (the last optimizer step's metrics as device scalars: loss,
    ce, nll, balance_loss, z_loss, batch_accuracy, grad_norm; None before this invocation's first
    step), stepping_since (time.time() when this invocation began its optimizer steps; None before).

    Filled by callbacks during one step, reset before the next: metrics (flat name -> float, what
    LogMetrics writes, in insertion order), extracted (the evaluation's per-sample outputs per
    evaluation split, or None when nothing was evaluated), checkpoint_written (True when a params
    checkpoint of this step was written now, False when none was or it was on disk already).
    """

    seed: int
    workdir: str
    config: ml_collections.ConfigDict | None = None
    model_config: MoEConfig | None = None
    splits: dict[str, EvalSplit] | None = None
    extractor: Any = None
    mesh: jax.sharding.Mesh | None = None
    total_steps: int = 0
    checkpoints: RunCheckpoints | None = None
    metrics_log: MetricsLog | None = None
    step: int = 0
    params: Any = None
    opt_state: Any = None
    step_metrics: dict[str, Any] | None = None
    stepping_since: float | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extracted: dict[str, dict[str, np.ndarray]] | None = None
    checkpoint_written: bool = False

    def begin_step(self, step: int) -> None:
        """Set `step` and clear the previous step's callback results, before the callbacks of `step`."""
        self.step = step
        self.metrics, self.extracted, self.checkpoint_written = {}, None, False


class Callback(Protocol):
    """A periodic action of the training loop (see the module docstring)."""

    name: str
    every_steps: int | None
    at_end: bool
    before_checkpoint: bool

    def on_step(self, state: RunState) -> None: ...


def is_due(callback: Callback, step: int, total_steps: int) -> bool:
    """Whether `callback` runs after `step` optimizer steps of a `total_steps` schedule."""
    return bool(callback.every_steps and step % callback.every_steps == 0) or (callback.at_end and step == total_steps)


def next_due_step(callbacks, step: int, total_steps: int) -> int | None:
    """The first step after `step` at which some callback is due, or None when none is."""
    candidates = [(step // c.every_steps + 1) * c.every_steps for c in callbacks if c.every_steps]
    if step < total_steps and any(c.at_end for c in callbacks):
        candidates.append(total_steps)
    return min(candidates, default=None)


def run_due(callbacks, state: RunState) -> None:
    """Call every callback due at `state.step`, in order; an exception is noted with the callback's name."""
    for callback in callbacks:
        if is_due(callback, state.step, state.total_steps):
            try:
                callback.on_step(state)
            except Exception as e:
                e.add_note(f"in training callback {callback.name!r} at step {state.step} of seed {state.seed} "
                           f"({state.workdir})")
                raise


@dataclasses.dataclass
class TrainStepMetrics:
    """Adds the last optimizer step's metrics (loss, ce, nll, ...; floats) to `state.metrics`, and
    stops the run with FloatingPointError on a non-finite loss (its last checkpoint is kept). Does
    nothing before the first step (a fresh run's step 0)."""

    every_steps: int | None
    at_end: bool = True
    before_checkpoint: bool = True
    name: str = "train_step_metrics"

    def on_step(self, state: RunState) -> None:
        if state.step_metrics is None:
            return
        metrics = {k: float(v) for k, v in state.step_metrics.items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite training loss at step {state.step} of seed {state.seed} "
                                     f"({state.workdir}); its last checkpoint is kept on disk")
        state.metrics.update(metrics)


@dataclasses.dataclass
class Evaluation:
    """Evaluates `state.params` on `state.splits` (training.evaluation.evaluate): adds the metrics
    (accuracies, losses, routing entropy, pathway length at `pathway_tau`) to `state.metrics` and
    sets `state.extracted`."""

    every_steps: int | None
    batch_size: int  # rows per evaluation batch (sets the float rounding of the outputs)
    at_end: bool = True
    pathway_tau: float = DEFAULT_PATHWAY_TAU
    before_checkpoint: bool = True
    name: str = "evaluation"

    def on_step(self, state: RunState) -> None:
        metrics, state.extracted = evaluate(state.model_config, state.params, state.splits, state.extractor,
                                            self.batch_size, self.pathway_tau)
        state.metrics.update(metrics)


@dataclasses.dataclass
class LogMetrics:
    """Appends {"step", *state.metrics, "elapsed_s"} to metrics.jsonl (elapsed_s: seconds since this
    invocation began stepping, absent before). Runs after the callbacks that produce metrics; logs
    nothing when none did."""

    every_steps: int | None
    at_end: bool = True
    before_checkpoint: bool = True
    name: str = "log_metrics"

    def on_step(self, state: RunState) -> None:
        if not state.metrics:
            return
        row = {"step": state.step, **state.metrics}
        if state.stepping_since is not None:
            row["elapsed_s"] = time.time() - state.stepping_since
        state.metrics_log.append(row)


@dataclasses.dataclass
class SaveCheckpoint:
    """Saves the params checkpoint and the train state of `state.step`; sets `state.checkpoint_written`.
    Runs after logging: a run killed in between resumes from the previous checkpoint and redoes the
    evaluation."""

    every_steps: int | None
    at_end: bool = True
    before_checkpoint: bool = False
    name: str = "save_checkpoint"

    def on_step(self, state: RunState) -> None:
        state.checkpoint_written = state.checkpoints.save(state.step, state.params, state.opt_state)


def step_callbacks(config: ml_collections.ConfigDict, callbacks: Sequence[Callback] = ()) -> list[Callback]:
    """The built-in callbacks of `config.train` with the caller's `callbacks`, in the order the loop
    calls them: train-step metrics and evaluation every `eval_every` steps, the caller's
    `before_checkpoint` callbacks, logging every `eval_every` steps, checkpoints every
    `checkpoint_every` steps (each built-in one also after the last step), the caller's others."""
    for callback in callbacks:
        every = callback.every_steps
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"training callback {callback.name!r}: every_steps must be a positive integer or None, "
                             f"got {every!r}")
    train = config.train
    before = [c for c in callbacks if getattr(c, "before_checkpoint", False)]
    after = [c for c in callbacks if not getattr(c, "before_checkpoint", False)]
    return [TrainStepMetrics(train.eval_every), Evaluation(train.eval_every, train.eval_batch_size), *before,
            LogMetrics(train.eval_every), SaveCheckpoint(train.checkpoint_every), *after]

