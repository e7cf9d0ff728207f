"""Tiny OLMoE checkpoints written by transformers (our numerical reference), for tests."""
from __future__ import annotations

import numpy as np


def tiny_hf_config(**overrides):
    from transformers import OlmoeConfig

    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
                  pad_token_id=1, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    fields.update(overrides)
    return OlmoeConfig(**fields)


def make_hf_model(seed: int = 0, **overrides):
    """A random OlmoeForCausalLM in eval mode with non-trivial norm weights."""
    import torch
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:  # larger init than 0.02 so routing and logits are far from uniform
                p.copy_(0.2 * torch.randn_like(p))
    return model


def save_hf_model(path, seed: int = 0, max_shard_size=None, **overrides):
    model = make_hf_model(seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def hf_outputs(model, tokens: np.ndarray, mask: np.ndarray | None = None):
    """(logits [B, S, V], router_logits [B, S, L, E]) as float64 numpy."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
                    output_router_logits=True)
    b, s = tokens.shape
    router = torch.stack([r.reshape(b, s, -1) for r in out.router_logits], dim=2)
    return out.logits.double().numpy(), router.double().numpy()
