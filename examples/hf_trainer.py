"""A tiny Hugging Face Qwen3-MoE trained by a transformers `Trainer`, watched by moe_grok's
PathwayMonitor through its Trainer callback (`moe_grok.integrations.hf_trainer`).

The same model and corpus as examples/hf_torch_loop.py: byte windows of two of this repository's
docs (two data domains), a model built from a config. The callback runs the probe sets (the
training windows and the held-out windows) through the model at each of the Trainer's
evaluations, here every `eval_every` steps and once before training; at the end the monitor
writes the full report.

    python examples/hf_trainer.py --workdir /tmp/hf_trainer --steps 300

Needs torch, transformers and accelerate (pip install 'moe_grok[hf]' accelerate).
"""
from __future__ import annotations

import argparse
import os

import torch
from byte_corpus import load_corpus
from hf_torch_loop import tiny_model
from transformers import Trainer, TrainingArguments

from moe_grok.integrations.hf_trainer import PathwayMonitorCallback
from moe_grok.monitor import PathwayMonitor


class Windows(torch.utils.data.Dataset):
    """Token windows [N, S] as causal-LM examples (labels = the inputs; the model shifts them)."""

    def __init__(self, tokens):
        self.tokens = torch.as_tensor(tokens)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def main(workdir: str, steps: int = 300, eval_every: int = 30, batch_size: int = 8, seed: int = 0,
         with_plots: bool = True) -> dict:
    """Train for `steps` steps with the monitor's callback; returns {"metrics": the final step's
    metrics, "history_dir": the monitor's history, "report_dir": the report}."""
    corpus = load_corpus(seed=seed)
    history_dir = os.path.join(workdir, "monitor")
    monitor = PathwayMonitor({"train": corpus.train_domains, "held_out": corpus.held_out_domains},
                             directory=history_dir)
    callback = PathwayMonitorCallback(monitor, {"train": {"input_ids": corpus.train},
                                                "held_out": {"input_ids": corpus.held_out}})
    args = TrainingArguments(output_dir=os.path.join(workdir, "trainer"), max_steps=steps, learning_rate=3e-3,
                             per_device_train_batch_size=batch_size, eval_strategy="steps", eval_steps=eval_every,
                             logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=seed)
    trainer = Trainer(model=tiny_model(seed), args=args, train_dataset=Windows(corpus.train),
                      eval_dataset=Windows(corpus.held_out), callbacks=[callback])
    trainer.evaluate()  # step 0: the routing before training
    trainer.train()  # evaluates every eval_every steps; the callback finishes the monitor at the end
    if monitor.stats()[-1].step != steps:  # the last step fell between evaluations
        trainer.evaluate()
        callback.last_metrics = monitor.finish()
    monitor.write_report(workdir, with_plots=with_plots)
    monitor.close()
    return {"metrics": callback.last_metrics, "history_dir": history_dir, "report_dir": os.path.join(workdir, "report")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the monitor's history, the report and the "
                                                         "Trainer's output go")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--eval_every", type=int, default=30, help="steps between evaluations (monitor updates)")
    args = parser.parse_args()
    result = main(args.workdir, args.steps, args.eval_every)
    print(f"report: {result['report_dir']}")
