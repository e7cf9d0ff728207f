"""Qwen3-MoE (`Qwen3MoeForCausalLM`, Qwen/Qwen3-30B-A3B and kin): config.json -> MoEConfig, and its key map.

Layer switches against OLMoE: q/k RMSNorm per head over head_dim (qk_norm "per_head"), no
clip_qkv; dense SwiGLU MLP layers (width intermediate_size) where transformers builds them:
layer i is dense if i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0, and the MoE
experts have width moe_intermediate_size. norm_topk_prob renormalizes the top-k weights (True in
the released checkpoints). Keys: the shared decoder layout, dense layers at
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.
"""
from __future__ import annotations

from typing import Any

from moe_grok.config import MoEConfig
from moe_grok.model.families import hf_layout

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
# config.json keys without a default; the expert count is "num_experts" or (transformers >= 5) "num_local_experts".
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_experts_per_tok", "moe_intermediate_size")

key_map = hf_layout.decoder_key_map  # Qwen3-MoE's keys are the shared decoder layout (dense layers included)


def dense_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    """The layers transformers' Qwen3MoeDecoderLayer gives a dense MLP (Qwen3MoeMLP)."""
    only_mlp = set(hf.get("mlp_only_layers") or ())
    step = hf.get("decoder_sparse_step") or 1
    return tuple(i for i in range(hf["num_hidden_layers"]) if i in only_mlp or (i + 1) % step)


def num_experts(hf: dict[str, Any]) -> int:
    count = hf.get("num_experts", hf.get("num_local_experts"))
    if count is None:
        raise ValueError("config.json names no expert count (num_experts or num_local_experts)")
    return count


def config_from_hf(hf: dict[str, Any], **overrides) -> MoEConfig:
    """MoEConfig of a Qwen3-MoE config.json dict (ValueError for settings moe_grok does not implement)."""
    if hf.get("attention_bias"):
        raise ValueError("unsupported: attention_bias=True (moe_grok's attention has no biases)")
    if hf.get("use_sliding_window"):
        raise ValueError("unsupported: use_sliding_window=True (moe_grok's attention is full causal)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf.get('hidden_act')!r}: the MLPs are SwiGLU (silu)")
    dense = dense_layers(hf)
    fields = hf_layout.decoder_fields(hf, max_seq_len=32768, rms_norm_eps=1e-6)
    fields.update(family=MODEL_TYPE, num_experts=num_experts(hf), expert_intermediate_size=hf["moe_intermediate_size"],
                  qk_norm="per_head", dense_layers=dense,
                  dense_intermediate_size=hf.get("intermediate_size", 0) if dense else 0)
    fields.update(overrides)
    return MoEConfig(**fields)
