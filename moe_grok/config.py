"""MoEConfig: the frozen description of an OLMoE-architecture Mixture-of-Experts transformer."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

MOE_IMPLS = ("auto", "ragged", "chunked", "dense")
ATTENTION_IMPLS = ("auto", "matmul", "elementwise")
# Fields newer than some saved configs and run identities: the value those ran with.
FIELDS_ADDED_LATER = {"attention_impl": "matmul"}
CONFIG_FILE = "moe_config.json"  # the MoEConfig beside a saved checkpoint or training run


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Architecture (and numerics) of an OLMoE-style decoder.

    Block: x + attn(input_norm(x)); then + moe(post_attention_norm(.)).
    Router: linear -> float32 softmax over all experts -> top-k -> optional renormalization.
    Experts: SwiGLU, down(silu(gate(x)) * up(x)).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    # Numerics / implementation choices (not part of the checkpoint's architecture).
    dtype: str = "float32"  # parameter and activation dtype; routing softmax and norms stay float32
    moe_impl: str = "auto"  # auto: ragged_dot on GPU/TPU, per-expert chunked matmuls on CPU
    expert_chunk_size: int = 512  # CPU "chunked" dispatch: most rows in one expert matmul
    expert_chunk_granule: int = 32  # ... and chunk rows are rounded up to a multiple of this
    remat_layers: bool = False  # gradients recompute each layer's forward instead of storing its activations
    attention_impl: str = "auto"  # auto: elementwise products on CPU for <= 8 tokens, else batched matmuls
    init_std: float = 0.02

    def __post_init__(self):
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok} not in "
                            f"[1, num_experts={self.num_experts}]")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.moe_impl not in MOE_IMPLS:
            problems.append(f"moe_impl={self.moe_impl!r} not in {MOE_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl={self.attention_impl!r} not in {ATTENTION_IMPLS}")
        if not 0 < self.expert_chunk_granule <= self.expert_chunk_size or \
                self.expert_chunk_size % self.expert_chunk_granule:
            problems.append(f"expert_chunk_size={self.expert_chunk_size} must be a positive multiple of "
                            f"expert_chunk_granule={self.expert_chunk_granule}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r} not in float32/bfloat16/float16")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def active_flops_per_token(self, seq_len: int, with_lm_head: bool = False) -> float:
        """Forward FLOPs per token (2 per multiply-add) counting only the k active experts.

        Attention scores/values are counted for the causal average context (seq_len + 1) / 2.
        """
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        projections = 2 * d * (h * hd + 2 * kv * hd) + 2 * h * hd * d
        attention = 2 * 2 * h * hd * (seq_len + 1) / 2
        router = 2 * d * self.num_experts
        experts = self.num_experts_per_tok * 3 * 2 * d * self.expert_intermediate_size
        total = self.num_layers * (projections + attention + router + experts)
        if with_lm_head:
            total += 2 * d * self.vocab_size
        return float(total)

    # --- Hugging Face config.json interop -------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> MoEConfig:
        """Build from an OLMoE config.json dict; raises ValueError for other model types."""
        model_type = hf.get("model_type")
        if model_type != "olmoe":
            raise ValueError(f"unsupported model_type {model_type!r}: moe_grok converts 'olmoe' checkpoints only")
        rope_theta = hf.get("rope_theta")
        if rope_theta is None:
            rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r}: only default RoPE is implemented")
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
            rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            clip_qkv=hf.get("clip_qkv"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        if hf.get("attention_bias"):
            raise ValueError("unsupported: attention_bias=True (OLMoE has no biases)")
        fields.update(overrides)
        return cls(**fields)

    def architecture(self) -> dict[str, Any]:
        """The fields that define the checkpoint's shapes (used to compare checkpoints)."""
        keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "num_experts_per_tok", "expert_intermediate_size", "norm_topk_prob",
                "tie_word_embeddings")
        return {k: getattr(self, k) for k in keys}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        fields = {**FIELDS_ADDED_LATER, **json.loads(text)}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config has fields this moe_grok version does not know: {unknown}")
        return cls(**fields)

    def save(self, directory: str) -> str:
        """Write ``directory/moe_config.json``; returns its path."""
        path = os.path.join(directory, CONFIG_FILE)
        with open(path, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, directory: str) -> MoEConfig:
        """Read ``directory/moe_config.json`` (ValueError naming the file if absent or invalid)."""
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
        with open(path) as f:
            text = f.read()
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a valid MoEConfig ({err})") from None


def olmoe_1b_7b(**overrides) -> MoEConfig:
    """allenai/OLMoE-1B-7B-0924 (expert intermediate 1024, not the OlmoeConfig class default)."""
    fields = dict(vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                  head_dim=128, num_experts=64, num_experts_per_tok=8, expert_intermediate_size=1024,
                  max_seq_len=4096, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False)
    fields.update(overrides)
    return MoEConfig(**fields)


def olmoe_small(**overrides) -> MoEConfig:
    """OLMoE-shaped but small (the benchmark config): hidden 512, 8 layers, 64 experts top-8."""
    fields = dict(vocab_size=50304, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                  head_dim=64, num_experts=64, num_experts_per_tok=8, expert_intermediate_size=256)
    fields.update(overrides)
    return MoEConfig(**fields)


def toy(vocab_size: int, **overrides) -> MoEConfig:
    """A laptop-sized MoE for algorithmic tasks: 4 layers so pathways have a length."""
    fields = dict(vocab_size=vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                  head_dim=32, num_experts=8, num_experts_per_tok=2, expert_intermediate_size=128,
                  max_seq_len=16)
    fields.update(overrides)
    return MoEConfig(**fields)
