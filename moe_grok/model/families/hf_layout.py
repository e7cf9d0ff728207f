"""The Hugging Face checkpoint layout OLMoE and Qwen3-MoE share, as a key map onto moe_grok's params.

Every moe_grok parameter is a stack of HF tensors: over layers (params under ``layers/``), and
over experts too (``layers/moe/{gate,up,down}_proj``; with MoEConfig.expert_layout "per_layer",
``experts/<i>/{gate,up,down}_proj`` stack one MoE layer's experts, stored [out, in] as HF stores
them: no transpose). A key map gives, for each parameter path,
a function (stack index, expert) -> Source: which HF tensor (and which part of it) fills that cell.
The stack index counts the parameter's own stack: all layers for attention and norms, the MoE
layers (`MoEConfig.moe_layers`) for ``layers/moe/*``, the dense layers (`MoEConfig.dense_layers`)
for ``layers/mlp/*``.

Expert layouts: the hub's per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (what
``save_pretrained`` writes) and the fused one newer transformers hold in memory
(``mlp.experts.gate_up_proj [E, 2F, D]`` gate rows first, ``mlp.experts.down_proj [E, D, F]``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moe_grok.config import MoEConfig
from moe_grok.model.layers import DENSE_MLP_WEIGHTS, EXPERT_WEIGHTS

KeyMap = dict[tuple[str, ...], Callable[[int | None, int | None], "Source"]]


@dataclasses.dataclass(frozen=True)
class Source:
    """How to read one HF tensor for one (layer, expert) cell of a moe_grok parameter.

    key: the HF key; index: the part of that tensor to take (fused experts: (expert, rows));
    transpose: HF Linear weights are [out, in], ours are [in, out].
    """

    key: str
    index: tuple = ()
    transpose: bool = True


def layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def fused_expert_keys(layer: int) -> tuple[str, str]:
    """The fused layout's (gate_up_proj [E, 2F, D], down_proj [E, D, F]) keys of one layer."""
    return layer_key(layer, "mlp.experts.gate_up_proj"), layer_key(layer, "mlp.experts.down_proj")


def _expert_sources(model_config: MoEConfig, keys: set[str], layer: int) -> dict[str, Callable[[int], Source]]:
    """Per-expert sources for gate/up/down of HF layer `layer` in whichever layout the checkpoint uses,
    transposed to [in, out] for the "stacked" expert layout, as stored for "per_layer"."""
    f = model_config.expert_intermediate_size
    transpose = model_config.expert_layout == "stacked"
    fused, down = fused_expert_keys(layer)
    if fused in keys:
        return {  # fused tensors: [E, 2F, D] and [E, D, F]; expert e is row e of axis 0
            "gate_proj": lambda e: Source(fused, index=(e, slice(0, f)), transpose=transpose),
            "up_proj": lambda e: Source(fused, index=(e, slice(f, 2 * f)), transpose=transpose),
            "down_proj": lambda e: Source(down, index=(e,), transpose=transpose),
        }
    return {name: (lambda e, name=name: Source(layer_key(layer, f"mlp.experts.{e}.{name}.weight"), transpose=transpose))
            for name in EXPERT_WEIGHTS}


ATTENTION_AND_NORM_KEYS = {  # moe_grok path under layers/ -> HF name under model.layers.{i}.
    ("attn", "q_proj", "kernel"): "self_attn.q_proj.weight",
    ("attn", "k_proj", "kernel"): "self_attn.k_proj.weight",
    ("attn", "v_proj", "kernel"): "self_attn.v_proj.weight",
    ("attn", "o_proj", "kernel"): "self_attn.o_proj.weight",
    ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
    ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
    ("input_norm", "scale"): "input_layernorm.weight",
    ("post_attention_norm", "scale"): "post_attention_layernorm.weight",
}


def decoder_key_map(model_config: MoEConfig, keys: set[str]) -> KeyMap:
    """moe_grok param path -> function(stack index, expert) -> Source (None where the axis is absent).

    keys: the checkpoint's tensor names (they decide the expert layout)."""
    moe_layers, dense_layers = model_config.moe_layers, model_config.dense_layers
    mapping: KeyMap = {
        ("embed", "embedding"): lambda i, e: Source("model.embed_tokens.weight", transpose=False),
        ("final_norm", "scale"): lambda i, e: Source("model.norm.weight", transpose=False),
    }
    if not model_config.tie_word_embeddings:
        mapping[("lm_head", "kernel")] = lambda i, e: Source("lm_head.weight")
    for path, name in ATTENTION_AND_NORM_KEYS.items():
        mapping[("layers", *path)] = (
            lambda i, e, name=name, t=path[-1] != "scale": Source(layer_key(i, name), transpose=t))
    mapping[("layers", "moe", "router")] = lambda i, e: Source(layer_key(moe_layers[i], "mlp.gate.weight"))
    for name in EXPERT_WEIGHTS:
        if model_config.expert_layout == "stacked":
            mapping[("layers", "moe", name)] = (
                lambda i, e, name=name: _expert_sources(model_config, keys, moe_layers[i])[name](e))
        else:  # experts/<i>/<name>: one MoE layer's experts, the layer fixed by the path
            for i, layer in enumerate(moe_layers):
                mapping[("experts", str(i), name)] = (
                    lambda _, e, name=name, layer=layer: _expert_sources(model_config, keys, layer)[name](e))
    if dense_layers:
        for name in DENSE_MLP_WEIGHTS:
            mapping[("layers", "mlp", name)] = (
                lambda i, e, name=name: Source(layer_key(dense_layers[i], f"mlp.{name}.weight")))
    return mapping


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    """config.json's RoPE base: rope_theta at the top level (older transformers) or in rope_parameters."""
    theta = hf.get("rope_theta")
    if theta is None:
        theta = (hf.get("rope_parameters") or {}).get("rope_theta", default)
    return float(theta)


def check_default_rope(hf: dict) -> None:
    """ValueError unless config.json asks for plain RoPE (no scaling: linear, dynamic, yarn, ...)."""
    rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}: only default RoPE is implemented")


def decoder_fields(hf: dict, *, max_seq_len: int, rms_norm_eps: float) -> dict:
    """The MoEConfig fields every decoder family reads alike from config.json (the defaults are the family's)."""
    check_default_rope(hf)
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_experts_per_tok=hf["num_experts_per_tok"],
        max_seq_len=hf.get("max_position_embeddings", max_seq_len),
        rope_theta=rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
