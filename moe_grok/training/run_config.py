"""What a toy training config describes: its task (`config.task`) and its model (`config.model`)."""
from __future__ import annotations

import ml_collections

from moe_grok.config import MoEConfig, toy
from moe_grok.data import tasks


def task_spec(config: ml_collections.ConfigDict) -> tasks.TaskSpec:
    """The algorithmic task of `config.task`."""
    task = config.task
    return tasks.TaskSpec(p=task.p, ops=tuple(task.ops), train_fraction=task.train_fraction, seed=task.seed,
                          random_labels=task.random_labels)


def model_config_of(config: ml_collections.ConfigDict, spec: tasks.TaskSpec) -> MoEConfig:
    """The run's MoEConfig: `toy()` with the config's `model` fields, sized for the task."""
    return toy(vocab_size=spec.vocab_size, max_seq_len=tasks.SEQ_LEN, **config.model.to_dict())
