"""OLMoE-1B-7B's dimensions and its expert layer, shared by the benchmarks that time them.

Imported as a sibling module (`python benchmarks/<script>.py`), like `timing`. jax, torch and
transformers are imported inside the functions, as the scripts import them after flag parsing.
"""
from __future__ import annotations

# OLMoE-1B-7B-0924's config.json.
HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, LAYERS, VOCAB = 2048, 1024, 64, 8, 16, 50304


def hf_experts_layer():
    """transformers' `OlmoeExperts` of one layer at OLMoE-1B-7B size, as `OlmoeModel` builds it.

    Random weights, bfloat16, eval mode: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    Called as `experts(x [T, D], top_idx [T, k], top_w [T, k]) -> [T, D]`.
    """
    import torch
    from transformers import OlmoeConfig, OlmoeModel

    config = OlmoeConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_experts=EXPERTS,
                         num_experts_per_tok=TOP_K, num_hidden_layers=1, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=128, pad_token_id=1, eos_token_id=None,
                         bos_token_id=None)
    return OlmoeModel(config).to(torch.bfloat16).eval().layers[0].mlp.experts


def bf16_product(spec: str, a, b):
    """`einsum(spec, a, b)` in bfloat16 with float32 accumulation, as moe_grok's layers compute."""
    import jax.numpy as jnp

    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def balanced_experts_transposed(rows, gate, up, down):
    """SwiGLU experts on perfectly balanced rows, weights [E, out, in] computed as W x^T.

    rows [E, R, D] (R = T*k/E rows per expert); gate, up [E, F, D]; down [E, D, F]; returns [E, D, R].
    XLA's CPU dot is much faster this way round than x W when each expert has few rows.
    """
    import jax

    hidden = jax.nn.silu(bf16_product("efd,erd->efr", gate, rows)) * bf16_product("efd,erd->efr", up, rows)
    return bf16_product("edf,efr->edr", down, hidden)
