"""Model families: which Hugging Face checkpoints moe_grok reads, and how.

One module per family (olmoe.py, qwen3_moe.py), each with MODEL_TYPE (config.json's
"model_type"), ARCHITECTURE (the transformers class), REQUIRED_CONFIG_KEYS,
``config_from_hf(hf_config_dict, **overrides) -> MoEConfig`` (the translation, with the
family's layer switches) and ``key_map(model_config, keys)`` (HF tensor names -> params,
`hf_layout`). FAMILIES is the registry; `load_hf` dispatches through it on config.json's
model_type. To add a family, see docs/architecture.md ("Where to add a model family").
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from moe_grok.config import MoEConfig
from moe_grok.model.errors import UnsupportedModelTypeError
from moe_grok.model.families import hf_layout, olmoe, qwen3_moe

FAMILIES: dict[str, ModuleType] = {family.MODEL_TYPE: family for family in (olmoe, qwen3_moe)}


def family_of(model_type: Any, where: str = "") -> ModuleType:
    """The family module of config.json's model_type; UnsupportedModelTypeError listing the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{name!r} ({family.ARCHITECTURE})" for name, family in FAMILIES.items())
        raise UnsupportedModelTypeError(f"{where + ': ' if where else ''}unsupported model_type {model_type!r}: "
                                        f"moe_grok converts the model families {supported}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any], **overrides) -> MoEConfig:
    """MoEConfig of an HF config.json dict, translated by the family its model_type names."""
    return family_of(hf.get("model_type")).config_from_hf(hf, **overrides)


def key_map(model_config: MoEConfig, keys: set[str]) -> hf_layout.KeyMap:
    """The family's map of moe_grok param paths to HF tensors (see hf_layout) for a checkpoint with `keys`."""
    return family_of(model_config.family).key_map(model_config, keys)
