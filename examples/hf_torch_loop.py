"""A tiny Hugging Face Qwen3-MoE trained by a plain torch loop, watched by moe_grok's PathwayMonitor.

The model is built from a config (nothing is downloaded); the corpus is byte windows of this
repository's docs (examples/byte_corpus.py), two documents as two data domains. Every `eval_every`
steps (and before the first) the probe sets, the training windows and held-out windows, run
through the model (`moe_grok.integrations.hf_probes.probe_outputs`) and the monitor takes their
routing and losses, the router matrices and a sample of the parameters; at the end it writes the
full report.

    python examples/hf_torch_loop.py --workdir /tmp/hf_torch_loop --steps 300

Needs torch and transformers (pip install 'moe_grok[hf]'). docs/integrations.md explains each step.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from byte_corpus import VOCAB_SIZE, load_corpus
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_grok.integrations.hf_probes import parameter_sample_from_hf, probe_outputs
from moe_grok.monitor import PathwayMonitor
from moe_grok.monitor.hf_routing import router_matrices_from_hf


def tiny_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    """A 3-layer Qwen3-MoE with 8 experts (top 2) over a byte vocabulary, randomly initialized (3 MoE
    layers: with 2, pathway consistency is 1 whatever the routing)."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
                            pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return Qwen3MoeForCausalLM(config)


def main(workdir: str, steps: int = 300, eval_every: int = 30, batch_size: int = 8, seed: int = 0,
         with_plots: bool = True) -> dict:
    """Train for `steps` steps with the monitor; returns {"metrics": the final step's metrics,
    "history_dir": the monitor's history, "report_dir": the report}."""
    corpus = load_corpus(seed=seed)
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # The probe sets: every training window (watched) and the held-out windows, with their domains.
    probes = {"train": {"input_ids": corpus.train}, "held_out": {"input_ids": corpus.held_out}}
    history_dir = os.path.join(workdir, "monitor")
    monitor = PathwayMonitor({"train": corpus.train_domains, "held_out": corpus.held_out_domains},
                             directory=history_dir)
    rng = np.random.default_rng(seed)
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            metrics = monitor.update(step, probe_outputs(model, probes), router_matrices_from_hf(model),
                                     parameter_sample_from_hf(model))
            print(f"step {step}: train loss {metrics['monitor/method/train_loss']:.3f}, memorized-minus-held-out "
                  f"distance {metrics['monitor/method/contrast/distance']:.3f} (domain 'method')", flush=True)
        if step == steps:
            break
        batch = torch.as_tensor(corpus.train[rng.integers(0, len(corpus.train), batch_size)])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = monitor.finish()
    monitor.write_report(workdir, with_plots=with_plots)
    monitor.close()
    return {"metrics": metrics, "history_dir": history_dir, "report_dir": os.path.join(workdir, "report")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the monitor's history and the report go")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--eval_every", type=int, default=30, help="steps between monitor updates")
    args = parser.parse_args()
    result = main(args.workdir, args.steps, args.eval_every)
    print(f"report: {result['report_dir']}")
