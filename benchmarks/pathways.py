"""Routing extraction throughput: moe_grok (jitted JAX) vs HF transformers, same weights, one run.

  python benchmarks/pathways.py            # OLMoE-shaped: hidden 512, 8 layers, 64 experts top-8
  python benchmarks/pathways.py --quick    # a smaller shape, for a smoke test
  python benchmarks/pathways.py --batch=8 --seq=256 --repeats=5   # the defaults

Prints tokens/second of both, their ratio, the machine's measured fp32 matmul FLOP/s
(a 2048^3 jnp.matmul, same process), and the fraction of it our extraction reaches, counting
active FLOPs per token (k of E experts). Both sides compute routing without the LM head.
moe_grok runs as `load_hf` builds it (expert_layout "per_layer", this backend's default
dispatch), and in the same rounds with the chunked dispatch (moe_impl "chunked") and with the
experts in the "stacked" layout of the layer scan (its default dispatch). All are timed in interleaved rounds (HF, ours,
..., matmul, HF, ...), so a slow patch of a shared machine hits all of them alike; the table is
printed twice, from every timing's median round and from its fastest round.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags

from timing import interleaved_times

_QUICK = flags.DEFINE_bool("quick", False, "A smaller shape (hidden 128, 2 layers, vocab 1024), for a smoke test.")
_BATCH = flags.DEFINE_integer("batch", 8, "Samples per forward.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")


def make_matmul(n: int):
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    return lambda: mm(a, a).block_until_ready()


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import OlmoeConfig, OlmoeModel

    from moe_grok.extraction.routing import make_extractor
    from moe_grok.model.dispatch import resolve_moe_impl
    from moe_grok.model.hf import load_hf

    batch, seq, repeats = _BATCH.value, _SEQ.value, _REPEATS.value

    shape = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                 num_experts=64, num_experts_per_tok=8, intermediate_size=256, vocab_size=50304)
    if _QUICK.value:
        shape.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     vocab_size=1024)
    hf_config = OlmoeConfig(**shape, max_position_embeddings=4096, pad_token_id=1, eos_token_id=None,
                            bos_token_id=None)
    torch.manual_seed(0)
    hf_model = OlmoeModel(hf_config).eval()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as ckpt:
        # OlmoeModel has no lm_head; save as the causal LM (with a random head) for load_hf.
        from transformers import OlmoeForCausalLM

        lm = OlmoeForCausalLM(hf_config)
        lm.model = hf_model
        lm.save_pretrained(ckpt)
        model_config, params = load_hf(ckpt)
        stacked_config, stacked_params = load_hf(ckpt, expert_layout="stacked")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], (batch, seq))
    mask = np.ones_like(tokens)
    n_tokens = tokens.size

    def run_hf():
        with torch.no_grad():
            out = hf_model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                           output_router_logits=True)
        return out.router_logits

    jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

    def runner(config, weights):
        extractor = make_extractor(config, with_loss=False)
        return lambda: jax.block_until_ready(extractor(weights, jt, jm, jt, jm))

    variants = {"ours": runner(model_config, params),
                "chunked": runner(model_config.replace(moe_impl="chunked"), params),
                "stacked": runner(stacked_config, stacked_params)}
    # Same routing on every side (a correctness guard for the timing).
    hf_probs = torch.stack([torch.softmax(r.float(), -1).reshape(batch, seq, -1) for r in run_hf()], 2)
    for run in variants.values():
        np.testing.assert_allclose(np.asarray(run().mean_weights), hf_probs.mean(1).numpy(), atol=1e-4)

    matmul_n = 2048
    run_matmul = make_matmul(matmul_n)
    for warm in (run_hf, *variants.values(), run_matmul):
        warm()
    times = interleaved_times({"hf": run_hf, **variants, "matmul": run_matmul}, repeats)
    flops = model_config.active_flops_per_token(seq) * n_tokens
    print(f"config: hidden {model_config.hidden_size}, {model_config.num_layers} layers, "
          f"{model_config.num_experts} experts top-{model_config.num_experts_per_tok}, "
          f"expert intermediate {model_config.expert_intermediate_size}; "
          f"batch {batch} x {seq} tokens; backend {jax.default_backend()}, {os.cpu_count()} cores; "
          f"expert dispatch {resolve_moe_impl(model_config.moe_impl, model_config.expert_layout)}")
    print(f"active FLOPs/token: {model_config.active_flops_per_token(seq) / 1e6:.1f} M; fp32 matmul peak = "
          f"{matmul_n}^3 jnp.matmul in the same rounds; {repeats} interleaved rounds")
    for label, stat in (("median round", np.median), ("fastest round", np.min)):
        t_hf, t_ours, peak = stat(times["hf"]), stat(times["ours"]), 2 * matmul_n**3 / stat(times["matmul"])
        print(f"\n{label} (matmul peak {peak / 1e9:.0f} GFLOP/s)")
        print(f"{'':<52}{'tokens/s':>10}{'GFLOP/s':>10}{'% matmul peak':>15}{'vs HF':>8}")
        for name, key in (("HF OlmoeModel (router logits)", "hf"),
                          ("moe_grok extraction (jit), as load_hf builds it", "ours"),
                          ("  the same with moe_impl chunked", "chunked"),
                          ("  the same with expert_layout stacked", "stacked")):
            t = stat(times[key])
            print(f"{name:<52}{n_tokens / t:>10,.0f}{flops / t / 1e9:>10.1f}{100 * flops / t / peak:>14.0f}%"
                  f"{t_hf / t:>7.2f}x")
        print(f"{'speedup vs HF':<52}{t_hf / t_ours:>9.2f}x")


if __name__ == "__main__":
    app.run(main)
