"""A transformers MoE model over a `PathwayMonitor`'s probe sets: the `outputs` of one update.

`probe_outputs(model, probes)` runs every probe set through the model in eval mode, without
gradients, in batches, with ``output_router_logits=True``, and gives per probe the routing
(`moe_grok.monitor.hf_routing.routing_from_hf`), the per-sample loss and correctness
(`per_sample_loss_from_hf`) and the scored-position routing of the labels. Any training loop over
a transformers model (a plain torch loop, the Trainer callback of `hf_trainer`) calls it at its
monitoring cadence, with `router_matrices_from_hf(model)` as the update's router and
`parameter_sample_from_hf(model)` as its parameter sample (the report's parameter dynamics).

Part of the optional extra moe_grok[hf] (torch; see docs/integrations.md).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from moe_grok.analysis.param_dynamics import parameter_sample
from moe_grok.monitor.hf_routing import (
    IGNORE_INDEX,
    is_router_key,
    per_sample_loss_from_hf,
    routing_from_hf,
    scored_positions_from_labels,
)
from moe_grok.monitor.routing_arrays import to_numpy


def probe_tokens(input_ids, attention_mask=None, labels=None) -> dict[str, np.ndarray]:
    """One probe set's model inputs as int64 numpy arrays [N, S]: input_ids, attention_mask (default:
    every token real) and labels (default: input_ids with IGNORE_INDEX at padding, what transformers'
    language-modeling collator gives), checked to agree in shape."""
    ids = to_numpy(input_ids, np.int64)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty [samples, seq] array, got shape {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else to_numpy(attention_mask, np.int64)
    labels = np.where(mask != 0, ids, IGNORE_INDEX) if labels is None else to_numpy(labels, np.int64)
    if mask.shape != ids.shape or labels.shape != ids.shape:
        raise ValueError(f"attention_mask {mask.shape} and labels {labels.shape} must match input_ids {ids.shape}")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def probe_outputs(model, probes: Mapping[str, Mapping[str, Any]], *, batch_size: int = 16,
                  model_type: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """`PathwayMonitor.update`'s outputs: every probe set through `model`.

    model: a transformers MoE causal LM of a family `routing_from_hf` reads (model_type defaults to
    ``model.config.model_type``). probes: {probe name: {"input_ids": [N, S], optional
    "attention_mask" / "labels": [N, S]}} (numpy arrays or tensors; `probe_tokens`' defaults).
    The model runs in eval mode without gradients on its own device, in batches of `batch_size`
    samples; its training mode is restored afterwards.
    Returns {probe: {"mean_weights": [N, L, E], "routing_entropy": [N, L] (nats),
    "scored_mean_weights", "scored_routing_entropy" (over positions whose next label is scored),
    "loss": [N] (nats), "correct": [N] (share of scored positions exact)}}, numpy float32.
    """
    model_type = model_type or model.config.model_type
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {name: _run_probe(model, probe_tokens(**tokens), batch_size, model_type, device)
                    for name, tokens in probes.items()}
    finally:
        model.train(was_training)


def _run_probe(model, tokens: dict[str, np.ndarray], batch_size: int, model_type: str, device
               ) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    n = tokens["input_ids"].shape[0]
    for start in range(0, n, max(batch_size, 1)):
        batch = {k: v[start:start + batch_size] for k, v in tokens.items()}
        out = model(input_ids=torch.as_tensor(batch["input_ids"], device=device),
                    attention_mask=torch.as_tensor(batch["attention_mask"], device=device),
                    output_router_logits=True)
        fields = routing_from_hf(out.router_logits, batch["attention_mask"], model_type=model_type,
                                 scored_mask=scored_positions_from_labels(batch["labels"]))
        fields["loss"], fields["correct"] = per_sample_loss_from_hf(out.logits, batch["labels"])
        for field, value in fields.items():
            parts.setdefault(field, []).append(value)
    return {field: np.concatenate(values) for field, values in parts.items()}


DEFAULT_PARAM_SAMPLE_SIZE = 4096
"""Entries sampled per parameter tensor: a few MB per monitored step for a 7B-parameter model."""


class _TensorEntries:
    """A parameter tensor as `analysis.param_dynamics.parameter_sample` reads a leaf (shape, size, all
    entries or those at sampled positions), copying to the host only what is read."""

    def __init__(self, tensor):
        self.tensor = tensor.detach()
        self.shape = tuple(self.tensor.shape)
        self.size = self.tensor.numel()

    def reshape(self, *shape):
        return to_numpy(self.tensor.reshape(*shape))

    def __getitem__(self, positions):
        index = tuple(torch.as_tensor(p, device=self.tensor.device) for p in positions)
        return to_numpy(self.tensor[index])


def hf_parameter_path(name: str) -> str:
    """The path under which a transformers parameter is sampled: its name with a suffix that puts it in
    `param_dynamics.family_of`'s family (router: a MoE layer's gate; experts: routed and shared
    experts; attention: self-attention; other: the rest, named as is)."""
    if is_router_key(name):
        return f"{name}/moe/router"
    if ".experts." in name or ".shared_expert." in name or ".shared_experts." in name:
        return f"{name}/moe/experts"
    if ".self_attn." in name:
        return f"{name}/attn/weights"
    return name


def parameter_sample_from_hf(model, sample_size: int = DEFAULT_PARAM_SAMPLE_SIZE) -> dict[str, np.ndarray]:
    """`analysis.param_dynamics.parameter_sample` of a transformers model's parameters: the same fixed
    positions of each tensor at every step (at most `sample_size` entries, float32), keyed by
    `hf_parameter_path`, plus each tensor's size; PathwayMonitor.update's `param_sample`."""
    tensors = {hf_parameter_path(name): _TensorEntries(p) for name, p in model.named_parameters()}
    return parameter_sample(tensors, sample_size)
