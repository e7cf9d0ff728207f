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
    hf_layout.check_default_rope(hf)
    if hf.get("attention_bias"):
        raise ValueError("unsupported: attention_bias=True (OLMoE has no biases)")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_experts=hf["num_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"],
        expert_intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=hf_layout.rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        clip_qkv=hf.get("clip_qkv"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return MoEConfig(**fields)
