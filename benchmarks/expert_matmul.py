"""One MoE layer's experts at OLMoE-1B-7B size, bfloat16, on this machine: HF vs moe_grok vs XLA formulations.

  python benchmarks/expert_matmul.py                 # 512 tokens (the full-size benchmark's 4 x 128 batch)
  python benchmarks/expert_matmul.py --tokens=4096   # 32 x 128, extract_dataset's default batch
  python benchmarks/expert_matmul.py --skew=1        # unbalanced routing (per-expert logit offsets)

The experts are about 70% of OLMoE-1B-7B's active FLOPs, so their speed bounds the whole
forward's. Timed in interleaved rounds (with the same routing on every side):
- HF: transformers' `OlmoeExperts` as `OlmoeModel` builds it (its default experts implementation,
  printed), on the tokens' top-8 of 64 experts;
- moe_grok: `experts_chunked` on the "stacked" expert layout ([L, E, in, out], a one-layer stack
  here), the layout a layer scan reads;
- moe_grok, expert_layout "per_layer" (one [E, out, in] array per layer, as `load_hf` builds them):
  `experts_chunked` and `experts_batched` (one [E, C, D] block, C the busiest expert's rows
  rounded up to a capacity class; the chunk loops when C would pass 2x the balanced share);
- XLA, balanced: the same FLOPs as one batched einsum over experts with exactly T*k/E rows each
  (perfectly balanced routing, no gathers, no padding), in moe_grok's weight layout;
- the same balanced einsum with the weights stored [E, out, in] (HF's layout: contraction dim minor)
  and computed as W x^T: XLA's CPU dot is much faster this way round for few rows per expert;
- the same with those weights sliced from a 4-layer stack [L, E, out, in], as a layer scan reads
  them: XLA's CPU backend copies a slice before the dot;
- the same FLOPs as three plain [T*k, D] x [D, F] matmuls, in XLA and in torch: each library's
  bfloat16 matmul throughput without the expert split;
- reading every expert weight of the layer once (torch sums them): the memory-bandwidth floor
  that any implementation pays per layer when, as at small batches, each expert sees few rows.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from olmoe_layer import (
    EXPERTS,
    HIDDEN,
    INTERMEDIATE,
    TOP_K,
    balanced_experts_transposed,
    bf16_product,
    hf_experts_layer,
)
from timing import interleaved_times

_TOKENS = flags.DEFINE_integer("tokens", 512, "Tokens through the layer.")
_SKEW = flags.DEFINE_float("skew", 0.0, "Scale of per-expert offsets added to the router logits (0: balanced "
                           "on average; the balanced rows below stay balanced).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
flags.register_validator("tokens", lambda t: t > 0 and t * TOP_K % EXPERTS == 0,
                         f"--tokens must be positive with tokens * {TOP_K} a multiple of {EXPERTS} (balanced rows)")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import torch

    from moe_grok.model.dispatch import experts_batched, experts_chunked

    t, k, e, d, f = _TOKENS.value, TOP_K, EXPERTS, HIDDEN, INTERMEDIATE
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    top_idx = np.argsort(-(rng.normal(size=(t, e)) + _SKEW.value * rng.normal(size=e)), axis=1)[:, :k]
    busiest = np.bincount(top_idx.ravel(), minlength=e).max() / (t * k / e)
    x = (rng.normal(size=(t, d)) * 0.1).astype(np.float32)
    top_w = np.full((t, k), 1.0 / k, np.float32)

    hf_experts = hf_experts_layer()
    implementation = hf_experts.config._experts_implementation
    xt, it, wt = torch.as_tensor(x).bfloat16(), torch.as_tensor(top_idx), torch.as_tensor(top_w).bfloat16()

    def run_hf():
        with torch.no_grad():
            return hf_experts(xt, it, wt)

    # The same weights on the JAX side: HF's gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
    gate_up = hf_experts.gate_up_proj.detach().float().numpy()
    w_gate = jnp.asarray(gate_up[:, :f].transpose(0, 2, 1), jnp.bfloat16)[None]  # [1, E, D, F]
    w_up = jnp.asarray(gate_up[:, f:].transpose(0, 2, 1), jnp.bfloat16)[None]
    w_down = jnp.asarray(hf_experts.down_proj.detach().float().numpy().transpose(0, 2, 1), jnp.bfloat16)[None]
    xj, ij, wj = jnp.asarray(x, jnp.bfloat16), jnp.asarray(top_idx, jnp.int32), jnp.asarray(top_w, jnp.bfloat16)
    chunked = jax.jit(lambda *a: experts_chunked(*a, layer=jnp.int32(0)))
    run_ours = lambda: chunked(xj, ij, wj, w_gate, w_up, w_down).block_until_ready()
    np.testing.assert_allclose(np.asarray(run_ours(), np.float32), run_hf().float().numpy(), atol=2e-2)
    # expert_layout "per_layer": HF's orientation, one layer's arrays (no stack, no layer index).
    per_layer = tuple(jnp.asarray(np.ascontiguousarray(np.swapaxes(np.asarray(w[0], np.float32), -1, -2)),
                                  jnp.bfloat16) for w in (w_gate, w_up, w_down))
    chunked_out_in = jax.jit(lambda *a: experts_chunked(*a, out_in=True))
    batched_out_in = jax.jit(lambda *a: experts_batched(*a, out_in=True))
    run_chunked_per_layer = lambda: chunked_out_in(xj, ij, wj, *per_layer).block_until_ready()
    run_batched_per_layer = lambda: batched_out_in(xj, ij, wj, *per_layer).block_until_ready()
    for run in (run_chunked_per_layer, run_batched_per_layer):
        np.testing.assert_allclose(np.asarray(run(), np.float32), run_hf().float().numpy(), atol=2e-2)

    def swiglu(rows, gate, up, down, spec):
        return bf16_product(spec, jax.nn.silu(bf16_product(spec, rows, gate)) * bf16_product(spec, rows, up), down)

    balanced_rows = jnp.asarray(rng.normal(size=(e, t * k // e, d)) * 0.1, jnp.bfloat16)
    balanced = jax.jit(lambda r, g, u, dn: swiglu(r, g[0], u[0], dn[0], "erd,edf->erf"))
    run_balanced = lambda: balanced(balanced_rows, w_gate, w_up, w_down).block_until_ready()
    # HF's layout: gate/up [E, F, D], down [E, D, F]; products W x^T ([E, F, rows], then [E, D, rows]).
    w_gate_t, w_up_t = (jnp.asarray(gate_up[:, half].astype(np.float32), jnp.bfloat16) for half in (slice(None, f),
                                                                                                  slice(f, None)))
    w_down_t = jnp.asarray(hf_experts.down_proj.detach().float().numpy(), jnp.bfloat16)

    transposed = jax.jit(balanced_experts_transposed)
    run_transposed = lambda: transposed(balanced_rows, w_gate_t, w_up_t, w_down_t).block_until_ready()
    np.testing.assert_allclose(np.asarray(run_transposed(), np.float32).transpose(0, 2, 1),
                               np.asarray(run_balanced(), np.float32), atol=2e-2)
    # The same, each weight sliced from a 4-layer [L, E, out, in] stack (as a layer scan reads it).
    stacks = tuple(jnp.stack([w] * 4) for w in (w_gate_t, w_up_t, w_down_t))
    from_stack = jax.jit(lambda r, layer, g, u, dn: balanced_experts_transposed(r, g[layer], u[layer], dn[layer]))
    run_from_stack = lambda: from_stack(balanced_rows, jnp.int32(2), *stacks).block_until_ready()
    flat_rows = balanced_rows.reshape(t * k, d)
    plain = jax.jit(lambda r, g, u, dn: swiglu(r, g[0, 0], u[0, 0], dn[0, 0], "rd,df->rf"))
    run_plain_xla = lambda: plain(flat_rows, w_gate, w_up, w_down).block_until_ready()
    rt = torch.as_tensor(np.asarray(flat_rows, np.float32)).bfloat16()
    gt, ut = (torch.as_tensor(np.asarray(w[0, 0], np.float32)).bfloat16() for w in (w_gate, w_up))
    dt = torch.as_tensor(np.asarray(w_down[0, 0], np.float32)).bfloat16()

    def run_plain_torch():
        with torch.no_grad():
            return (torch.nn.functional.silu(rt @ gt) * (rt @ ut)) @ dt

    def run_read_weights():
        return hf_experts.gate_up_proj.sum() + hf_experts.down_proj.sum()

    fns = {"hf": run_hf, "ours": run_ours, "chunked_per_layer": run_chunked_per_layer,
           "batched_per_layer": run_batched_per_layer, "balanced": run_balanced, "transposed": run_transposed,
           "from_stack": run_from_stack,
           "plain_xla": run_plain_xla, "plain_torch": run_plain_torch, "read": run_read_weights}
    for fn in fns.values():
        fn()  # compile / warm up
    best = {name: float(np.min(t)) for name, t in interleaved_times(fns, _REPEATS.value).items()}
    flops = 2 * t * k * 3 * d * f
    print(f"one MoE layer's experts: {t} tokens, top-{k} of {e}, hidden {d}, intermediate {f}, bfloat16; "
          f"{os.cpu_count()} cores; fastest of {_REPEATS.value} interleaved rounds; {flops / 1e9:.1f} GFLOP; "
          f"busiest expert {busiest:.2f}x the balanced share")
    rows = (("HF OlmoeExperts (experts_implementation=" + str(implementation) + ")", "hf"),
            ("moe_grok experts_chunked, stacked [L, E, in, out]", "ours"),
            ("moe_grok experts_chunked, per-layer [E, out, in]", "chunked_per_layer"),
            ("moe_grok experts_batched, per-layer [E, out, in]", "batched_per_layer"),
            ("XLA, balanced batched einsum", "balanced"),
            ("XLA, balanced, weights [E, out, in], W x^T", "transposed"),
            ("  the same, weights sliced from an [L, E, out, in] stack", "from_stack"),
            ("XLA: the FLOPs as 3 plain matmuls", "plain_xla"),
            ("torch: the FLOPs as 3 plain matmuls", "plain_torch"))
    print(f"{'':<58}{'ms':>8}{'GFLOP/s':>10}{'vs HF':>8}")
    for label, key in rows:
        print(f"{label:<58}{best[key] * 1e3:>8.1f}{flops / best[key] / 1e9:>10.0f}{best['hf'] / best[key]:>7.2f}x")
    weight_bytes = 2 * 3 * e * d * f
    print(f"{'torch: read the ' + format(weight_bytes / 2**20, ',.0f') + ' MiB of expert weights once':<58}"
          f"{best['read'] * 1e3:>8.1f}{'':>10}{best['hf'] / best['read']:>7.2f}x"
          f"   ({weight_bytes / best['read'] / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    app.run(main)
