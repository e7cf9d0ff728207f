"""Mixture-of-Experts decoder in Flax, numerically matching HF's OlmoeForCausalLM and Qwen3MoeForCausalLM.

The modules read like the math; expert dispatch kernels live in `dispatch`, the public
parameter tree and `forward` in `params`. The families differ only in switches read from
MoEConfig: qk_norm ("full": OLMoE's RMSNorm over the whole q/k projection; "per_head":
Qwen3-MoE's over each head), clip_qkv, norm_topk_prob, and dense_layers (layers with a dense
SwiGLU MLP instead of the MoE block, see MixedMLPStacks).

Shapes: B = batch, S = sequence, D = hidden, H = heads, K = kv heads, Dh = head dim,
E = experts, k = experts per token, F = expert intermediate, L = layers, V = vocab, T = B*S tokens.

Parameters are a plain pytree; layers are stacked on a leading [L] axis (nn.scan; the expert
weights [L, E, ...] are declared outside the scan, see ExpertStacks), every parameter carries
logical axis names (see LOGICAL_RULES) for mesh sharding. With dense layers the MoE weights are
stacked over the MoE layers only ([L_moe, ...]) and the dense MLPs over the dense ones.

MoEConfig.expert_layout "per_layer" runs the same layers unrolled (a Python loop, modules
layers_<i>) with one expert array per MoE layer stored [E, out, in] (PerLayerExperts): no layer's
experts are sliced from a stack, which XLA's CPU backend would copy before every dot. Its
parameters are built in the stacked form and split (`model.params`), so it is applied, never
initialized, in this form.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_grok.config import MoEConfig
from moe_grok.model import dispatch

# Logical axis -> mesh axis (moe_grok.sharding's "data" / "expert" axes).
LOGICAL_RULES = (
    ("batch", "data"),
    ("expert", "expert"),
    ("router_logit", None),  # the router's expert axis: the router is small, every device routes its own tokens
    ("layers", None),
    ("vocab", None),
    ("embed", None),
    ("q_width", None),
    ("kv_width", None),
    ("mlp", None),
    ("norm", None),
)


class ModelOutput(NamedTuple):
    logits: jax.Array | None  # [B, S, V] (None when the LM head is skipped)
    router_logits: jax.Array  # [B, S, L_moe, E] float32: the MoE (routing) layers only, in layer order
    hidden: jax.Array  # [B, S, D] after the final norm


def _dot_general_float32_accumulate(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Flax Dense's dot_general accumulating in float32, rounded to the input dtype: for bfloat16
    weights XLA's CPU backend then runs its bfloat16 dot, about 2x its plain bfloat16 one
    (which rounds inside the product); float32 is unchanged."""
    del preferred_element_type
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=jnp.float32).astype(lhs.dtype)


def _init(std: float, *names: str):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then scaled (HF OlmoeRMSNorm order)."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


def rotary_embedding(x, positions, theta: float):
    """NeoX-style RoPE (rotate-half). x: [B, S, heads, Dh]; positions: [B, S] int."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


ELEMENTWISE_ATTENTION_MAX_SEQ = 8  # "auto" attention: elementwise products up to this many tokens


def resolve_attention_impl(impl: str, seq_len: int) -> str:
    """'auto' -> 'elementwise' on CPU for sequences of at most ELEMENTWISE_ATTENTION_MAX_SEQ tokens
    (the toy tasks' 4), 'matmul' otherwise. XLA's CPU backend runs the [S, Dh] x [Dh, S] products of
    a short sequence as thousands of tiny matmuls, and their gradients slower still; as broadcast
    products summed over Dh they fuse into a few loops (a toy training step 1.2x faster,
    docs/benchmarks.md). The elementwise form holds a [B, S, S, H, Dh] product, so long sequences
    keep the matmuls; on GPU/TPU it was not measured."""
    if impl != "auto":
        return impl
    short = seq_len <= ELEMENTWISE_ATTENTION_MAX_SEQ
    return "elementwise" if short and jax.default_backend() == "cpu" else "matmul"


def _attention_bias(mask):
    """Additive float32 bias [B, S_q, S_k]: 0 where a query may attend (causal, key not padding),
    float32 min elsewhere (as HF). mask: [B, S]."""
    s = mask.shape[1]
    allowed = jnp.tril(jnp.ones((s, s), dtype=bool))[None] & mask[:, None, :].astype(bool)
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def _repeat_kv(k, v, num_heads: int):
    """GQA: each kv head repeated for its group of query heads. [B, S, K, Dh] -> [B, S, H, Dh]."""
    return tuple(jnp.repeat(t, num_heads // t.shape[2], axis=2) for t in (k, v))


def _matmul_attention(q, k, v, bias, dtype):
    """Softmax attention as batched matmuls, heads first. q: [B, S, H, Dh]; k, v: [B, S, K, Dh];
    bias: [B, S_q, S_k] float32 -> [B, S, H, Dh] in dtype."""
    k, v = _repeat_kv(k, v, q.shape[2])
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, S, Dh]
    scores = (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * q.shape[-1] ** -0.5  # [B, H, S_q, S_k]
    scores = scores + bias[:, None]
    # Softmax with the normalization applied after the value matmul: one pass fewer over the
    # [B, H, S, S] scores, mathematically the same (float32 throughout).
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.matmul(unnormalized.astype(dtype), v, preferred_element_type=jnp.float32)
    out = (out / jnp.sum(unnormalized, axis=-1, keepdims=True)).astype(dtype)
    return jnp.swapaxes(out, 1, 2)


def _elementwise_attention(q, k, v, bias, dtype):
    """The same softmax attention as broadcast products summed over Dh (scores) and over S_k
    (values), in the [B, S, H, Dh] layout, so no transposes either. Products are summed in float32
    and rounded where the matmul form rounds (scores to dtype, as its dtype matmul returns them;
    softmax weights to dtype before the values). Shapes as `_matmul_attention`. In bfloat16 the
    two forms agree within a quarter rounding step when run op by op; compiled (jit), XLA fuses the
    two forms differently and they differed by about half a step in a test on CPU (2026-12-07)."""
    k, v = _repeat_kv(k, v, q.shape[2])
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.sum(q32[:, :, None] * k32[:, None], axis=-1).astype(dtype)  # [B, S_q, S_k, H]
    scores = scores.astype(jnp.float32) * q.shape[-1] ** -0.5
    scores = scores + bias[..., None]
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=2, keepdims=True))
    weights = unnormalized.astype(dtype).astype(jnp.float32)
    out = jnp.sum(weights[..., None] * v.astype(jnp.float32)[:, None], axis=2)  # [B, S_q, H, Dh]
    return (out / jnp.sum(unnormalized, axis=2)[..., None]).astype(dtype)


class Attention(nn.Module):
    """Causal self-attention with q/k RMSNorm before RoPE, optional GQA and clip_qkv.

    q/k norm per model_config.qk_norm: "full" normalizes the whole [H*Dh] / [K*Dh] projection
    (OLMoE; scale [H*Dh]), "per_head" each head's [Dh] values (Qwen3-MoE; scale [Dh])."""

    model_config: MoEConfig

    @nn.compact
    def __call__(self, x, positions, mask):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        b, s, _ = x.shape
        h, kv, hd = model_config.num_heads, model_config.num_kv_heads, model_config.head_dim
        dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=dtype, param_dtype=dtype,
                                  dot_general=_dot_general_float32_accumulate)
        q = dense(h * hd, kernel_init=_init(model_config.init_std, "embed", "q_width"), name="q_proj")(x)
        k = dense(kv * hd, kernel_init=_init(model_config.init_std, "embed", "kv_width"), name="k_proj")(x)
        v = dense(kv * hd, kernel_init=_init(model_config.init_std, "embed", "kv_width"), name="v_proj")(x)
        if model_config.qk_norm == "per_head":
            q, k = q.reshape(b, s, h, hd), k.reshape(b, s, kv, hd)
        q = RMSNorm(model_config.rms_norm_eps, dtype, name="q_norm")(q)
        k = RMSNorm(model_config.rms_norm_eps, dtype, name="k_norm")(k)
        if model_config.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -model_config.clip_qkv, model_config.clip_qkv) for t in (q, k, v))
        q = rotary_embedding(q.reshape(b, s, h, hd), positions, model_config.rope_theta)
        k = rotary_embedding(k.reshape(b, s, kv, hd), positions, model_config.rope_theta)
        v = v.reshape(b, s, kv, hd)

        bias = _attention_bias(mask)  # [B, S_q, S_k]
        if resolve_attention_impl(model_config.attention_impl, s) == "elementwise":
            out = _elementwise_attention(q, k, v, bias, dtype)
        else:
            out = _matmul_attention(q, k, v, bias, dtype)
        o_proj = dense(model_config.hidden_size, kernel_init=_init(model_config.init_std, "q_width", "embed"),
                       name="o_proj")
        return o_proj(out.reshape(b, s, h * hd))


def select_experts(probs, model_config: MoEConfig):
    """Top-k of router probabilities [..., E] -> (weights [..., k], expert ids [..., k]),
    renormalized to sum to 1 when model_config.norm_topk_prob."""
    top_w, top_idx = jax.lax.top_k(probs, model_config.num_experts_per_tok)
    if model_config.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w, top_idx


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # ExpertStacks' params, public path layers/moe/<name>
DENSE_MLP_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # dense layers' SwiGLU, public path layers/mlp/<name>


class ExpertStacks(nn.Module):
    """The SwiGLU expert weights of all MoE layers: gate/up [L_moe, E, D, F], down [L_moe, E, F, D].

    Declared once outside the layer scan, so each layer's dispatch slices its experts from the
    stacks itself (the CPU path one expert at a time) instead of the scan copying all of a
    layer's experts first. `forward`/`init_params` show them at layers/moe/ like HF's nesting.
    """

    model_config: MoEConfig

    @nn.compact
    def __call__(self):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        lead = (model_config.num_moe_layers, model_config.num_experts)
        d, f = model_config.hidden_size, model_config.expert_intermediate_size
        axes_and_shapes = ((("embed", "mlp"), (d, f)), (("embed", "mlp"), (d, f)), (("mlp", "embed"), (f, d)))
        return tuple(self.param(name, _init(model_config.init_std, "layers", "expert", *axes), (*lead, *shape), dtype)
                     for name, (axes, shape) in zip(EXPERT_WEIGHTS, axes_and_shapes, strict=True))


class LayerExperts(nn.Module):
    """One MoE layer's SwiGLU experts stored [E, out, in] as HF stores them: gate/up [E, F, D],
    down [E, D, F] (MoEConfig.expert_layout "per_layer")."""

    model_config: MoEConfig

    @nn.compact
    def __call__(self):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        e, d, f = model_config.num_experts, model_config.hidden_size, model_config.expert_intermediate_size
        axes_and_shapes = ((("mlp", "embed"), (f, d)), (("mlp", "embed"), (f, d)), (("embed", "mlp"), (d, f)))
        return tuple(self.param(name, _init(model_config.init_std, "expert", *axes), (e, *shape), dtype)
                     for name, (axes, shape) in zip(EXPERT_WEIGHTS, axes_and_shapes, strict=True))


class PerLayerExperts(nn.Module):
    """Every MoE layer's LayerExperts, named by the layer's index among the MoE layers ("0", "1",
    ...): returns a tuple of L_moe (gate, up, down)."""

    model_config: MoEConfig

    @nn.compact
    def __call__(self):
        return tuple(LayerExperts(self.model_config, name=str(i))() for i in range(self.model_config.num_moe_layers))


class SparseMoE(nn.Module):
    """Router + SwiGLU experts. Returns (output [B, S, D], router_logits [B, S, E] float32).

    experts: ExpertStacks' (gate, up, down) of all layers and layer this layer's index (scalar),
    or this layer's LayerExperts and layer None.
    mesh: dispatch expert-parallel over it (`dispatch.dispatch_experts`); None = one device.
    """

    model_config: MoEConfig
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, x, experts, layer):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        d, e = x.shape[-1], model_config.num_experts
        router = self.param("router", _init(model_config.init_std, "embed", "router_logit"), (d, e), dtype)
        return sparse_moe(model_config, self.mesh, x, router, experts, layer)


def sparse_moe(model_config: MoEConfig, mesh, x, router, experts, layer):
    """The MoE block as a function: x [B, S, D], router [D, E], experts: ExpertStacks' stacks and
    layer the MoE layer's index into them, or ("per_layer") the layer's own arrays and layer None.
    Returns (output [B, S, D], router_logits [B, S, E] float32)."""
    b, s, d = x.shape
    tokens = x.reshape(b * s, d)
    router_logits = (tokens @ router).astype(jnp.float32)  # [T, E]
    impl = dispatch.resolve_moe_impl(model_config.moe_impl, model_config.expert_layout)
    kwargs = {"out_in": model_config.expert_layout == "per_layer"}
    if impl in ("chunked", "batched"):
        kwargs.update(max_chunk=model_config.expert_chunk_size, granule=model_config.expert_chunk_granule)
    if impl == "batched":
        kwargs["num_experts"] = model_config.num_experts
    select = functools.partial(select_experts, model_config=model_config)
    out = dispatch.dispatch_experts(tokens, jax.nn.softmax(router_logits, axis=-1), select, experts, layer, impl,
                                    mesh, **kwargs)
    return out.reshape(b, s, d), router_logits.reshape(b, s, router.shape[-1])


class MixedMLPStacks(nn.Module):
    """For models with dense layers: the routers of the MoE layers [L_moe, D, E] and the dense
    layers' SwiGLU MLPs gate/up [L_dense, D, Fd], down [L_dense, Fd, D], declared outside the
    layer scan like ExpertStacks (each layer picks its own by index). `params` shows them at
    layers/moe/router and layers/mlp/{gate,up,down}_proj."""

    model_config: MoEConfig

    @nn.compact
    def __call__(self):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        d, e, f = model_config.hidden_size, model_config.num_experts, model_config.dense_intermediate_size
        dense = len(model_config.dense_layers)
        router = self.param("router", _init(model_config.init_std, "layers", "embed", "router_logit"),
                            (model_config.num_moe_layers, d, e), dtype)
        axes_and_shapes = ((("embed", "mlp"), (d, f)), (("embed", "mlp"), (d, f)), (("mlp", "embed"), (f, d)))
        mlp = tuple(self.param(name, _init(model_config.init_std, "layers", *axes), (dense, *shape), dtype)
                    for name, (axes, shape) in zip(DENSE_MLP_WEIGHTS, axes_and_shapes, strict=True))
        return router, mlp


def _dense_mlp(x, gate, up, down):
    """SwiGLU down(silu(gate(x)) * up(x)) of x [B, S, D], as the expert matmuls (float32 accumulation)."""
    matmul = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
    hidden = jax.nn.silu(matmul(x, gate).astype(x.dtype)) * matmul(x, up).astype(x.dtype)
    return matmul(hidden, down).astype(x.dtype)


class DecoderLayer(nn.Module):
    """x + attn(input_norm(x)); then + moe(post_attention_norm(.)). Scanned over layers."""

    model_config: MoEConfig
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, x, positions, mask, experts, layer):
        model_config = self.model_config
        eps, dtype = model_config.rms_norm_eps, model_config.jnp_dtype
        x = x + Attention(model_config, name="attn")(RMSNorm(eps, dtype, name="input_norm")(x), positions, mask)
        moe_out, router_logits = SparseMoE(model_config, self.mesh, name="moe")(
            RMSNorm(eps, dtype, name="post_attention_norm")(x), experts, layer)
        return x + moe_out, router_logits


class MixedDecoderLayer(nn.Module):
    """DecoderLayer of a model with dense layers: x + attn(input_norm(x)); then + mlp(post_attention_norm(.)),
    mlp the MoE block or the dense MLP as this layer's flag says (jax.lax.cond: only one runs).

    mlp_weights: MixedMLPStacks' (router, dense MLP stacks); layer_switch: (is_moe, moe index,
    dense index) of this layer, traced in the layer scan; Python values when the layers are
    unrolled (then only this layer's branch is built, and experts are this layer's own arrays).
    Returns (x, router_logits [B, S, E], zeros on a dense layer)."""

    model_config: MoEConfig
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, x, positions, mask, experts, mlp_weights, layer_switch):
        model_config = self.model_config
        eps, dtype = model_config.rms_norm_eps, model_config.jnp_dtype
        is_moe, moe_index, dense_index = layer_switch
        routers, dense_mlps = mlp_weights
        x = x + Attention(model_config, name="attn")(RMSNorm(eps, dtype, name="input_norm")(x), positions, mask)
        h = RMSNorm(eps, dtype, name="post_attention_norm")(x)

        unrolled = isinstance(is_moe, bool)

        def moe_branch(h):
            return sparse_moe(model_config, self.mesh, h, routers[moe_index], experts, None if unrolled else moe_index)

        def dense_branch(h):
            out = _dense_mlp(h, *(w[dense_index] for w in dense_mlps))
            return out, jnp.zeros((*h.shape[:2], model_config.num_experts), jnp.float32)

        if unrolled:
            out, router_logits = (moe_branch if is_moe else dense_branch)(h)
        else:
            out, router_logits = jax.lax.cond(is_moe, moe_branch, dense_branch, h)
        return x + out, router_logits


class MoETransformer(nn.Module):
    """Decoder-only MoE LM. __call__(tokens [B, S], mask [B, S]) -> ModelOutput.

    mesh: the expert dispatch runs expert-parallel over it (tokens split over all its axes,
    experts over "expert"); None = one device (or whatever sharding jit propagates).
    """

    model_config: MoEConfig
    mesh: jax.sharding.Mesh | None = None

    @nn.compact
    def __call__(self, tokens, mask=None, positions=None, with_lm_head: bool = True):
        model_config, dtype = self.model_config, self.model_config.jnp_dtype
        b, s = tokens.shape
        if mask is None:
            mask = jnp.ones((b, s), jnp.int32)
        if positions is None:  # HF default: 0..S-1 for every row, whatever the padding
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        embed = nn.Embed(model_config.vocab_size, model_config.hidden_size, dtype=dtype, param_dtype=dtype,
                         embedding_init=_init(model_config.init_std, "vocab", "embed"), name="embed")
        x = embed(tokens)
        if model_config.expert_layout == "per_layer":
            x, router_logits = self._unrolled_layers(x, positions, mask)
        elif model_config.dense_layers:
            experts = ExpertStacks(model_config, name="experts")()
            x, router_logits = self._mixed_layers(x, positions, mask, experts)
        else:
            experts = ExpertStacks(model_config, name="experts")()
            # remat_layers: the backward pass keeps only each layer's input and recomputes the rest. On
            # XLA's CPU backend this also makes a toy training step cheaper: the scan no longer fills
            # [L, ...] buffers with every intermediate (docs/benchmarks.md).
            layer = nn.remat(DecoderLayer, prevent_cse=False) if model_config.remat_layers else DecoderLayer
            layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=model_config.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, router_logits = layers(model_config, self.mesh, name="layers")(
                x, positions, mask, experts, jnp.arange(model_config.num_layers))  # router_logits [L, B, S, E]
        x = RMSNorm(model_config.rms_norm_eps, dtype, name="final_norm")(x)
        router_logits = jnp.transpose(router_logits, (1, 2, 0, 3))
        if not with_lm_head:
            return ModelOutput(None, router_logits, x)
        if model_config.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.DenseGeneral(model_config.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     dot_general=_dot_general_float32_accumulate,
                                     kernel_init=_init(model_config.init_std, "embed", "vocab"), name="lm_head")(x)
        return ModelOutput(logits, router_logits, x)

    def _unrolled_layers(self, x, positions, mask):
        """The layers as a Python loop over modules layers_<i>, each MoE layer reading its own
        PerLayerExperts arrays (expert_layout "per_layer") -> (x, router_logits [L_moe, B, S, E])."""
        model_config = self.model_config
        experts = PerLayerExperts(model_config, name="experts")()
        mixed = MixedMLPStacks(model_config, name="mixed_mlp")() if model_config.dense_layers else None
        moe_layers = set(model_config.moe_layers)
        router_logits = []
        for i in range(model_config.num_layers):
            if mixed is None:
                layer = nn.remat(DecoderLayer, prevent_cse=False) if model_config.remat_layers else DecoderLayer
                x, logits = layer(model_config, self.mesh, name=f"layers_{i}")(x, positions, mask,
                                                                                experts[len(router_logits)], None)
            else:
                is_moe, moe_index = i in moe_layers, len(router_logits)
                switch = (is_moe, moe_index, i - moe_index)
                layer = MixedDecoderLayer
                if model_config.remat_layers:
                    layer = nn.remat(MixedDecoderLayer, prevent_cse=False, static_argnums=(6,))
                x, logits = layer(model_config, self.mesh, name=f"layers_{i}")(
                    x, positions, mask, experts[moe_index] if is_moe else None, mixed, switch)
            if i in moe_layers:
                router_logits.append(logits)
        return x, jnp.stack(router_logits)

    def _mixed_layers(self, x, positions, mask, experts):
        """The layer scan of a model with dense layers -> (x, router_logits [L_moe, B, S, E])."""
        model_config = self.model_config
        moe_layers = np.array(model_config.moe_layers)
        is_moe = np.zeros(model_config.num_layers, bool)
        is_moe[moe_layers] = True
        # Each layer's index into its own stack (the other stack's index is unused there).
        moe_index = np.maximum(np.cumsum(is_moe) - 1, 0).astype(np.int32)
        dense_index = np.maximum(np.cumsum(~is_moe) - 1, 0).astype(np.int32)
        mlp_weights = MixedMLPStacks(model_config, name="mixed_mlp")()
        layer = nn.remat(MixedDecoderLayer, prevent_cse=False) if model_config.remat_layers else MixedDecoderLayer
        layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                         length=model_config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        x, router_logits = layers(model_config, self.mesh, name="layers")(
            x, positions, mask, experts, mlp_weights, (jnp.asarray(is_moe), jnp.asarray(moe_index),
                                                       jnp.asarray(dense_index)))
        return x, router_logits[moe_layers]  # [L_moe, B, S, E]: dense layers do not route


