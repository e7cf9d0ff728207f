"""The fastest any XLA formulation of OLMoE-1B-7B's forward can be on this CPU, against HF's forward.

  python benchmarks/forward_bound.py                                   # the parts, XLA vs torch
  python benchmarks/forward_bound.py \
      --checkpoint=/tmp/olmoe_full_size/checkpoints/olmoe-1b-7b-random-step1000   # + HF's whole forward

A lower bound on moe_grok's extraction time, from the matrix products alone, each given its best
case: per layer the four attention projections and the router as XLA bfloat16 matmuls accumulating
in float32 (the formulation moe_grok's layers use, the fastest XLA one measured), the experts as one
batched product with perfectly balanced routing (T*k/E rows each, no gathers, no padding, weights
[E, out, in] computed as W x^T: the fastest expert formulation `benchmarks/expert_matmul.py`
measured), and the LM head once. Nothing else is counted: not the attention scores, softmax, norms,
rotary embeddings, routing's top-k and gathers, routing imbalance or the loss. The same parts are
timed in torch (HF's building blocks: `nn.functional.linear`, HF's `OlmoeExperts` on random top-8
routing). With --checkpoint, HF's whole `OlmoeForCausalLM` forward (logits and router logits, the
same batch) is timed in the same process, after the parts, and the bound's ratio printed against it:
if HF's whole forward is faster than XLA's matrix products alone, no XLA formulation reaches HF.
Timed in interleaved rounds (`timing.interleaved_times`), fastest of --repeats, 4 x 128 tokens by
default (the full-size benchmark's batch).
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from olmoe_layer import (
    EXPERTS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    TOP_K,
    VOCAB,
    balanced_experts_transposed,
    hf_experts_layer,
)
from timing import interleaved_times

_TOKENS = flags.DEFINE_integer("tokens", 512, "Tokens through the forward (batch x sequence).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An OLMoE-1B-7B HF checkpoint: also time HF's whole forward.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import torch

    t, k, e, d, f, n_layers, v = _TOKENS.value, TOP_K, EXPERTS, HIDDEN, INTERMEDIATE, LAYERS, VOCAB
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    bf16 = lambda shape, scale=0.02: jnp.asarray(rng.normal(size=shape) * scale, jnp.bfloat16)
    x = bf16((t, d), 1.0)
    projections = [bf16((d, d)) for _ in range(4)]  # q, k, v, o: [out, in] as HF stores them
    router = bf16((e, d))
    lm_head = bf16((v, d))

    def xla_matmul(a, w_out_in):  # moe_grok's layers: bfloat16 in, float32 accumulation, bfloat16 out
        return jax.lax.dot_general(a, w_out_in, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    layer_parts = jax.jit(lambda a, q, kk, vv, o, r: (xla_matmul(a, q), xla_matmul(a, kk), xla_matmul(a, vv),
                                                       xla_matmul(xla_matmul(a, q), o), xla_matmul(a, r)))
    head = jax.jit(xla_matmul)

    rows = bf16((e, t * k // e, d), 1.0)
    w_gate, w_up, w_down = bf16((e, f, d)), bf16((e, f, d)), bf16((e, d, f))
    experts = jax.jit(balanced_experts_transposed)

    # torch: the same parts as HF computes them.
    to_torch = lambda a: torch.as_tensor(np.asarray(a, np.float32)).bfloat16()
    xt, proj_t, router_t, head_t = to_torch(x), [to_torch(p) for p in projections], to_torch(router), to_torch(lm_head)
    hf_experts = hf_experts_layer()
    top_idx = torch.as_tensor(np.argsort(-rng.normal(size=(t, e)), axis=1)[:, :k])
    top_w = torch.full((t, k), 1.0 / k).bfloat16()
    linear = torch.nn.functional.linear

    def torch_layer_parts():
        with torch.no_grad():
            qkv = [linear(xt, p) for p in proj_t[:3]]
            return qkv + [linear(qkv[0], proj_t[3]), linear(xt, router_t)]

    def torch_experts():
        with torch.no_grad():
            return hf_experts(xt, top_idx, top_w)

    def torch_head():
        with torch.no_grad():
            return linear(xt, head_t)

    fns = {"xla_layer": lambda: jax.block_until_ready(layer_parts(x, *projections, router)),
           "xla_experts": lambda: experts(rows, w_gate, w_up, w_down).block_until_ready(),
           "xla_head": lambda: head(x, lm_head).block_until_ready(),
           "torch_layer": torch_layer_parts, "torch_experts": torch_experts, "torch_head": torch_head}
    for fn in fns.values():
        fn()  # compile / warm up
    best = {name: float(np.min(times)) for name, times in interleaved_times(fns, _REPEATS.value).items()}
    bound = {lib: n_layers * (best[f"{lib}_layer"] + best[f"{lib}_experts"]) + best[f"{lib}_head"]
             for lib in ("xla", "torch")}

    print(f"OLMoE-1B-7B forward parts: {t} tokens, {n_layers} layers, bfloat16; {os.cpu_count()} cores; "
          f"fastest of {_REPEATS.value} interleaved rounds (ms)")
    print(f"{'':<64}{'XLA':>9}{'torch':>9}{'XLA/torch':>11}")
    labels = (("one layer: q, k, v, o projections + router", "layer"),
              ("one layer's experts (XLA: balanced, W x^T; torch: HF OlmoeExperts)", "experts"),
              ("LM head", "head"))
    for label, key in labels:
        print(f"{label:<64}{best['xla_' + key] * 1e3:>9.1f}{best['torch_' + key] * 1e3:>9.1f}"
              f"{best['xla_' + key] / best['torch_' + key]:>10.2f}x")
    print(f"{'matrix products of the whole forward (16 layers + LM head)':<64}{bound['xla'] * 1e3:>9.1f}"
          f"{bound['torch'] * 1e3:>9.1f}{bound['xla'] / bound['torch']:>10.2f}x")

    if _CHECKPOINT.value:
        from transformers import OlmoeForCausalLM
        model = OlmoeForCausalLM.from_pretrained(_CHECKPOINT.value, dtype=torch.bfloat16).eval()
        tokens = torch.as_tensor(rng.integers(0, v, size=(t // 128, 128)))

        def hf_forward():
            with torch.no_grad():
                return model(input_ids=tokens, output_router_logits=True).logits

        hf_forward()
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            hf_forward()
            times.append(time.perf_counter() - start)
            time.sleep(1.0)
        hf_s = float(np.min(times))
        print(f"HF OlmoeForCausalLM, whole forward (logits + router logits): {hf_s * 1e3:.1f} ms; "
              f"XLA's matrix products alone: {bound['xla'] * 1e3:.1f} ms -> at best "
              f"{hf_s / bound['xla']:.2f}x HF's tokens/s before any other work")


if __name__ == "__main__":
    app.run(main)
