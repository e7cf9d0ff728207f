"""OLMoE-architecture Mixture-of-Experts decoder in Flax, numerically matching HF's OlmoeForCausalLM.

Shapes: B = batch, S = sequence, D = hidden, H = heads, K = kv heads, Dh = head dim,
E = experts, k = experts per token, F = expert intermediate, L = layers, V = vocab, T = B*S tokens.

Parameters are a plain pytree; layers are stacked on a leading [L] axis (nn.scan; the expert
weights [L, E, ...] are declared outside the scan, see ExpertStacks), every parameter carries
logical axis names (see LOGICAL_RULES) for mesh sharding.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_grok.config import MoEConfig

# Logical axis -> mesh axis (moe_grok.sharding's "data" / "expert" axes).
LOGICAL_RULES = (
    ("batch", "data"),
    ("expert", "expert"),
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
    router_logits: jax.Array  # [B, S, L, E] float32
    hidden: jax.Array  # [B, S, D] after the final norm


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


class Attention(nn.Module):
    """Causal self-attention with full-width q/k RMSNorm before RoPE, optional GQA and clip_qkv."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x, positions, mask):
        cfg, dtype = self.config, self.config.jnp_dtype
        b, s, _ = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dense = functools.partial(nn.DenseGeneral, use_bias=False, dtype=dtype, param_dtype=dtype)
        q = dense(h * hd, kernel_init=_init(cfg.init_std, "embed", "q_width"), name="q_proj")(x)
        k = dense(kv * hd, kernel_init=_init(cfg.init_std, "embed", "kv_width"), name="k_proj")(x)
        v = dense(kv * hd, kernel_init=_init(cfg.init_std, "embed", "kv_width"), name="v_proj")(x)
        q = RMSNorm(cfg.rms_norm_eps, dtype, name="q_norm")(q)
        k = RMSNorm(cfg.rms_norm_eps, dtype, name="k_norm")(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = rotary_embedding(q.reshape(b, s, h, hd), positions, cfg.rope_theta)
        k = rotary_embedding(k.reshape(b, s, kv, hd), positions, cfg.rope_theta)
        v = v.reshape(b, s, kv, hd)

        # Heads first ([B, H, S, Dh]); GQA repeats each kv head for its group of query heads.
        q = jnp.swapaxes(q, 1, 2)
        k, v = (jnp.repeat(jnp.swapaxes(t, 1, 2), h // kv, axis=1) for t in (k, v))
        scores = (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * hd**-0.5  # [B, H, S_q, S_k]
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))
        allowed = causal[None, :, :] & mask[:, None, :].astype(bool)  # [B, S_q, S_k]
        scores = scores + jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # additive mask, as HF
        # Softmax with the normalization applied after the value matmul: one pass fewer over the
        # [B, H, S, S] scores, mathematically the same (float32 throughout).
        unnormalized = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.matmul(unnormalized.astype(dtype), v, preferred_element_type=jnp.float32)
        out = (out / jnp.sum(unnormalized, axis=-1, keepdims=True)).astype(dtype)  # [B, H, S, Dh]
        out = jnp.swapaxes(out, 1, 2).reshape(b, s, h * hd)
        return dense(cfg.hidden_size, kernel_init=_init(cfg.init_std, "q_width", "embed"), name="o_proj")(out)


# ----------------------------------------------------------------------------------------
# Expert computation: tokens dispatched to their k experts (never all experts on all tokens,
# except in the dense test oracle).
# ----------------------------------------------------------------------------------------
def _swiglu(x, w_gate, w_up, w_down, matmul):
    return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


def _sort_by_expert(top_idx, num_experts):
    """Order the T*k (token, choice) assignments by expert. Returns (order, group_sizes [E])."""
    flat = top_idx.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    if num_experts * n < 2**31:  # sort one int32 key (expert, position): ~4x faster than argsort on CPU
        order = jnp.sort(flat * n + jnp.arange(n, dtype=jnp.int32)) % n
    else:
        order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def _of_layer(layer, *weights):
    """The expert weights of one layer: [L, E, ...] stacks at `layer`, or as given when layer is None."""
    return weights if layer is None else tuple(w[layer] for w in weights)


def experts_ragged(x, top_idx, top_w, w_gate, w_up, w_down, layer=None):
    """Sorted tokens through jax.lax.ragged_dot (grouped matmul; the GPU/TPU path).

    x: [T, D]; top_idx/top_w: [T, k]; w_gate/w_up: [E, D, F]; w_down: [E, F, D] (or [L, E, ...]
    stacks with `layer` picking one) -> [T, D].
    """
    w_gate, w_up, w_down = _of_layer(layer, w_gate, w_up, w_down)
    t, k = top_idx.shape
    order, group_sizes = _sort_by_expert(top_idx, w_gate.shape[0])
    token = order // k
    matmul = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    y = _swiglu(x[token], w_gate, w_up, w_down, matmul)
    y = y * top_w.reshape(-1)[order][:, None]
    return jnp.zeros_like(x).at[token].add(y)


@jax.custom_vjp
def gather_rows(x, index, transpose_index):
    """x[index] with rows of index -1 zero, whose gradient is also a gather (no scatter).

    x: [N, D]; index: [M] rows of x (or -1); transpose_index: [N, R] the output rows that read
    each row of x (-1 padded). The dispatch maps are injective, so the transpose of the
    gather is a gather too, which XLA's CPU backend runs much faster than a scatter-add.
    """
    return jnp.where((index >= 0)[:, None], x[jnp.maximum(index, 0)], 0)


def _gather_rows_fwd(x, index, transpose_index):
    return gather_rows(x, index, transpose_index), (index, transpose_index)


def _gather_rows_bwd(residuals, grad):
    index, transpose_index = residuals
    picked = jnp.where((transpose_index >= 0)[..., None], grad[jnp.maximum(transpose_index, 0)], 0)
    return jnp.sum(picked, axis=1), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


class ChunkPlan(NamedTuple):
    """Expert-sorted rows cut into per-expert chunks, one [rows, D] x [D, F] matmul each.

    An expert's run of n rows is n // max_chunk full chunks plus a remainder of r rows,
    computed as one chunk of ceil(r / granule) * granule rows (its size class). Each size
    class runs as its own loop, so every matmul has a static shape, an expert's weights are
    read once per chunk, and at most granule - 1 rows per expert are wasted. Rows past a
    chunk's valid count belong to the next expert: they are computed, never written.
    """

    full_expert: jax.Array  # [T*k // max_chunk] expert of each full chunk
    full_start: jax.Array  # [T*k // max_chunk] first sorted row of each full chunk
    num_full: jax.Array  # scalar: full chunks in use
    rem_expert: jax.Array  # [E] experts ordered by remainder size class
    rem_start: jax.Array  # [E] first sorted row of each expert's remainder (same order)
    rem_valid: jax.Array  # [E] remainder rows (same order; 0 = none)
    class_bounds: jax.Array  # [max_chunk // granule + 2]: class c is rem_*[bounds[c]:bounds[c + 1]]


def plan_chunks(group_sizes, num_rows: int, max_chunk: int, granule: int) -> ChunkPlan:
    """ChunkPlan for `num_rows` expert-sorted rows, `group_sizes` [E] of them per expert."""
    if max_chunk % granule:
        raise ValueError(f"expert chunk size {max_chunk} is not a multiple of its granule {granule}")
    num_experts = group_sizes.shape[0]
    starts = jnp.cumsum(group_sizes) - group_sizes
    full_per_expert = group_sizes // max_chunk
    full_ends = jnp.cumsum(full_per_expert)
    chunk = jnp.arange(num_rows // max_chunk)
    full_expert = jnp.minimum(jnp.searchsorted(full_ends, chunk, side="right"), num_experts - 1)
    full_start = starts[full_expert] + (chunk - full_ends[full_expert] + full_per_expert[full_expert]) * max_chunk
    remainder = group_sizes - full_per_expert * max_chunk
    size_class = -(-remainder // granule)  # 0 (no remainder) .. max_chunk // granule
    rem_expert = jnp.argsort(size_class, stable=True)
    class_bounds = jnp.searchsorted(size_class[rem_expert], jnp.arange(max_chunk // granule + 2), side="left")
    return ChunkPlan(full_expert, full_start, full_ends[-1], rem_expert,
                     (starts + full_per_expert * max_chunk)[rem_expert], remainder[rem_expert], class_bounds)


def _for_each_chunk(plan: ChunkPlan, max_chunk: int, granule: int, body, carry):
    """carry = body(size, expert, start, valid, carry) over every chunk; size is static."""
    def loop(size, lo, hi, chunk_of, carry):
        return jax.lax.fori_loop(lo, hi, lambda i, c: body(size, *chunk_of(i), c), carry)

    if plan.full_expert.shape[0]:  # static: fewer rows than one full chunk can hold
        carry = loop(max_chunk, 0, plan.num_full,
                     lambda i: (plan.full_expert[i], plan.full_start[i], max_chunk), carry)
    for size_class in range(1, max_chunk // granule + 1):
        carry = loop(size_class * granule, plan.class_bounds[size_class], plan.class_bounds[size_class + 1],
                     lambda i: (plan.rem_expert[i], plan.rem_start[i], plan.rem_valid[i]), carry)
    return carry


def _chunk_swiglu(x_chunk, w_gate, w_up, w_down):
    return _swiglu(x_chunk, w_gate, w_up, w_down, jnp.matmul)


def _write_valid(buffer, values, start, valid):
    """buffer[start + i] = values[i] for i < valid (a chunk's other rows are left alone)."""
    window = jax.lax.dynamic_slice_in_dim(buffer, start, values.shape[0])
    keep = (jnp.arange(values.shape[0]) < valid)[:, None]
    return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(keep, values, window), start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_swiglu(max_chunk: int, granule: int, rows, plan: ChunkPlan, layer, w_gate, w_up, w_down):
    """SwiGLU of expert-sorted rows [R + max_chunk, D] (the tail is slack for the last chunk's
    overhang), each chunk through its expert of `layer`; returns [R + max_chunk, D] (tail rows
    unchanged). w_gate/w_up: [L, E, D, F]; w_down: [L, E, F, D]. Each chunk slices its expert's
    matrices straight from the stacks (no per-layer copy of all experts)."""

    def body(size, expert, start, valid, buffer):
        # Each row belongs to one chunk, which reads it before writing its output there, so
        # the outputs can overwrite the inputs in place (the overhang is never written).
        x_chunk = jax.lax.dynamic_slice_in_dim(buffer, start, size)
        y = _chunk_swiglu(x_chunk, w_gate[layer, expert], w_up[layer, expert], w_down[layer, expert])
        return _write_valid(buffer, y, start, valid)

    return _for_each_chunk(plan, max_chunk, granule, body, rows)


def _chunked_swiglu_fwd(max_chunk, granule, rows, plan, layer, w_gate, w_up, w_down):
    out = chunked_swiglu(max_chunk, granule, rows, plan, layer, w_gate, w_up, w_down)
    return out, (rows, plan, layer, w_gate, w_up, w_down)


def _chunked_swiglu_bwd(max_chunk, granule, residuals, grad):
    # Dynamic-trip-count loops have no automatic reverse mode: the same loops run each
    # chunk's VJP (rows past `valid` get zero cotangent), accumulating the weight gradients
    # into full [L, E, ...] stacks (zero outside `layer`; fine for the small models trained here).
    rows, plan, layer, w_gate, w_up, w_down = residuals

    def body(size, expert, start, valid, grads):
        d_rows, d_gate, d_up, d_down = grads
        x_chunk = jax.lax.dynamic_slice_in_dim(rows, start, size)
        g_chunk = jax.lax.dynamic_slice_in_dim(grad, start, size)
        g_chunk = jnp.where((jnp.arange(size) < valid)[:, None], g_chunk, 0)
        _, pull = jax.vjp(_chunk_swiglu, x_chunk, w_gate[layer, expert], w_up[layer, expert], w_down[layer, expert])
        dx, dg, du, dd = pull(g_chunk)
        return (_write_valid(d_rows, dx, start, valid), d_gate.at[layer, expert].add(dg),
                d_up.at[layer, expert].add(du), d_down.at[layer, expert].add(dd))

    zeros = tuple(jnp.zeros_like(a) for a in (rows, w_gate, w_up, w_down))
    d_rows, d_gate, d_up, d_down = _for_each_chunk(plan, max_chunk, granule, body, zeros)
    int_zeros = jax.tree.map(lambda a: np.zeros(np.shape(a), jax.dtypes.float0), (plan, layer))
    return d_rows, *int_zeros, d_gate, d_up, d_down


chunked_swiglu.defvjp(_chunked_swiglu_fwd, _chunked_swiglu_bwd)


def experts_chunked(x, top_idx, top_w, w_gate, w_up, w_down, layer=None, max_chunk: int = 512,
                    granule: int = 32):
    """Exact sparse dispatch for CPU: the T*k (token, choice) assignments sorted by expert,
    then one matmul per expert chunk (see ChunkPlan). Work is T*k rows plus under `granule`
    rows per expert however unbalanced the routing; no token is ever dropped.

    x: [T, D]; top_idx/top_w: [T, k]; w_gate/w_up: [E, D, F]; w_down: [E, F, D] (or [L, E, ...]
    stacks with `layer` picking one) -> [T, D].
    """
    if layer is None:
        layer, w_gate, w_up, w_down = jnp.int32(0), w_gate[None], w_up[None], w_down[None]
    t, k = top_idx.shape
    max_chunk = min(max_chunk, -(-t * k // granule) * granule)  # no size classes larger than all rows
    order, group_sizes = _sort_by_expert(top_idx, w_gate.shape[1])
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(t * k))  # sorted row of each assignment
    slack = jnp.full((max_chunk,), -1, order.dtype)
    rows = gather_rows(x, jnp.concatenate([order // k, slack]), rank.reshape(t, k))  # [T*k + max_chunk, D]
    plan = plan_chunks(group_sizes, t * k, max_chunk, granule)
    out_rows = chunked_swiglu(max_chunk, granule, rows, plan, layer, w_gate, w_up, w_down)
    per_assignment = gather_rows(out_rows, rank, jnp.concatenate([order, slack])[:, None])  # [T*k, D]
    return jnp.einsum("tkd,tk->td", per_assignment.reshape(t, k, -1), top_w)


def experts_dense(x, top_idx, top_w, w_gate, w_up, w_down, layer=None):
    """Test oracle: every expert on every token, combined with the top-k weights. [T, D]."""
    w_gate, w_up, w_down = _of_layer(layer, w_gate, w_up, w_down)
    matmul = lambda a, w: jnp.einsum("td,edf->etf", a, w) if a.ndim == 2 else jnp.einsum("etd,edf->etf", a, w)  # noqa: E731
    y = _swiglu(x, w_gate, w_up, w_down, matmul)  # [E, T, D]
    combine = jnp.zeros((x.shape[0], w_gate.shape[0]), top_w.dtype)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], top_idx].add(top_w)
    return jnp.einsum("etd,te->td", y, combine.astype(y.dtype))


EXPERT_IMPLS = {"ragged": experts_ragged, "chunked": experts_chunked, "dense": experts_dense}


def resolve_moe_impl(impl: str) -> str:
    """'auto' -> 'chunked' on CPU (ragged_dot is very slow there), 'ragged' on GPU/TPU."""
    if impl != "auto":
        return impl
    return "chunked" if jax.default_backend() == "cpu" else "ragged"


def select_experts(probs, config: MoEConfig):
    """Top-k of router probabilities [..., E] -> (weights [..., k], expert ids [..., k]),
    renormalized to sum to 1 when config.norm_topk_prob."""
    top_w, top_idx = jax.lax.top_k(probs, config.num_experts_per_tok)
    if config.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w, top_idx


EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # ExpertStacks' params, public path layers/moe/<name>


class ExpertStacks(nn.Module):
    """The SwiGLU expert weights of all layers: gate/up [L, E, D, F], down [L, E, F, D].

    Declared once outside the layer scan, so each layer's dispatch slices its experts from the
    stacks itself (the CPU path one expert at a time) instead of the scan copying all of a
    layer's experts first. `forward`/`init_params` show them at layers/moe/ like HF's nesting.
    """

    config: MoEConfig

    @nn.compact
    def __call__(self):
        cfg, dtype = self.config, self.config.jnp_dtype
        l, e, d, f = cfg.num_layers, cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        axes_and_shapes = ((("embed", "mlp"), (d, f)), (("embed", "mlp"), (d, f)), (("mlp", "embed"), (f, d)))
        return tuple(self.param(name, _init(cfg.init_std, "layers", "expert", *axes), (l, e, *shape), dtype)
                     for name, (axes, shape) in zip(EXPERT_WEIGHTS, axes_and_shapes))


class SparseMoE(nn.Module):
    """Router + SwiGLU experts. Returns (output [B, S, D], router_logits [B, S, E] float32).

    experts: ExpertStacks' (gate, up, down) of all layers; layer: this layer's index (scalar).
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x, experts, layer):
        cfg, dtype = self.config, self.config.jnp_dtype
        b, s, d = x.shape
        e = cfg.num_experts
        router = self.param("router", _init(cfg.init_std, "embed", "expert"), (d, e), dtype)

        tokens = x.reshape(b * s, d)
        router_logits = (tokens @ router).astype(jnp.float32)  # [T, E]
        top_w, top_idx = select_experts(jax.nn.softmax(router_logits, axis=-1), cfg)
        impl = resolve_moe_impl(cfg.moe_impl)
        kwargs = {"max_chunk": cfg.expert_chunk_size, "granule": cfg.expert_chunk_granule} if impl == "chunked" else {}
        out = EXPERT_IMPLS[impl](tokens, top_idx, top_w.astype(dtype), *experts, layer=layer, **kwargs)
        return out.reshape(b, s, d), router_logits.reshape(b, s, e)


class DecoderLayer(nn.Module):
    """x + attn(input_norm(x)); then + moe(post_attention_norm(.)). Scanned over layers."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x, positions, mask, experts, layer):
        cfg = self.config
        x = x + Attention(cfg, name="attn")(RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, name="input_norm")(x),
                                            positions, mask)
        moe_out, router_logits = SparseMoE(cfg, name="moe")(
            RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, name="post_attention_norm")(x), experts, layer)
        return x + moe_out, router_logits


class MoETransformer(nn.Module):
    """Decoder-only MoE LM. __call__(tokens [B, S], mask [B, S]) -> ModelOutput."""

    config: MoEConfig

    @nn.compact
    def __call__(self, tokens, mask=None, positions=None, with_lm_head: bool = True):
        cfg, dtype = self.config, self.config.jnp_dtype
        b, s = tokens.shape
        if mask is None:
            mask = jnp.ones((b, s), jnp.int32)
        if positions is None:  # HF default: 0..S-1 for every row, whatever the padding
            positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                         embedding_init=_init(cfg.init_std, "vocab", "embed"), name="embed")
        x = embed(tokens)
        experts = ExpertStacks(cfg, name="experts")()
        layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, router_logits = layers(cfg, name="layers")(x, positions, mask, experts,
                                                      jnp.arange(cfg.num_layers))  # router_logits [L, B, S, E]
        x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x)
        router_logits = jnp.transpose(router_logits, (1, 2, 0, 3))
        if not with_lm_head:
            return ModelOutput(None, router_logits, x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype,
                                     kernel_init=_init(cfg.init_std, "embed", "vocab"), name="lm_head")(x)
        return ModelOutput(logits, router_logits, x)


# ----------------------------------------------------------------------------------------
# Parameters and sharding
# ----------------------------------------------------------------------------------------
def _public_layout(module_params):
    """The module's tree -> the public one: ExpertStacks' weights go to layers/moe/ (HF's nesting)."""
    params = dict(module_params)
    experts = params.pop("experts")
    params["layers"] = {**params["layers"], "moe": {**params["layers"]["moe"], **experts}}
    return params


def _module_layout(params):
    """The public tree -> the module's: layers/moe/{gate,up,down}_proj back to experts/."""
    params = dict(params)
    moe = dict(params["layers"]["moe"])
    params["experts"] = {name: moe.pop(name) for name in EXPERT_WEIGHTS}
    params["layers"] = {**params["layers"], "moe": moe}
    return params


def _abstract_boxed_params(config: MoEConfig):
    model = MoETransformer(config)
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))["params"]
    return _public_layout(boxed)


def param_shapes(config: MoEConfig):
    """Pytree of jax.ShapeDtypeStruct for the model's parameters (no allocation)."""
    return nn.meta.unbox(_abstract_boxed_params(config))


def param_shardings(config: MoEConfig, mesh: jax.sharding.Mesh | None):
    """Pytree of NamedSharding (experts over the mesh's "expert" axis, the rest replicated)."""
    if mesh is None:
        return None
    specs = nn.get_partition_spec(_abstract_boxed_params(config))
    rules = tuple((logical, axis if axis in mesh.axis_names else None) for logical, axis in LOGICAL_RULES)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_params(config: MoEConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None):
    """Random parameters (normal(init_std), norms at 1) as a plain pytree, sharded if a mesh is given."""
    model = MoETransformer(config)

    def init(key):
        return _public_layout(nn.meta.unbox(model.init(key, jnp.zeros((1, 2), jnp.int32))["params"]))

    return jax.jit(init, out_shardings=param_shardings(config, mesh))(rng)


def router_matrices(params) -> jax.Array:
    """Router weight matrices W_l with experts as rows: [L, E, D] (row k = expert embedding v_lk)."""
    return jnp.swapaxes(params["layers"]["moe"]["router"], -1, -2)


def forward(config: MoEConfig, params, tokens, mask=None, with_lm_head: bool = True) -> ModelOutput:
    """Apply the model (un-jitted; jit at the caller's boundary)."""
    return MoETransformer(config).apply({"params": _module_layout(params)}, tokens, mask, with_lm_head=with_lm_head)


# ----------------------------------------------------------------------------------------
# Auxiliary router losses (training)
# ----------------------------------------------------------------------------------------
def load_balancing_loss(router_logits, mask, top_k: int):
    """HF's load_balancing_loss_func: E * sum_e f_e * P_e over all layers' tokens.

    router_logits: [B, S, L, E]; mask: [B, S] (1 = real token). f_e = fraction of top-k
    assignments to expert e, P_e = mean router probability, both over real tokens of all layers.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, top_idx = jax.lax.top_k(probs, top_k)
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, :, None], probs.shape[:3])  # [B, S, L]
    total = jnp.sum(weight)
    counts = jnp.sum(jax.nn.one_hot(top_idx, num_experts) * weight[..., None, None], axis=(0, 1, 2, 3))
    prob_sum = jnp.sum(probs * weight[..., None], axis=(0, 1, 2))
    return num_experts * jnp.sum((counts / total) * (prob_sum / total))


def router_z_loss(router_logits, mask):
    """ST-MoE router z-loss: mean over real tokens and layers of logsumexp(logits)^2."""
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2  # [B, S, L]
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[:, :, None], z.shape)
    return jnp.sum(z * weight) / jnp.sum(weight)
