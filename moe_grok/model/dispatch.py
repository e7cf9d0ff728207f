"""Expert-dispatch kernels: each token through its k experts, never all experts on all tokens
(except the dense test oracle). Kept apart from the layers, as MaxText keeps its MoE kernels.

Shapes: T = tokens, k = experts per token, E = experts (of this device), D = hidden,
F = expert intermediate, L = layers. Every kernel maps x [T, D], top_idx / top_w [T, k] and
SwiGLU weights gate/up [E, D, F], down [E, F, D] (or [L, E, ...] stacks with `layer` picking
one) to [T, D]; with `out_in` the weights are stored the other way round, gate/up [E, F, D],
down [E, D, F] (HF's orientation, MoEConfig.expert_layout "per_layer"), and each product is
computed as x W^T: XLA's CPU dot is about 2x faster so for few rows per expert (docs/benchmarks.md).
`first_expert` is the global id of local expert 0: assignments to experts
outside [first_expert, first_expert + E) contribute nothing (expert parallelism, see
`dispatch_experts`).

- ragged:  tokens sorted by expert through jax.lax.ragged_dot (grouped matmul; GPU/TPU).
- chunked: exact per-expert chunked matmuls with a hand-written VJP (CPU, where ragged_dot is slow).
  Under jax.vmap (seeds' stacked weights) its loops run once over seeds x experts (_chunk_loops).
- batched: every expert's rows gathered into one [E, C, D] block, C a capacity that holds the
           busiest expert's rows (one of a few static sizes, picked at run time: dropless),
           and one batched matmul per projection (CPU, for balanced routing).
- dense:   every expert on every token, then masked (the test oracle).

`dispatch_experts` runs a kernel on one device, or under a mesh inside `jax.shard_map`:
each device sorts only its own tokens, and each device of the "expert" axis computes only
its own experts (see its docstring).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_grok import sharding


# ----------------------------------------------------------------------------------------
def _swiglu(x, w_gate, w_up, w_down, matmul):
    return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


def _in_features(w, out_in: bool) -> int:
    """The axis of weights w [..., in, out] (or [..., out, in] with out_in) that the product contracts."""
    return w.ndim - 1 if out_in else w.ndim - 2


def _local_experts(top_idx, first_expert, num_local: int):
    """(local expert ids [T, k], is_local [T, k]): ids relative to first_expert, and which are ours."""
    local = top_idx.astype(jnp.int32) - first_expert
    return local, (local >= 0) & (local < num_local)


def _sort_by_expert(top_idx, num_experts, first_expert=0):
    """Order the T*k (token, choice) assignments by local expert, the other devices' last.

    Returns (order [T*k], group_sizes [num_experts] of local experts, is_local [T*k] in sorted order).
    """
    local, is_local = _local_experts(top_idx.reshape(-1), first_expert, num_experts)
    flat = jnp.where(is_local, local, num_experts)  # group num_experts: assignments of other devices
    n = flat.shape[0]
    if (num_experts + 1) * n < 2**31:  # sort one int32 key (expert, position): ~4x faster than argsort on CPU
        order = jnp.sort(flat * n + jnp.arange(n, dtype=jnp.int32)) % n
    else:
        order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order, group_sizes, is_local[order]


def _local_rows(t: int, k: int, num_local: int) -> int:
    """Rows enough for every local assignment: a token's k experts are distinct (top-k), so at
    most min(k, num_local) of them are on this device. The sorted order puts these first."""
    return t * min(k, num_local)


def _of_layer(layer, *weights):
    """The expert weights of one layer: [L, E, ...] stacks at `layer`, or as given when layer is None."""
    return weights if layer is None else tuple(w[layer] for w in weights)


def _combine(per_assignment, top_w, out_dtype):
    """sum_k per_assignment[t, k] * top_w[t, k]: [T, k, D], [T, k] -> [T, D] in out_dtype."""
    return jnp.einsum("tkd,tk->td", per_assignment, top_w.astype(per_assignment.dtype),
                      preferred_element_type=jnp.float32).astype(out_dtype)


def _scatter_combine(sorted_rows, order, sorted_local, top_w, out_dtype):
    """Each token's sum of its local assignments' rows times their top-k weights, by a
    scatter-add (no [T*k, D] buffer): sorted_rows [R, D] (row r = assignment order[r]) -> [T, D]."""
    t, k = top_w.shape
    weight = jnp.where(sorted_local, top_w.reshape(-1)[order], 0).astype(jnp.float32)
    out = jnp.zeros((t, sorted_rows.shape[1]), jnp.float32)
    return out.at[order // k].add(sorted_rows.astype(jnp.float32) * weight[:, None]).astype(out_dtype)


def experts_ragged(x, top_idx, top_w, w_gate, w_up, w_down, layer=None, first_expert=0, out_dtype=None,
                   out_in: bool = False):
    """Sorted tokens through jax.lax.ragged_dot (grouped matmul; the GPU/TPU path).

    x: [T, D]; top_idx/top_w: [T, k]; w_gate/w_up: [E, D, F]; w_down: [E, F, D] (or [L, E, ...]
    stacks with `layer` picking one; out_in: [E, F, D] / [E, D, F]) -> [T, D] in out_dtype
    (default x.dtype).
    """
    w_gate, w_up, w_down = _of_layer(layer, w_gate, w_up, w_down)
    t, k = top_idx.shape
    order, group_sizes, sorted_local = _sort_by_expert(top_idx, w_gate.shape[0], first_expert)
    rows = _local_rows(t, k, w_gate.shape[0])
    order, sorted_local = order[:rows], sorted_local[:rows]

    def matmul(a, w):
        numbers = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((1,), (_in_features(w, out_in),)), ((), ())),
            lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))
        return jax.lax.ragged_dot_general(a, w, group_sizes, numbers)

    y = _swiglu(x[order // k], w_gate, w_up, w_down, matmul)  # rows past the local groups come out 0
    return _scatter_combine(y, order, sorted_local, top_w, out_dtype or x.dtype)


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
    _, transpose_index = residuals
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


def plan_chunks(group_sizes, num_rows: int, max_chunk: int, granule: int, starts=None) -> ChunkPlan:
    """ChunkPlan for at most `num_rows` expert-sorted rows, `group_sizes` [E] of them per expert,
    expert e's run starting at row starts[e] (default: the runs back to back from row 0)."""
    if max_chunk % granule:
        raise ValueError(f"expert chunk size {max_chunk} is not a multiple of its granule {granule}")
    num_experts = group_sizes.shape[0]
    if starts is None:
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


def _vary_like(tree, *others):
    """tree + 0 varying over every mesh axis that `others` vary over: inside shard_map a loop
    carry must keep its type, and chunk outputs vary with the weights (over "expert"), weight
    gradients with the tokens (over "data"). Exactly tree outside shard_map."""
    zero = sum(jnp.zeros_like(o[(0,) * o.ndim], jnp.float32) for o in others)
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)


def _for_each_chunk(plan: ChunkPlan, max_chunk: int, granule: int, body, carry, weights):
    """carry = body(size, expert, start, valid, carry, weights) over every chunk; size is static.

    `weights` (the [L, E, ...] stacks) ride in each loop's carry behind an optimization
    barrier. XLA's CPU backend computes bfloat16 elementwise ops in float32; with the stacks
    loop-invariant it may convert them whole to float32 once, outside the loop (a float32 copy of
    every expert: 27 GB for OLMoE-1B-7B). Carried, only each chunk's slice is touched.
    """
    carry = _vary_like(carry, *weights)
    def loop(size, lo, hi, chunk_of, carry):
        def step(i, state):
            carry, weights = state
            weights = jax.lax.optimization_barrier(weights)
            return body(size, *chunk_of(i), carry, weights), weights

        return jax.lax.fori_loop(lo, hi, step, (carry, weights))[0]

    if plan.full_expert.shape[0]:  # static: fewer rows than one full chunk can hold
        carry = loop(max_chunk, 0, plan.num_full,
                     lambda i: (plan.full_expert[i], plan.full_start[i], max_chunk), carry)
    for size_class in range(1, max_chunk // granule + 1):
        carry = loop(size_class * granule, plan.class_bounds[size_class], plan.class_bounds[size_class + 1],
                     lambda i: (plan.rem_expert[i], plan.rem_start[i], plan.rem_valid[i]), carry)
    return carry


def _matmul_float32_accumulate(a, w, out_in: bool = False):
    """a [..., rows, in] times one expert's w [in, out] (out_in: w [out, in], the product a w^T),
    accumulated in float32, rounded back to a's dtype. For bfloat16 operands XLA's CPU
    backend then uses its bfloat16 dot (2.1x the float32 one on an AVX512-BF16 CPU for a
    [512, 2048] x [2048, 1024] chunk; casting the operands to float32 first runs the float32 dot)."""
    numbers = (((a.ndim - 1,), (_in_features(w, out_in),)), ((), ()))
    return jax.lax.dot_general(a, w, numbers, preferred_element_type=jnp.float32).astype(a.dtype)


def _chunk_swiglu(out_in: bool, x_chunk, w_gate, w_up, w_down):
    return _swiglu(x_chunk, w_gate, w_up, w_down, functools.partial(_matmul_float32_accumulate, out_in=out_in))


def _write_valid(buffer, values, start, valid):
    """buffer[start + i] = values[i] for i < valid (a chunk's other rows are left alone)."""
    window = jax.lax.dynamic_slice_in_dim(buffer, start, values.shape[0])
    keep = (jnp.arange(values.shape[0]) < valid)[:, None]
    return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(keep, values, window), start, 0)


def _swiglu_over_chunks(max_chunk: int, granule: int, out_in: bool, rows, plan: ChunkPlan, layer, weights):
    """Each chunk of expert-sorted rows through its expert of `layer`, in place (see chunked_swiglu)."""

    def body(size, expert, start, valid, buffer, weights):
        # Each row belongs to one chunk, which reads it before writing its output there, so
        # the outputs can overwrite the inputs in place (the overhang is never written).
        x_chunk = jax.lax.dynamic_slice_in_dim(buffer, start, size)
        y = _chunk_swiglu(out_in, x_chunk, *(w[layer, expert] for w in weights))
        return _write_valid(buffer, y, start, valid)

    return _for_each_chunk(plan, max_chunk, granule, body, rows, weights)


def _swiglu_vjp_over_chunks(max_chunk: int, granule: int, out_in: bool, rows, grad, plan: ChunkPlan, layer,
                            weights):
    """(d_rows [R + max_chunk, D], float32 d_weights [L, E, ...] each, zero outside `layer`): the same
    loops run each chunk's VJP (rows past `valid` get zero cotangent). Dynamic-trip-count loops have
    no automatic reverse mode."""

    def body(size, expert, start, valid, grads, weights):
        d_rows, d_gate, d_up, d_down = grads
        x_chunk = jax.lax.dynamic_slice_in_dim(rows, start, size)
        g_chunk = jax.lax.dynamic_slice_in_dim(grad, start, size)
        g_chunk = jnp.where((jnp.arange(size) < valid)[:, None], g_chunk, 0)
        _, pull = jax.vjp(functools.partial(_chunk_swiglu, out_in), x_chunk, *(w[layer, expert] for w in weights))
        dx, dg, du, dd = pull(g_chunk)
        add = lambda total, g: total.at[layer, expert].add(g.astype(jnp.float32))
        return _write_valid(d_rows, dx, start, valid), add(d_gate, dg), add(d_up, du), add(d_down, dd)

    zeros = _vary_like((jnp.zeros_like(rows), *(jnp.zeros(w.shape, jnp.float32) for w in weights)), rows, grad)
    d_rows, *d_weights = _for_each_chunk(plan, max_chunk, granule, body, zeros, weights)
    return d_rows, tuple(d_weights)


def _merge_seeds(max_chunk: int, granule: int, size: int, in_batched, rows, group_sizes, layer, weights):
    """`size` (S) independent dispatches (a leading seed axis on rows [S, N, D], group_sizes [S, E] and the
    weight stacks [S, L, E, ...]) as one over S*E experts: (rows [S*N, D], its ChunkPlan, this
    layer's weights [1, S*E, ...]). Seed s's expert e is expert s*E + e, its rows where they were, so
    every chunk has the shape and rows it has alone and the loops run once, not once per seed."""
    rows, group_sizes, *weights = (a if b else jnp.broadcast_to(a, (size, *a.shape))
                                   for a, b in zip((rows, group_sizes, *weights), in_batched, strict=True))
    seeds, n = rows.shape[:2]
    starts = jnp.cumsum(group_sizes, axis=1) - group_sizes + (jnp.arange(seeds) * n)[:, None]
    plan = plan_chunks(group_sizes.reshape(-1), seeds * (n - max_chunk), max_chunk, granule, starts.reshape(-1))
    layer_weights = tuple(jax.lax.dynamic_index_in_dim(w, layer, axis=1, keepdims=False) for w in weights)
    merged = tuple(w.reshape(1, -1, *w.shape[2:]) for w in layer_weights)
    return rows.reshape(seeds * n, -1), plan, merged


@functools.cache
def _chunk_loops(max_chunk: int, granule: int, out_in: bool):
    """(forward, vjp) of chunked_swiglu's loops, each with a vmap rule that runs a batch of
    independent dispatches (jax.vmap over seeds' stacked params) as one dispatch (_merge_seeds).
    jax.vmap's own rule would run every loop to the longest trip count of any seed, selecting whole
    carries (the weight-gradient stacks) at every iteration."""

    @jax.custom_batching.custom_vmap
    def forward(rows, group_sizes, layer, *weights):
        plan = plan_chunks(group_sizes, rows.shape[0] - max_chunk, max_chunk, granule)
        return _swiglu_over_chunks(max_chunk, granule, out_in, rows, plan, layer, weights)

    @forward.def_vmap
    def forward_rule(axis_size, in_batched, rows, group_sizes, layer, *weights):
        if in_batched[2]:
            raise NotImplementedError("the chunked expert dispatch batches seeds, not layers")
        merged_rows, plan, merged = _merge_seeds(max_chunk, granule, axis_size,
                                                 (in_batched[0], in_batched[1], *in_batched[3:]),
                                                 rows, group_sizes, layer, weights)
        out = _swiglu_over_chunks(max_chunk, granule, out_in, merged_rows, plan, jnp.int32(0), merged)
        return out.reshape(-1, *rows.shape[-2:]), True

    @jax.custom_batching.custom_vmap
    def vjp(rows, grad, group_sizes, layer, *weights):
        plan = plan_chunks(group_sizes, rows.shape[0] - max_chunk, max_chunk, granule)
        return _swiglu_vjp_over_chunks(max_chunk, granule, out_in, rows, grad, plan, layer, weights)

    @vjp.def_vmap
    def vjp_rule(axis_size, in_batched, rows, grad, group_sizes, layer, *weights):
        if in_batched[3]:
            raise NotImplementedError("the chunked expert dispatch batches seeds, not layers")
        if not in_batched[1]:
            grad = jnp.broadcast_to(grad, (axis_size, *grad.shape))
        merged_rows, plan, merged = _merge_seeds(max_chunk, granule, axis_size,
                                                 (in_batched[0], in_batched[2], *in_batched[4:]),
                                                 rows, group_sizes, layer, weights)
        d_rows, d_merged = _swiglu_vjp_over_chunks(max_chunk, granule, out_in, merged_rows,
                                                   grad.reshape(merged_rows.shape), plan, jnp.int32(0), merged)
        stacks = tuple(w.shape[-4:] if w.ndim > 4 else w.shape for w in weights)  # [L, E, ...] of one seed
        d_weights = tuple(jax.lax.dynamic_update_index_in_dim(jnp.zeros((axis_size, *shape), jnp.float32),
                                                              d.reshape(axis_size, *shape[1:]), layer, axis=1)
                          for d, shape in zip(d_merged, stacks, strict=True))
        return (d_rows.reshape(axis_size, *rows.shape[-2:]), d_weights), (True, (True,) * len(weights))

    return forward, vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_swiglu(max_chunk: int, granule: int, out_in: bool, rows, group_sizes, layer, w_gate, w_up, w_down):
    """SwiGLU of expert-sorted rows [R + max_chunk, D] (the tail is slack for the last chunk's
    overhang; group_sizes [E] rows per expert, back to back), each chunk (ChunkPlan) through its
    expert of `layer`; returns [R + max_chunk, D] (rows no chunk covers unchanged). w_gate/w_up:
    [L, E, D, F]; w_down: [L, E, F, D] (out_in: [L, E, F, D] / [L, E, D, F]). Each chunk slices its
    expert's matrices straight from the stacks (no per-layer copy of all experts)."""
    return _chunk_loops(max_chunk, granule, out_in)[0](rows, group_sizes, layer, w_gate, w_up, w_down)


def _chunked_swiglu_fwd(max_chunk, granule, out_in, rows, group_sizes, layer, w_gate, w_up, w_down):
    out = chunked_swiglu(max_chunk, granule, out_in, rows, group_sizes, layer, w_gate, w_up, w_down)
    return out, (rows, group_sizes, layer, w_gate, w_up, w_down)


def _chunked_swiglu_bwd(max_chunk, granule, out_in, residuals, grad):
    # The weight gradients accumulate into full float32 [L, E, ...] stacks (zero outside `layer`;
    # fine for the small models trained here), summed over chunks, then data shards, rounded once.
    rows, group_sizes, layer, *stacks = residuals
    d_rows, d_weights = _chunk_loops(max_chunk, granule, out_in)[1](rows, grad, group_sizes, layer, *stacks)
    int_zeros = jax.tree.map(lambda a: np.zeros(np.shape(a), jax.dtypes.float0), (group_sizes, layer))
    d_gate, d_up, d_down = (_sum_over_unshared_axes(g, w).astype(w.dtype) for g, w in zip(d_weights, stacks,
                                                                                          strict=True))
    return _sum_over_unshared_axes(d_rows, rows), *int_zeros, d_gate, d_up, d_down


def _sum_over_unshared_axes(grad, primal):
    """Inside shard_map: the gradient summed over the mesh axes it varies over and `primal` does
    not (a weight replicated over "data" gets the sum of every data shard's gradient)."""
    extra = tuple(sorted(jax.typeof(grad).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying))
    return jax.lax.psum(grad, extra) if extra else grad


chunked_swiglu.defvjp(_chunked_swiglu_fwd, _chunked_swiglu_bwd)


def experts_chunked(x, top_idx, top_w, w_gate, w_up, w_down, layer=None, first_expert=0, out_dtype=None,
                    out_in: bool = False, max_chunk: int = 512, granule: int = 32):
    """Exact sparse dispatch for CPU: the T*k (token, choice) assignments sorted by expert,
    then one matmul per expert chunk (see ChunkPlan). Work is the local assignments plus
    under `granule` rows per expert however unbalanced the routing; no token is ever dropped.
    The rows of each token's top_idx must be distinct experts (as top-k gives).

    x: [T, D]; top_idx/top_w: [T, k]; w_gate/w_up: [E, D, F]; w_down: [E, F, D] (or [L, E, ...]
    stacks with `layer` picking one; out_in: [E, F, D] / [E, D, F]) -> [T, D] in out_dtype
    (default x.dtype).
    """
    if layer is None:
        layer, w_gate, w_up, w_down = jnp.int32(0), w_gate[None], w_up[None], w_down[None]
    t, k = top_idx.shape
    num_rows = _local_rows(t, k, w_gate.shape[1])  # R
    max_chunk = min(max_chunk, -(-num_rows // granule) * granule)  # no size classes larger than all rows
    order, group_sizes, sorted_local = _sort_by_expert(top_idx, w_gate.shape[1], first_expert)
    order, sorted_local = order[:num_rows], sorted_local[:num_rows]
    # Sorted row of each assignment; -1 for other devices' assignments, which read and write nothing.
    rank = jnp.full((t * k,), -1, order.dtype).at[order].set(jnp.where(sorted_local, jnp.arange(num_rows), -1))
    slack = jnp.full((max_chunk,), -1, order.dtype)
    row_token = jnp.concatenate([jnp.where(sorted_local, order // k, -1), slack])
    rows = gather_rows(x, row_token, rank.reshape(t, k))  # [R + max_chunk, D]
    out_rows = chunked_swiglu(max_chunk, granule, out_in, rows, group_sizes, layer, w_gate, w_up, w_down)
    if num_rows < t * k:  # a share of the experts (expert parallelism): no [T*k, D] buffer of mostly zeros
        return _scatter_combine(out_rows[:num_rows], order, sorted_local, top_w, out_dtype or x.dtype)
    row_assignment = jnp.concatenate([jnp.where(sorted_local, order, -1), slack])[:, None]
    per_assignment = gather_rows(out_rows, rank, row_assignment)  # [T*k, D]; a gather: CPU scatters are slow
    return _combine(per_assignment.reshape(t, k, -1), top_w, out_dtype or x.dtype)


def experts_dense(x, top_idx, top_w, w_gate, w_up, w_down, layer=None, first_expert=0, out_dtype=None,
                  out_in: bool = False):
    """Test oracle: every expert on every token, combined with the top-k weights. [T, D]."""
    w_gate, w_up, w_down = _of_layer(layer, w_gate, w_up, w_down)
    weights = "efd" if out_in else "edf"
    matmul = lambda a, w: jnp.einsum(f"{'td' if a.ndim == 2 else 'etd'},{weights}->etf", a, w)
    y = _swiglu(x, w_gate, w_up, w_down, matmul)  # [E, T, D]
    local, _ = _local_experts(top_idx, first_expert, w_gate.shape[0])
    combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(local, w_gate.shape[0], dtype=jnp.float32),
                         top_w.astype(jnp.float32))  # other devices' experts one-hot to zeros
    return jnp.einsum("etd,te->td", y, combine.astype(y.dtype),
                      preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)


def batch_capacities(tokens: int, k: int, num_experts: int, granule: int, max_ratio: float) -> tuple[int, ...]:
    """The static capacities (rows per expert) `experts_batched` compiles: multiples of `granule`
    from the balanced share tokens * k / num_experts up to max_ratio times it, in steps of about
    1.25x (a capacity pads under a quarter of its rows beyond the busiest expert's, plus the
    granule), and never above `tokens` (top-k experts are distinct: no expert gets more rows)."""
    balanced = max(tokens * k / num_experts, 1.0)
    most = -(-tokens // granule) * granule
    sizes = [balanced * 1.25 ** i for i in range(int(np.log(max_ratio) / np.log(1.25)) + 1)] + [balanced * max_ratio]
    return tuple(sorted({min(-(-int(np.ceil(size)) // granule) * granule, most) for size in sizes}))


def _batched_swiglu(rows, w_gate, w_up, w_down, out_in: bool):
    """rows [E, C, D] through each expert's SwiGLU, one batched dot_general per projection -> [E, C, D]."""
    def matmul(a, w):
        numbers = (((2,), (_in_features(w, out_in),)), ((0,), (0,)))
        return jax.lax.dot_general(a, w, numbers, preferred_element_type=jnp.float32).astype(a.dtype)

    return _swiglu(rows, w_gate, w_up, w_down, matmul)


def experts_batched(x, top_idx, top_w, w_gate, w_up, w_down, layer=None, first_expert=0, out_dtype=None,
                    out_in: bool = False, max_chunk: int = 512, granule: int = 32, max_ratio: float = 2.0,
                    num_experts: int | None = None):
    """Exact, dropless dispatch as one batched matmul over experts (CPU): each expert's rows
    gathered into an [E, C, D] block of capacity C rows per expert, the smallest of
    `batch_capacities` that holds the busiest expert's rows (picked at run time, jax.lax.switch:
    only that branch runs). Routing so unbalanced that the busiest expert has more than
    max_ratio times the balanced share runs `experts_chunked` instead (its work does not grow
    with the imbalance). For one OLMoE-1B-7B layer (bfloat16) it ran 2.2x the chunk loops' speed
    at 512 tokens and 2.0x at 4,096 (docs/benchmarks.md). Arguments and shapes as
    `experts_chunked`; weights as given per layer (a stack's layer is sliced whole, so pass
    per-layer arrays). num_experts: the model's experts over every device (default: E, this
    device's), which sets the balanced share T*k/num_experts under expert parallelism. Under
    jax.vmap the capacity switch becomes a select that runs every branch: the seeds' training
    keeps the chunked kernel."""
    w_gate, w_up, w_down = _of_layer(layer, w_gate, w_up, w_down)
    t, k = top_idx.shape
    e = w_gate.shape[0]
    out_dtype = out_dtype or x.dtype
    order, group_sizes, sorted_local = _sort_by_expert(top_idx, e, first_expert)
    local, _ = _local_experts(top_idx.reshape(-1), first_expert, e)
    sorted_expert = jnp.where(sorted_local, local[order], 0)
    slot = jnp.arange(t * k) - (jnp.cumsum(group_sizes) - group_sizes)[sorted_expert]  # row within its expert
    capacities = batch_capacities(t, k, num_experts or e, granule, max_ratio)

    def batched(capacity, x, w_gate, w_up, w_down):
        cell = jnp.where(sorted_local, sorted_expert * capacity + slot, -1)  # [T*k] in sorted order
        cell_token = jnp.full((e * capacity,), -1, order.dtype).at[cell].set(order // k, mode="drop")
        assignment_cell = jnp.full((t * k,), -1, order.dtype).at[order].set(cell)
        rows = gather_rows(x, cell_token, assignment_cell.reshape(t, k))  # [E*C, D]
        y = _batched_swiglu(rows.reshape(e, capacity, -1), w_gate, w_up, w_down, out_in)
        cell_assignment = jnp.full((e * capacity,), -1, order.dtype).at[cell].set(order, mode="drop")
        per_assignment = gather_rows(y.reshape(e * capacity, -1), assignment_cell, cell_assignment[:, None])
        return _combine(per_assignment.reshape(t, k, -1), top_w, out_dtype)

    # The fallback's chunks in about 4 size classes, not max_chunk // granule: each class is a loop
    # compiled once per layer of the unrolled model (OLMoE-1B-7B's extractor compiled in 40 s, not 65).
    coarse = max((g for g in range(granule, max_chunk // 4 + 1, granule) if max_chunk % g == 0), default=granule)

    def chunked(x, w_gate, w_up, w_down):
        return experts_chunked(x, top_idx, top_w, w_gate, w_up, w_down, first_expert=first_expert,
                               out_dtype=out_dtype, out_in=out_in, max_chunk=max_chunk, granule=coarse)

    branches = [functools.partial(batched, capacity) for capacity in capacities] + [chunked]
    branch = jnp.searchsorted(jnp.asarray(capacities), jnp.max(group_sizes), side="left")
    return jax.lax.switch(branch, branches, x, w_gate, w_up, w_down)


EXPERT_IMPLS = {"ragged": experts_ragged, "chunked": experts_chunked, "batched": experts_batched,
                "dense": experts_dense}


def resolve_moe_impl(impl: str, expert_layout: str = "stacked") -> str:
    """'auto' -> 'ragged' on GPU/TPU; on CPU (where ragged_dot is very slow) 'batched' for per-layer
    expert arrays (2.0-2.2x the chunk loops for one OLMoE layer, docs/benchmarks.md) and
    'chunked' for layer stacks (the batched kernel would copy a layer's slice of the stack first)."""
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "ragged"
    return "batched" if expert_layout == "per_layer" else "chunked"


def dispatch_experts(x, router_probs, select, experts, layer, impl: str, mesh: jax.sharding.Mesh | None = None,
                     **kernel_options):
    """Every token through its k experts with kernel `impl`; x [T, D] -> [T, D].

    router_probs: [T, E] float32; select: router_probs -> (top_w [T, k], top_idx [T, k]);
    experts: (gate, up, down) stacks [L, E, ...] and layer a scalar index into them, or one
    layer's arrays [E, ...] and layer None; kernel_options go to the kernel (out_in: the
    weights' orientation, chunk sizes).

    With a mesh, inside `jax.shard_map`: tokens are split over every mesh axis (the model's
    batch sharding, `sharding.model_batch_sharding`) and the stacks' experts over "expert".
    Each device selects and sorts only its own tokens' experts. Devices of one "expert" group
    then all-gather their tokens (x and the top-k ids / weights, never weights), each runs
    the kernel on its own experts only (assignments to other experts read and compute
    nothing), and a reduce-scatter sums the partial outputs back to each token's device. For
    top-k >= the expert-axis size this moves as many bytes as an all-to-all of the k token
    copies (MaxText's sparse_matmul) and keeps every kernel static-shaped; nothing is dropped.
    """
    kernel = functools.partial(EXPERT_IMPLS[impl], **kernel_options)

    stacked = layer is not None

    def local(x, router_probs, layer, *experts):
        top_w, top_idx = select(router_probs)
        top_w = top_w.astype(x.dtype)
        layer = layer if stacked else None
        if expert_axis is None:
            return kernel(x, top_idx, top_w, *experts, layer=layer)
        x, top_idx, top_w = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, top_idx, top_w))
        first_expert = jax.lax.axis_index(expert_axis) * experts[0].shape[int(stacked)]
        partial = kernel(x, top_idx, top_w, *experts, layer=layer, first_expert=first_expert,
                         out_dtype=jnp.float32)  # summed over devices in float32, rounded once
        return jax.lax.psum_scatter(partial, expert_axis, scatter_dimension=0, tiled=True).astype(x.dtype)

    if not stacked:
        layer = jnp.int32(0)  # a placeholder argument: one layer's arrays are indexed by nothing
    if mesh is None:
        expert_axis = None
        return local(x, router_probs, layer, *experts)
    expert_axis = sharding.EXPERT_AXIS if mesh.shape.get(sharding.EXPERT_AXIS, 1) > 1 else None
    tokens, stacks = P(sharding.model_batch_axes(mesh)), P(None, expert_axis) if stacked else P(expert_axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, P(), stacks, stacks, stacks),
                         out_specs=tokens)(x, router_probs, layer, *experts)
