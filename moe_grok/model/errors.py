"""The errors a checkpoint that cannot be read raises (HF conversion, safetensors files, moe_grok checkpoints)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (bad files, missing/extra keys, wrong shapes, bad config)."""


class UnsupportedModelTypeError(CheckpointError):
    """config.json names a model_type no model family of moe_grok converts (the message lists those that do)."""
