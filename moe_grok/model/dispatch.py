"""Expert-dispatch kernels: each token through its k experts, never all experts on all tokens
(except the dense test oracle). Kept apart from the layers, as MaxText keeps its MoE kernels.

Shapes: T = tokens, k = experts per token, E = experts, D = hidden, F = expert intermediate,
L = layers. Every kernel maps x [T, D], top_idx / top_w [T, k] and SwiGLU weights
gate/up [E, D, F], down [E, F, D] (or [L, E, ...] stacks with `layer` picking one) to [T, D].

- ragged:  tokens sorted by expert through jax.lax.ragged_dot (grouped matmul; GPU/TPU).
- chunked: exact per-expert chunked matmuls with a hand-written VJP (CPU, where ragged_dot is slow).
- dense:   every expert on every token, then masked (the test oracle).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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


