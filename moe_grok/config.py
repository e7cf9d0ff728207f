"""MoEConfig: the frozen description of a decoder-only Mixture-of-Experts transformer (OLMoE, Qwen3-MoE).

Translating a Hugging Face config.json into a MoEConfig is the model families' work
(`moe_grok.model.families`); this module holds only the description itself.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any

import jax.numpy as jnp

from moe_grok import atomic_files

MOE_IMPLS = ("auto", "ragged", "chunked", "batched", "dense")
ATTENTION_IMPLS = ("auto", "matmul", "elementwise")
QK_NORMS = ("full", "per_head")  # q/k RMSNorm over the whole projection (OLMoE) or over each head (Qwen3-MoE)
# Where the expert weights sit in the parameter tree, and which way round (model.params' docstring):
# "stacked": layers/moe/{gate,up}_proj [L_moe, E, D, F], down_proj [L_moe, E, F, D] ([in, out]), read by the
#   layer scan (training's layout, and every checkpoint's before "per_layer" existed);
# "per_layer": experts/<i>/{gate,up}_proj [E, F, D], down_proj [E, D, F] ([out, in] as HF stores them), one
#   array per MoE layer and the layers unrolled (what XLA's CPU dot is fastest with; extraction of HF models).
EXPERT_LAYOUTS = ("stacked", "per_layer")
# Fields newer than some saved configs and run identities: the value those ran with (configs
# written before model families existed are OLMoE's).
FIELDS_ADDED_LATER = {"attention_impl": "matmul", "family": "olmoe", "qk_norm": "full", "dense_layers": [],
                      "dense_intermediate_size": 0, "expert_layout": "stacked"}
# Architecture fields that only non-OLMoE families set: `architecture()` names them only when
# they differ from these values, so OLMoE's architecture (stored in stats caches) is unchanged.
_FAMILY_ARCHITECTURE_DEFAULTS = {"family": "olmoe", "qk_norm": "full", "dense_layers": (),
                                 "dense_intermediate_size": 0}
CONFIG_FILE = "moe_config.json"  # the MoEConfig beside a saved checkpoint or training run


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Architecture (and numerics) of an OLMoE-style decoder.

    Block: x + attn(input_norm(x)); then + mlp(post_attention_norm(.)), where mlp is the sparse
    MoE block, or on the layers in `dense_layers` a dense SwiGLU MLP of width
    `dense_intermediate_size` (Qwen3-MoE's mlp_only_layers / decoder_sparse_step).
    Attention: q/k RMSNorm before RoPE, over the whole projection (qk_norm "full", OLMoE) or over
    each head's head_dim values (qk_norm "per_head", Qwen3-MoE).
    Router: linear -> float32 softmax over all experts -> top-k -> optional renormalization.
    Experts: SwiGLU, down(silu(gate(x)) * up(x)).

    Routing layers: only the MoE layers route; router logits, router matrices and every routing
    array count `moe_layers` (num_moe_layers of them, in layer order), not num_layers.
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
    family: str = "olmoe"  # the model family (moe_grok.model.families) whose checkpoint layout this is
    qk_norm: str = "full"  # "full" | "per_head": see QK_NORMS
    dense_layers: tuple[int, ...] = ()  # layer indices (0-based) with a dense MLP instead of the MoE block
    dense_intermediate_size: int = 0  # the dense MLP's width (used only when dense_layers is not empty)
    # Numerics / implementation choices (not part of the checkpoint's architecture).
    dtype: str = "float32"  # parameter and activation dtype; routing softmax and norms stay float32
    moe_impl: str = "auto"  # auto: ragged_dot on GPU/TPU; on CPU batched (per_layer experts) or chunked matmuls
    expert_chunk_size: int = 512  # CPU "chunked" dispatch: most rows in one expert matmul
    expert_chunk_granule: int = 32  # ... and chunk rows are rounded up to a multiple of this
    remat_layers: bool = False  # gradients recompute each layer's forward instead of storing its activations
    attention_impl: str = "auto"  # auto: elementwise products on CPU for <= 8 tokens, else batched matmuls
    expert_layout: str = "stacked"  # "stacked" | "per_layer": see EXPERT_LAYOUTS (the parameter tree's form)
    init_std: float = 0.02

    def __post_init__(self):
        # JSON gives a list; a tuple keeps the config hashable (it is a static jit argument).
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        problems = []
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "num_experts",
                 "expert_intermediate_size", "max_seq_len")
        for name in sizes:  # 0 layers used to fail as an IndexError inside the dispatch, after training began
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))
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
        if self.expert_layout not in EXPERT_LAYOUTS:
            problems.append(f"expert_layout={self.expert_layout!r} not in {EXPERT_LAYOUTS}")
        if self.qk_norm not in QK_NORMS:
            problems.append(f"qk_norm={self.qk_norm!r} not in {QK_NORMS}")
        if self.dense_layers:
            if sorted(set(self.dense_layers)) != list(self.dense_layers) or \
                    not 0 <= self.dense_layers[0] <= self.dense_layers[-1] < self.num_layers:
                problems.append(f"dense_layers={self.dense_layers} must be distinct, increasing layer indices in "
                                f"[0, num_layers={self.num_layers})")
            elif len(self.dense_layers) == self.num_layers:
                problems.append("every layer is dense: a MoE model needs at least one MoE layer to route")
            if self.dense_intermediate_size <= 0:
                problems.append(f"dense_intermediate_size={self.dense_intermediate_size} must be positive with "
                                "dense layers")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r} not in float32/bfloat16/float16")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE (routing) layers, increasing: every layer not in dense_layers."""
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @property
    def num_moe_layers(self) -> int:
        """Routing layers: the L of router logits [B, S, L, E] and routing arrays [N, L, E]."""
        return self.num_layers - len(self.dense_layers)

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
        total = self.num_layers * (projections + attention) + self.num_moe_layers * (router + experts)
        total += len(self.dense_layers) * 3 * 2 * d * self.dense_intermediate_size
        if with_lm_head:
            total += 2 * d * self.vocab_size
        return float(total)

    def architecture(self) -> dict[str, Any]:
        """The fields that define the checkpoint's shapes and layer structure (used to compare
        checkpoints). The family fields appear only where they differ from OLMoE's, so an OLMoE
        architecture reads as it did before model families existed."""
        keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "num_experts_per_tok", "expert_intermediate_size", "norm_topk_prob",
                "tie_word_embeddings")
        arch = {k: getattr(self, k) for k in keys}
        for key, olmoe_value in _FAMILY_ARCHITECTURE_DEFAULTS.items():
            if getattr(self, key) != olmoe_value:
                arch[key] = list(self.dense_layers) if key == "dense_layers" else getattr(self, key)
        if self.dense_layers:
            arch["num_moe_layers"] = self.num_moe_layers
        return arch

    def settings(self) -> dict[str, Any]:
        """Every field (architecture and numerics), less the family fields at OLMoE's values and the
        expert layout at "stacked": what identifies the config in caches recorded before model
        families and expert layouts existed, unchanged."""
        fields = dataclasses.asdict(self)
        for key, olmoe_value in {**_FAMILY_ARCHITECTURE_DEFAULTS, "expert_layout": "stacked"}.items():
            if fields[key] == olmoe_value:
                del fields[key]
        return fields

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
        atomic_files.write_text(path, self.to_json())
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
