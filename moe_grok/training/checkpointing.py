"""A run's orbax checkpoints: params at every checkpoint step, and the latest full train states.

Below a run's workdir:
  checkpoints/<step>/   params at every `checkpoint_every` steps (the "pretraining checkpoints")
  train_state/<step>/   params + optimizer state, the latest STATES_KEPT (for resuming)
  corrupt/              train states that could not be restored, moved aside
"""
from __future__ import annotations

import os
import shutil
import time

import orbax.checkpoint as ocp
from absl import logging

CHECKPOINTS_DIR = "checkpoints"  # below a run's workdir: params at every checkpoint step
TRAIN_STATE_DIR = "train_state"  # below a run's workdir: the latest full train states
STATES_KEPT = 2  # train states kept: a corrupt latest one falls back to the one before


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
            os.path.join(self.workdir, TRAIN_STATE_DIR),
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

    def state_dir(self, step: int) -> str:
        """The orbax directory of the train state at `step`."""
        return str(ocp.step.find_step_path(self.state.directory, ocp.step.standard_name_format(), step=step))

    def restore_state(self, step: int, abstract_state):
        """The train state at `step`; on failure it is moved aside and RuntimeError names it."""
        try:
            return self.state.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax / TensorStore raise many types for damaged files
            bad = self.state_dir(step)
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
            raise RuntimeError(f"no usable train state in {self.workdir}/{TRAIN_STATE_DIR}: " + " | ".join(failures))
        return None, None


def has_training_output(workdir: str) -> bool:
    """Whether `workdir` holds a params checkpoint or a train state."""
    return any(os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
               for d in (CHECKPOINTS_DIR, TRAIN_STATE_DIR))
