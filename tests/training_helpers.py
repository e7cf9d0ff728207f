"""Shared toy-training settings of the training tests: a tiny config that compiles fast, metrics without timings."""
import dataclasses

import numpy as np

from moe_grok.training.metrics_log import read_metrics

from config_files import load_config


def tiny_config(steps=30):
    """moe_grok/configs/toy_grokking.py shrunk: p = 11, add and mul, a 2-layer 4-expert model of width 16,
    evaluations and checkpoints every 10 steps."""
    config = load_config("toy_grokking")
    config.task.p = 11
    config.task.ops = ("add", "mul")
    config.model.update(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
                        num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16,
                        expert_chunk_size=64, expert_chunk_granule=64)  # one chunk size class: compiles fast
    config.train.update(steps=steps, batch_size=32, eval_every=10, checkpoint_every=10, learning_rate=1e-2)
    config.analysis.update(batch_size=64, max_pairs=200)
    return config


def metrics_without_time(workdir):
    """metrics.jsonl's rows without elapsed_s (the only entry that differs between equal runs)."""
    return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in read_metrics(workdir)]


@dataclasses.dataclass
class StepRecorder:
    """A user training callback: records (seed, step, params checksum, metric names, checkpoint written)
    at each call (list.append: safe from the seeds' threads)."""

    every_steps: int | None
    at_end: bool = True
    name: str = "step_recorder"
    calls: list = dataclasses.field(default_factory=list)

    def on_step(self, state):
        checksum = float(np.sum(np.asarray(state.params["embed"]["embedding"], np.float64)))
        self.calls.append((state.seed, state.step, checksum, sorted(state.metrics), state.checkpoint_written))
