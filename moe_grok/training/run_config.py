"""What a toy training config describes: its task (`config.task`) and its model (`config.model`)."""
from __future__ import annotations

import ml_collections

from moe_grok.config import MoEConfig, toy
from moe_grok.data import tasks


def task_spec(config: ml_collections.ConfigDict) -> tasks.TaskSpec:
    """The algorithmic task of `config.task`."""
    task = config.task
    try:
        spec = tasks.TaskSpec(p=task.p, ops=tuple(task.ops), train_fraction=task.train_fraction, seed=task.seed,
                              random_labels=task.random_labels)
        # Checked here, where every caller starts, so a run is refused before any file is written.
        spec.check_evaluation_splits()
    except ValueError as e:
        raise ValueError(f"invalid config.task: {e}") from None
    return spec


def model_config_of(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> MoEConfig:
    """The run's MoEConfig: `toy()` with the config's `model` fields, sized for the task."""
    try:
        return toy(vocab_size=spec.vocab_size, max_seq_len=tasks.SEQ_LEN, **config.model.to_dict())
    except (TypeError, ValueError) as e:  # an unknown key (TypeError) or an invalid value: name the section
        raise ValueError(f"invalid config.model: {e}") from None
