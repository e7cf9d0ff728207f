"""The pathway monitor in a transformers `Trainer`: a `TrainerCallback` that, at each evaluation,
runs the probe sets through the model (`hf_probes.probe_outputs`: eval mode, no gradients,
batched, ``output_router_logits=True``) and updates a `PathwayMonitor` with their routing, loss
and correctness, the model's router matrices (`hf_routing.router_matrices_from_hf`) and a sample
of its parameters (`hf_probes.parameter_sample_from_hf`).

The only module of moe_grok that imports transformers (the optional extra moe_grok[hf]); nothing
else imports this module. docs/integrations.md shows it in use; examples/hf_trainer.py runs it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moe_grok.integrations.hf_probes import (
    DEFAULT_PARAM_SAMPLE_SIZE,
    parameter_sample_from_hf,
    probe_outputs,
    probe_tokens,
)
from moe_grok.monitor.hf_routing import router_matrices_from_hf
from moe_grok.monitor.pathway_monitor import PathwayMonitor

try:
    from transformers import TrainerCallback
except ImportError as err:  # the optional extra
    raise ImportError("moe_grok.integrations.hf_trainer needs transformers: pip install 'moe_grok[hf]'") from err


class PathwayMonitorCallback(TrainerCallback):
    """Updates `monitor` at every evaluation of the Trainer (``eval_strategy`` sets when), at the
    Trainer's ``global_step``; at the end of training the detector's verdict is final
    (`PathwayMonitor.finish`). With several processes only the main one (world process zero) runs
    the probes and updates the monitor.

    probes: {probe name: {"input_ids": [N, S], optional "attention_mask" / "labels": [N, S]}}, one
    entry per probe set of the monitor (same names, N its samples). batch_size: probe samples per
    forward pass. model_type: defaults to the model's ``config.model_type``. param_sample_size:
    entries sampled per parameter tensor for the report's parameter dynamics (None: no sample).
    `last_metrics` holds the newest update's metrics ({name: float}).
    """

    def __init__(self, monitor: PathwayMonitor, probes: Mapping[str, Mapping[str, Any]], *, batch_size: int = 16,
                 model_type: str | None = None, param_sample_size: int | None = DEFAULT_PARAM_SAMPLE_SIZE,
                 finish_at_train_end: bool = True):
        missing = sorted(set(monitor.probes) - set(probes))
        if missing:
            raise ValueError(f"no tokens for the monitor's probe set(s) {missing}")
        self.probes = {name: probe_tokens(**probes[name]) for name in monitor.probes}
        for name, tokens in self.probes.items():
            if len(tokens["input_ids"]) != len(monitor.probes[name]):
                raise ValueError(f"probe {name!r}: {len(tokens['input_ids'])} samples of tokens, but the monitor's "
                                 f"probe set has {len(monitor.probes[name])}")
        self.monitor = monitor
        self.batch_size = batch_size
        self.model_type = model_type
        self.param_sample_size = param_sample_size
        self.finish_at_train_end = finish_at_train_end
        self.last_metrics: dict[str, float] = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("the Trainer gave the callback no model at evaluation")
        outputs = probe_outputs(model, self.probes, batch_size=self.batch_size, model_type=self.model_type)
        router = router_matrices_from_hf(model, self.model_type)
        sample = None if self.param_sample_size is None else parameter_sample_from_hf(model, self.param_sample_size)
        self.last_metrics = self.monitor.update(state.global_step, outputs, router, sample)

    def on_train_end(self, args, state, control, **kwargs):
        if self.finish_at_train_end and state.is_world_process_zero and self.monitor.stats():
            self.last_metrics = self.monitor.finish()
