"""OLMoE (`OlmoeForCausalLM`, allenai/OLMoE-1B-7B): config.json -> MoEConfig, and its key map.

Layer switches: q/k RMSNorm over the whole projection (qk_norm "full"), optional clip_qkv,
every layer a MoE layer; softmax routing over all experts, top-k, renormalized when
norm_topk_prob (False in the released checkpoints).
"""
from __future__ import annotations

from typing import Any

from moe_grok.config import MoEConfig
from moe_grok.model.families import hf_layout

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
# config.json keys without a default (config_from_hf reads them).
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                        "num_experts_per_tok", "intermediate_size")

key_map = hf_layout.decoder_key_map  # OLMoE's keys are the shared decoder layout


def config_from_hf(hf: dict[str, Any], **overrides) -> MoEConfig:
    """MoEConfig of an OLMoE config.json dict (ValueError for settings moe_grok does not implement)."""
    if hf.get("attention_bias"):
        raise ValueError("unsupported: attention_bias=True (OLMoE has no biases)")
    fields = hf_layout.decoder_fields(hf, max_seq_len=4096, rms_norm_eps=1e-5)
    fields.update(num_experts=hf["num_experts"], expert_intermediate_size=hf["intermediate_size"],
                  clip_qkv=hf.get("clip_qkv"))
    fields.update(overrides)
    return MoEConfig(**fields)
