"""Tiny OLMoE and Qwen3-MoE checkpoints written by transformers (our numerical reference), for tests.

torch and transformers are imported inside the functions: a test module that uses these calls
pytest.importorskip("torch") / ("transformers") first, so it skips cleanly without them."""
from __future__ import annotations

import numpy as np
import pytest


def require_reference():
    """Skip the calling test when torch or transformers (the test extras) is not installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


def tiny_hf_config(**overrides):
    require_reference()
    from transformers import OlmoeConfig

    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, norm_topk_prob=False,
                  pad_token_id=1, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    fields.update(overrides)
    return OlmoeConfig(**fields)


def make_hf_model(seed: int = 0, **overrides):
    """A random OlmoeForCausalLM in eval mode with non-trivial norm weights."""
    require_reference()
    import torch
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    model = OlmoeForCausalLM(tiny_hf_config(**overrides)).eval()
    _randomize(model)
    return model


def save_hf_model(path, seed: int = 0, max_shard_size=None, **overrides):
    model = make_hf_model(seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def hf_outputs(model, tokens: np.ndarray, mask: np.ndarray | None = None):
    """(logits [B, S, V], router_logits [B, S, L_moe, E]) as float64 numpy (one router per MoE layer)."""
    require_reference()
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long),
                    output_router_logits=True)
    b, s = tokens.shape
    router = torch.stack([r.reshape(b, s, -1) for r in out.router_logits], dim=2)
    return out.logits.double().numpy(), router.double().numpy()


# ----------------------------------------------------------------------------------------
# Qwen3-MoE
# ----------------------------------------------------------------------------------------
def tiny_qwen3_moe_config(**overrides):
    """A tiny Qwen3MoeConfig: 3 layers, GQA (4 heads over 2 kv heads), head_dim 16 != hidden / heads."""
    require_reference()
    from transformers import Qwen3MoeConfig

    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-6, norm_topk_prob=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                  pad_token_id=1, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
    fields.update(overrides)
    return Qwen3MoeConfig(**fields)


def make_qwen3_moe_model(seed: int = 0, **overrides):
    """A random Qwen3MoeForCausalLM in eval mode with non-trivial norm weights (as make_hf_model)."""
    require_reference()
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(**overrides)).eval()
    _randomize(model)
    return model


def _randomize(model):
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() >= 2:  # larger init than 0.02 so routing and logits are far from uniform
                p.copy_(0.2 * torch.randn_like(p))


def save_qwen3_moe_model(path, seed: int = 0, **overrides):
    model = make_qwen3_moe_model(seed, **overrides)
    model.save_pretrained(str(path))
    return model


def padded_batch(rng, vocab=96, batch=3, seq=10):
    """(tokens [batch, seq], mask [batch, seq]) with right padding on rows 1 (from 7) and 2 (from 4)."""
    tokens = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int32)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return tokens, mask
