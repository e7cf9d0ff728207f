"""Routing kernel, effective dimension and the generalization bound (docs/method.md, "Theory").

One-layer MoE with a frozen router: F(x) = sum_j g_j(x) f_j(x). Its NTK with respect to the
expert parameters is the routing kernel

    Theta(x, x') = sum_j g_j(x) g_j(x') K_j(x, x'),      K_j = NTK of expert j,

and the Gram matrix H_ab = Theta(x_a, x_b) on the n training inputs controls kernel ridge
regression:  E <= C1 lam^2/n y^T (H + lam I)^-2 y + s^2 Tr(H (H + lam I)^-1)/n + s^2 log(1/delta)/n.

Everything is float32 internally with HIGHEST matmul precision. Gram builders work on row
blocks (never an [experts, n, n] tensor for the analytic kernel) and take ``mesh``: rows are
split over the mesh's data axis with ``shard_map``; results equal the single-device ones.
Spectral quantities share one ``eigh`` through ``KernelSpectrum``; no matrix is inverted.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moe_grok.sharding import data_axis, data_axis_size, round_up_to_data_axis, shard_batch

HIGHEST = jax.lax.Precision.HIGHEST
_NORM_FLOOR = 1e-30  # keeps zero (padding) rows finite in the angle computation


# ----------------------------------------------------------------------------- row blocking
def _map_row_blocks(block_fn, rows, cols, *, block_size: int | None, mesh: Mesh | None):
    """Evaluate ``block_fn(row_block, cols) -> [b, ...]`` over row blocks and stack to [n, ...].

    ``rows``: tuple of arrays sharing leading axis n; ``cols``: tuple of arrays seen whole by
    every block. Rows are zero-padded to (data shards x blocks x block_size) and the padding
    is cut off the result. With ``mesh`` each data shard maps over its own rows.
    """
    n = rows[0].shape[0]
    shards = data_axis_size(mesh)
    rows_per_shard = -(-n // shards)
    block = min(block_size or rows_per_shard, rows_per_shard)
    blocks_per_shard = -(-rows_per_shard // block)
    padded = shards * blocks_per_shard * block
    rows = tuple(jnp.pad(a, [(0, padded - n)] + [(0, 0)] * (a.ndim - 1)) for a in rows)

    def local(local_rows, local_cols):
        blocked = tuple(a.reshape(blocks_per_shard, block, *a.shape[1:]) for a in local_rows)
        out = jax.lax.map(lambda r: block_fn(r, local_cols), blocked)
        return out.reshape(blocks_per_shard * block, *out.shape[2:])

    if mesh is None:
        out = local(rows, cols)
    else:
        split = P(data_axis(mesh))
        row_specs = tuple(split for _ in rows)
        col_specs = tuple(P() for _ in cols)
        out = jax.shard_map(local, mesh=mesh, in_specs=(row_specs, col_specs), out_specs=split)(rows, cols)
    return out[:n]


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ----------------------------------------------------------------------------- analytic NTK
def _relu_ntk_block(x, x2, train_output: bool):
    """Arc-cosine NTK on one block: x [b, d], x2 [m, d] -> [b, m]."""
    d = x.shape[-1]
    inner = jnp.dot(x, x2.T, precision=HIGHEST)
    norms = jnp.sqrt(jnp.sum(x * x, -1))[:, None] * jnp.sqrt(jnp.sum(x2 * x2, -1))[None, :]
    cos = jnp.clip(inner / jnp.maximum(norms, _NORM_FLOOR), -1.0, 1.0)
    theta = jnp.arccos(cos)
    kernel = inner * (jnp.pi - theta) / (2 * jnp.pi)  # hidden layer: E[a^2 1{w.x>0} 1{w.x'>0}] x.x'
    if train_output:  # output layer: E[relu(w.x) relu(w.x')]
        kernel = kernel + norms * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2 * jnp.pi)
    return kernel / d


@functools.partial(jax.jit, static_argnames=("train_output", "block_size", "mesh"))
def _relu_ntk(x, x2, train_output, block_size, mesh):
    x, x2 = _f32(x, x2)
    return _map_row_blocks(
        lambda r, c: _relu_ntk_block(r[0], c[0], train_output), (x,), (x2,), block_size=block_size, mesh=mesh
    )


def relu_ntk(x, x2=None, *, train_output: bool = True, block_size: int | None = None, mesh: Mesh | None = None):
    """Infinite-width NTK of a one-hidden-layer ReLU network. x [n, d], x2 [m, d] -> [n, m].

    Network (NTK parameterization, no biases, every parameter initialized N(0, 1)):
        f(x) = (1/sqrt(m)) sum_r a_r relu(w_r . x / sqrt(d)),   a_r ~ N(0, 1), w_r ~ N(0, I_d).
    With theta the angle between x and x':
        hidden layer (w trained):  (x.x'/d) (pi - theta) / (2 pi)
        output layer (a trained):  (|x||x'|/d) (sin theta + (pi - theta) cos theta) / (2 pi)
    ``train_output=True`` (both layers trained) returns the sum; False returns only the hidden
    term (output weights frozen at init). ``x2=None`` means x2 = x.
    float32: arccos amplifies cos round-off near theta = 0, so (near-)parallel pairs, e.g. the
    Gram diagonal, carry up to ~3e-4 relative error in the hidden-layer term.
    """
    return _relu_ntk(x, x if x2 is None else x2, train_output, block_size, mesh)


# ----------------------------------------------------------------------------- empirical NTK
def _per_example_grads(apply_fn, params, xb):
    """Per-example parameter gradients of a scalar-output apply_fn: pytree of [b, *leaf]."""
    scalar = lambda p, xi: jnp.reshape(apply_fn(p, xi[None]), ())
    return jax.vmap(jax.grad(scalar), in_axes=(None, 0))(params, xb)


@functools.partial(jax.jit, static_argnums=0)
def _empirical_ntk_block(apply_fn, params, x_rows, x_cols):
    j_rows = _per_example_grads(apply_fn, params, x_rows)
    j_cols = _per_example_grads(apply_fn, params, x_cols)
    blocks = [
        jnp.dot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1).T, precision=HIGHEST)
        for a, b in zip(jax.tree.leaves(j_rows), jax.tree.leaves(j_cols), strict=False)
    ]
    return sum(blocks)


def _pad_rows(x, size):
    return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def empirical_ntk(apply_fn: Callable, params, x, x2=None, *, batch_size: int = 64, mesh: Mesh | None = None):
    """Empirical NTK <df(x)/dparams, df(x2)/dparams> of a scalar-output function -> [n, m].

    ``apply_fn(params, xb [b, ...]) -> [b]`` (or [b, 1]); ``params`` is the pytree of TRAINED
    parameters only (close frozen ones, e.g. a router, over in apply_fn). Per-example
    Jacobians are built with vmap(grad) on row/column blocks of ``batch_size`` and contracted
    leaf by leaf, so memory is O(batch_size x num_params). With ``mesh`` each row block is
    split over the data axis. Blocks are padded to a fixed size (one compilation).
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    x = jnp.asarray(x, jnp.float32)
    x2 = x if x2 is None else jnp.asarray(x2, jnp.float32)
    row_block = round_up_to_data_axis(min(batch_size, x.shape[0]), mesh)
    col_block = min(batch_size, x2.shape[0])
    rows_out = []
    for r0 in range(0, x.shape[0], row_block):
        x_rows = shard_batch(_pad_rows(x[r0 : r0 + row_block], row_block), mesh)
        cols_out = []
        for c0 in range(0, x2.shape[0], col_block):
            x_cols = _pad_rows(x2[c0 : c0 + col_block], col_block)
            block = _empirical_ntk_block(apply_fn, params, x_rows, x_cols)
            cols_out.append(block[:, : min(col_block, x2.shape[0] - c0)])
        rows_out.append(jnp.concatenate(cols_out, axis=1)[: min(row_block, x.shape[0] - r0)])
    return jnp.concatenate(rows_out, axis=0)


# ----------------------------------------------------------------------------- routing Gram
@functools.partial(jax.jit, static_argnames=("shared", "block_size", "mesh"))
def _routing_gram_from_array(gates, kernels, gates2, shared, block_size, mesh):
    gates, kernels, gates2 = _f32(gates, kernels, gates2)
    if shared:  # kernels [n, m]
        block_fn = lambda r, c: jnp.dot(r[0], c[0].T, precision=HIGHEST) * r[1]
        return _map_row_blocks(block_fn, (gates, kernels), (gates2,), block_size=block_size, mesh=mesh)
    kernels = jnp.moveaxis(kernels, 0, 1)  # [n, experts, m]: rows first for blocking
    block_fn = lambda r, c: jnp.einsum("ie,je,iej->ij", r[0], c[0], r[1], precision=HIGHEST)
    return _map_row_blocks(block_fn, (gates, kernels), (gates2,), block_size=block_size, mesh=mesh)


@jax.jit
def _routing_block_from_kernels(gates_rows, gates2, kernel_rows):
    gates_rows, gates2, kernel_rows = _f32(gates_rows, gates2, kernel_rows)
    if kernel_rows.ndim == 2:
        return jnp.dot(gates_rows, gates2.T, precision=HIGHEST) * kernel_rows
    return jnp.einsum("ie,je,eij->ij", gates_rows, gates2, kernel_rows, precision=HIGHEST)


def routing_gram(gates, expert_kernels, gates2=None, *, block_size: int | None = None, mesh: Mesh | None = None):
    """Routing-kernel Gram H_ab = sum_j g_j(x_a) g_j(x'_b) K_j(x_a, x'_b). gates [n, E] -> [n, m].

    ``expert_kernels`` is one of
      * [E, n, m]: one kernel per expert (e.g. per-expert ``empirical_ntk``);
      * [n, m]: one kernel shared by all experts, so H = (G G'^T) * K (elementwise);
      * a callable ``(row_start, row_stop) -> [E, b, m] or [b, m]`` giving the kernel rows of
        one block on demand, evaluated block by block (``block_size`` rows, default 1024) so
        only one block is in memory; ``mesh`` is ignored here (the callable places its data).
    ``gates2`` [m, E] defaults to ``gates`` (square Gram). Array inputs are row-blocked and
    sharded over ``mesh``'s data axis.
    """
    gates2 = gates if gates2 is None else gates2
    if callable(expert_kernels):
        block = block_size or 1024
        n = gates.shape[0]
        return jnp.concatenate(
            [
                _routing_block_from_kernels(gates[r0 : r0 + block], gates2, expert_kernels(r0, min(r0 + block, n)))
                for r0 in range(0, n, block)
            ],
            axis=0,
        )
    shared = jnp.ndim(expert_kernels) == 2
    return _routing_gram_from_array(gates, expert_kernels, gates2, shared, block_size, mesh)


@functools.partial(jax.jit, static_argnames=("train_output", "block_size", "mesh"))
def _routing_relu_ntk_gram(gates, x, gates2, x2, train_output, block_size, mesh):
    gates, x, gates2, x2 = _f32(gates, x, gates2, x2)

    def block_fn(r, c):
        return jnp.dot(r[0], c[0].T, precision=HIGHEST) * _relu_ntk_block(r[1], c[1], train_output)

    return _map_row_blocks(block_fn, (gates, x), (gates2, x2), block_size=block_size, mesh=mesh)


def routing_relu_ntk_gram(
    gates, x, gates2=None, x2=None, *,
    train_output: bool = True, block_size: int | None = 1024, mesh: Mesh | None = None,
):
    """Routing Gram of a one-layer MoE of one-hidden-layer ReLU experts, infinite width.

    gates [n, E], x [n, d] (gates2 [m, E], x2 [m, d] default to them) -> H [n, m].
    Experts share one architecture and differ only in their (random) weights, so their
    infinite-width NTK is the same ``relu_ntk`` K for all of them and H = (G G'^T) * K.
    Each [block_size, m] block of H is computed directly from gates and features, so n = 10k
    needs only the [n, n] output (never [E, n, n]). A finite network's per-expert empirical
    NTKs differ; use ``routing_gram`` with ``empirical_ntk`` kernels for those.
    """
    gates2 = gates if gates2 is None else gates2
    x2 = x if x2 is None else x2
    return _routing_relu_ntk_gram(gates, x, gates2, x2, train_output, block_size, mesh)


@functools.partial(jax.jit, static_argnames=("block_size", "mesh"))
def _multilayer_routing_gram(mean_weights, base_kernels, mean_weights2, block_size, mesh):
    mean_weights, mean_weights2 = _f32(mean_weights, mean_weights2)
    if base_kernels is None:  # sum_l G_l G_l'^T = flattened [n, L*E] inner products
        flat = lambda w: w.reshape(w.shape[0], -1)
        block_fn = lambda r, c: jnp.dot(r[0], c[0].T, precision=HIGHEST)
        rows, cols = (flat(mean_weights),), (flat(mean_weights2),)
        return _map_row_blocks(block_fn, rows, cols, block_size=block_size, mesh=mesh)
    (base_kernels,) = _f32(base_kernels)
    if base_kernels.ndim == 3:  # [L, n, m] -> rows first
        base_kernels = jnp.moveaxis(base_kernels, 0, 1)
        block_fn = lambda r, c: jnp.einsum("ile,jle,ilj->ij", r[0], c[0], r[1], precision=HIGHEST)
    else:  # one [n, m] kernel shared by all layers
        block_fn = lambda r, c: jnp.einsum("ile,jle->ij", r[0], c[0], precision=HIGHEST) * r[1]
    return _map_row_blocks(block_fn, (mean_weights, base_kernels), (mean_weights2,), block_size=block_size, mesh=mesh)


def multilayer_routing_gram(
    mean_weights, base_kernels=None, mean_weights2=None, *, block_size: int | None = 1024, mesh: Mesh | None = None
):
    """Multi-layer routing Gram H = sum_l (G_l G_l'^T) * K_l. mean_weights [n, L, E] -> [n, m].

    G_l [n, E] are the token-mean router softmax weights of layer l (what pathway strings are
    built from); ``mean_weights2`` [m, L, E] defaults to ``mean_weights``. ``base_kernels``:
    None (K_l = all ones: pure routing overlap), [n, m] shared by all layers, or [L, n, m].
    Assumptions (lazy / shared-NTK approximation): within a layer all experts share one
    kernel K_l on the layer's input, so experts differ only through routing; the layers'
    contributions add independently (cross-layer Jacobian terms are ignored).
    """
    mean_weights2 = mean_weights if mean_weights2 is None else mean_weights2
    return _multilayer_routing_gram(mean_weights, base_kernels, mean_weights2, block_size, mesh)


# ----------------------------------------------------------------------------- spectrum & bound
class KernelSpectrum(NamedTuple):
    """eigh of a symmetric PSD Gram: eigenvalues [n] (clipped at 0), eigenvectors [n, n] (columns)."""

    eigenvalues: jax.Array
    eigenvectors: jax.Array


class GeneralizationBound(NamedTuple):
    """Terms of the bound (all floats, units of squared error). total = c1 * bias + variance + confidence."""

    bias: jax.Array  # lam^2/n y^T (H + lam I)^-2 y   (without C1)
    variance: jax.Array  # s^2 Tr(H (H + lam I)^-1) / n
    confidence: jax.Array  # s^2 log(1/delta) / n
    total: jax.Array
    effective_dimension: jax.Array  # Tr(H (H + lam I)^-1)


@jax.jit
def kernel_spectrum(gram) -> KernelSpectrum:
    """Eigendecomposition of a Gram H [n, n] (symmetrized, float32); negative round-off clipped to 0."""
    (gram,) = _f32(gram)
    eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (gram + gram.T))
    return KernelSpectrum(jnp.maximum(eigenvalues, 0.0), eigenvectors)


def _as_spectrum(gram_or_spectrum) -> KernelSpectrum:
    if isinstance(gram_or_spectrum, KernelSpectrum):
        return gram_or_spectrum
    return kernel_spectrum(gram_or_spectrum)


def _broadcast(eigenvalues, lam):
    """(mu [n, 1, ...], lam [*]) so that mu + lam is [n, *lam.shape]."""
    lam = jnp.asarray(lam, jnp.float32)
    return eigenvalues.reshape(eigenvalues.shape + (1,) * lam.ndim), lam


@jax.jit
def _effective_dimension(spectrum, lam):
    mu, lam = _broadcast(spectrum.eigenvalues, lam)
    return jnp.sum(mu / (mu + lam), axis=0)


def effective_dimension(gram_or_spectrum, lam):
    """d_eff = Tr(H (H + lam I)^-1) = sum_k mu_k / (mu_k + lam). lam scalar or [k] -> same shape."""
    return _effective_dimension(_as_spectrum(gram_or_spectrum), lam)


@jax.jit
def _bias_term(spectrum, y, lam):
    (y,) = _f32(y)
    n = y.shape[0]
    projections = jnp.dot(spectrum.eigenvectors.T, y.reshape(n, -1), precision=HIGHEST)  # [n, outputs]
    energy, lam = _broadcast(jnp.sum(projections**2, axis=1), lam)  # |u_k^T y|^2 summed over outputs
    mu, _ = _broadcast(spectrum.eigenvalues, lam)
    return lam**2 / n * jnp.sum(energy / (mu + lam) ** 2, axis=0)


def bias_term(gram_or_spectrum, y, lam):
    """lam^2/n y^T (H + lam I)^-2 y (no C1). y [n] or [n, outputs] (summed over outputs)."""
    return _bias_term(_as_spectrum(gram_or_spectrum), y, lam)


def variance_term(gram_or_spectrum, lam, noise_std):
    """s^2 Tr(H (H + lam I)^-1) / n, s = noise_std (label-noise standard deviation)."""
    spectrum = _as_spectrum(gram_or_spectrum)
    n = spectrum.eigenvalues.shape[0]
    return noise_std**2 * _effective_dimension(spectrum, lam) / n


def generalization_bound(gram_or_spectrum, y, lam, noise_std, delta, c1: float = 1.0) -> GeneralizationBound:
    """Bound on the excess risk that holds with probability 1 - delta (one shared eigh).

    E <= c1 lam^2/n y^T (H + lam I)^-2 y + s^2 Tr(H (H + lam I)^-1)/n + s^2 log(1/delta)/n.
    H [n, n] or its ``KernelSpectrum``; y [n] or [n, outputs]; lam > 0 scalar or [k].
    """
    spectrum = _as_spectrum(gram_or_spectrum)
    n = spectrum.eigenvalues.shape[0]
    d_eff = _effective_dimension(spectrum, lam)
    bias = _bias_term(spectrum, y, lam)
    variance = noise_std**2 * d_eff / n
    confidence = jnp.full_like(variance, noise_std**2 * math.log(1.0 / delta) / n)
    return GeneralizationBound(bias, variance, confidence, c1 * bias + variance + confidence, d_eff)


def kernel_ridge_predict(gram_or_spectrum, y, cross_gram, lam):
    """Kernel ridge regression predictions cross_gram (H + lam I)^-1 y via the spectrum.

    H [n, n] (train) or its spectrum, y [n] or [n, outputs], cross_gram [m, n] (test x train)
    -> [m] or [m, outputs]. Scalar lam.
    """
    spectrum = _as_spectrum(gram_or_spectrum)
    y32, cross32 = _f32(y, cross_gram)
    u = spectrum.eigenvectors
    projections = jnp.dot(u.T, y32.reshape(y32.shape[0], -1), precision=HIGHEST)
    coeffs = jnp.dot(u, projections / (spectrum.eigenvalues[:, None] + lam), precision=HIGHEST)
    return jnp.dot(cross32, coeffs, precision=HIGHEST).reshape((cross32.shape[0],) + y32.shape[1:])


# ----------------------------------------------------------------------------- along checkpoints
def routing_bounds_along_checkpoints(mean_weights_per_checkpoint, y, lam, noise_std, delta, c1: float = 1.0,
                                     mesh: Mesh | None = None) -> list[GeneralizationBound]:
    """The bound of `multilayer_routing_gram` (K_l = 1) at each checkpoint, for fixed samples.

    mean_weights_per_checkpoint: sequence of [n, L, E] token-mean routing weights of the same
    n samples at successive checkpoints; y: [n] or [n, outputs] targets. Under the frozen-
    router assumption each checkpoint's routing is treated as if frozen from then on.
    """
    return [generalization_bound(multilayer_routing_gram(w, mesh=mesh), y, lam, noise_std, delta, c1)
            for w in mean_weights_per_checkpoint]
