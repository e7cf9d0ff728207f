"""Routing extraction: one forward pass gives every sample's routing and (optionally) its loss.

`routing_stats` is the pure per-batch function; `make_extractor` jits it (optionally over a
mesh: batch over "data", experts over "expert"); `extract_dataset` streams a whole dataset
through it in fixed-shape batches with a progress bar and returns host numpy arrays;
`extract_splits` streams several splits together.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from moe_grok import sharding
from moe_grok.analysis.pathways import check_nonempty, token_mean_weights
from moe_grok.config import MoEConfig
from moe_grok.data.splits import next_token_targets
from moe_grok.model import params as params_lib
from moe_grok.model.layers import select_experts
from moe_grok.writers.progress import track


class RoutingStats(NamedTuple):
    """Per-sample outputs of one pass. Shapes for a batch of B samples, S tokens."""

    # L: the MoE (routing) layers, MoEConfig.num_moe_layers; dense-MLP layers (Qwen3-MoE's mlp_only_layers) have none.
    mean_weights: jax.Array  # [B, L, E] float32 token-mean router softmax (over ALL experts), real tokens
    scored_mean_weights: jax.Array  # [B, L, E] float32 the same over scored positions (target_mask) only
    routing_entropy: jax.Array  # [B, L] float32 token-mean entropy (nats) of the router softmax, real tokens
    scored_routing_entropy: jax.Array  # [B, L] float32 the same over scored positions (target_mask) only
    loss: jax.Array | None  # [B] float32 mean next-token NLL (nats) over target positions
    correct: jax.Array | None  # [B] float32 fraction of target positions predicted exactly (argmax)
    router_probs: jax.Array | None = None  # [B, S, L, E] float32 (per_token=True)
    top_experts: jax.Array | None = None  # [B, S, L, k] int32 (per_token=True)
    top_weights: jax.Array | None = None  # [B, S, L, k] float32 (per_token=True)


def per_sample_loss(logits, targets, target_mask):
    """Mean NLL and exact-match fraction per sample over target positions.

    logits: [B, S, V]; targets, target_mask: [B, S]. Returns (loss [B], correct [B]) float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = target_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight, axis=1), 1.0)
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weight, axis=1) / count, jnp.sum(hit * weight, axis=1) / count


def routing_stats(model_config: MoEConfig, params, tokens, mask, targets, target_mask,
                  with_loss: bool = True, per_token: bool = False, mesh: jax.sharding.Mesh | None = None
                  ) -> RoutingStats:
    """One forward pass -> RoutingStats. tokens, mask, targets, target_mask: [B, S] (mask 1 =
    real token; target_mask 1 = scored position). Without `with_loss` the LM head is skipped.
    mesh: expert-parallel dispatch over it (`model.params.forward`)."""
    out = params_lib.forward(model_config, params, tokens, mask, with_lm_head=with_loss, mesh=mesh)
    probs = router_softmax(out.router_logits)  # [B, S, L, E]
    loss = correct = None
    if with_loss:
        loss, correct = per_sample_loss(out.logits, targets, target_mask)
    extra = {}
    if per_token:
        top_w, top_idx = select_experts(probs, model_config)
        extra = dict(router_probs=probs, top_experts=top_idx.astype(jnp.int32), top_weights=top_w)
    return RoutingStats(*routing_summary(probs, mask, target_mask), loss, correct, **extra)


def router_softmax(router_logits: jax.Array) -> jax.Array:
    """The router's distribution over ALL experts: float32 softmax of router logits [..., E] over E."""
    return jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)


def routing_summary(probs: jax.Array, mask: jax.Array, target_mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """RoutingStats' routing fields from router probabilities: the one definition of them, which
    routing adapters for other models (moe_grok.monitor) share.

    probs: [B, S, L, E] router softmax over all experts (`router_softmax`); mask: [B, S] 1 = real
    token; target_mask: [B, S] 1 = scored position. Returns (mean_weights [B, L, E],
    scored_mean_weights [B, L, E], routing_entropy [B, L] nats, scored_routing_entropy [B, L] nats),
    float32 token means over the marked positions. A sample without scored positions gets NaN
    scored weights and entropy (0/0), like token_mean_weights.
    """
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny)), axis=-1)  # [B, S, L]
    return (token_mean_weights(probs, mask), token_mean_weights(probs, target_mask),
            _position_mean(entropy, mask), _position_mean(entropy, target_mask))


def _position_mean(values, positions):
    """[B, L] mean of values [B, S, L] over the positions [B, S] marked 1."""
    weight = positions.astype(jnp.float32)
    return jnp.einsum("bsl,bs->bl", values, weight) / jnp.sum(weight, axis=1)[:, None]


@functools.lru_cache(maxsize=16)
def make_extractor(model_config: MoEConfig, mesh: jax.sharding.Mesh | None = None, with_loss: bool = True,
                   per_token: bool = False):
    """Jitted fn(params, tokens, mask, targets, target_mask) -> RoutingStats.

    The same arguments give the same function (kept for the process, 16 at most), so its compiled
    programs are reused: a second `extract_dataset` call, or the next checkpoint of the same
    architecture, compiles nothing. With a mesh, batch inputs/outputs are split over every mesh
    axis (`sharding.model_batch_sharding`), params keep the shardings of `model.param_shardings`
    (experts over "expert") and each device computes only its own experts.
    """

    def fn(params, tokens, mask, targets, target_mask):
        return routing_stats(model_config, params, tokens, mask, targets, target_mask, with_loss, per_token, mesh)

    if mesh is None:
        return jax.jit(fn)
    batch = sharding.model_batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(params_lib.param_shardings(model_config, mesh), batch, batch, batch, batch),
                   out_shardings=batch)


def extract_dataset(model_config: MoEConfig, params, tokens: np.ndarray, mask: np.ndarray | None = None,
                    targets: np.ndarray | None = None, target_mask: np.ndarray | None = None,
                    batch_size: int = 32, mesh: jax.sharding.Mesh | None = None, with_loss: bool = True,
                    per_token: bool = False, extractor=None, progress: bool | str = True) -> dict[str, np.ndarray]:
    """Stream `tokens [N, S]` through the model in fixed-shape batches; return host arrays.

    The last batch is padded (with copies of the first row, then dropped) so every batch has
    one compiled shape; batch_size is rounded up to a multiple of the mesh's device count.
    Returns {"mean_weights": [N, L, E], "loss": [N], "correct": [N], (per_token: ...)}; L counts
    the routing (MoE) layers only, `MoEConfig.num_moe_layers`: a dense-MLP layer routes nothing.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [samples, seq] array, got shape {tokens.shape}")
    if tokens.shape[1] > model_config.max_seq_len:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len "
                         f"{model_config.max_seq_len}")
    if tokens.max() >= model_config.vocab_size or tokens.min() < 0:
        real = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask) != 0
        outside = (tokens >= model_config.vocab_size) | (tokens < 0)
        if not (outside & real).any():  # only padding positions: the split's pad id is the problem
            pad = np.unique(tokens[outside])
            raise ValueError(f"the pad id {pad[:3].tolist()} (at padding positions, mask 0) is not a token id of "
                             f"the model (vocab_size {model_config.vocab_size}): pad with an id below it (pad_id)")
        rows = np.flatnonzero((outside & real).any(axis=1))
        raise ValueError(f"token ids must lie in [0, {model_config.vocab_size}); samples {rows[:10].tolist()} "
                         f"({rows.size} in all) hold ids in [{tokens[real].min()}, {tokens[real].max()}]")
    tokens, mask, targets, target_mask = _split_arrays(tokens, mask, targets, target_mask)
    chex.assert_type([tokens, mask, targets, target_mask], int)
    chex.assert_equal_shape([tokens, mask, targets, target_mask])  # each [samples, seq]
    check_nonempty(mask)
    if with_loss:
        check_targets(targets, target_mask, model_config.vocab_size)
    # An unscored position may hold anything (HF's -100); the gather would turn an out-of-range id into
    # NaN, and NaN * 0 stays NaN: give such positions id 0. Scored positions, the loss, are unchanged.
    targets = np.where(target_mask != 0, targets, 0).astype(np.int32)
    n = tokens.shape[0]
    shards = 1 if mesh is None else mesh.size  # the batch is split over every device
    step = -(-max(batch_size, 1) // shards) * shards
    extractor = extractor or make_extractor(model_config, mesh, with_loss, per_token)  # compiled once per architecture
    chunks: dict[str, list[np.ndarray]] = {}
    batches = track(range(0, n, step), desc=progress if isinstance(progress, str) else "extract",
                    enabled=bool(progress), unit="batch", transient=True)
    for start in batches:
        rows = np.arange(start, start + step)
        rows = np.where(rows < n, rows, 0)
        batch = sharding.shard_batch([a[rows] for a in (tokens, mask, targets, target_mask)], mesh,
                                     None if mesh is None else sharding.model_batch_sharding(mesh))
        stats = extractor(params, *batch)
        valid = min(step, n - start)
        for name, value in stats._asdict().items():
            if value is not None:
                chunks.setdefault(name, []).append(sharding.to_host(value)[:valid])
    result = {name: np.concatenate(parts) for name, parts in chunks.items()}
    if with_loss and not np.isfinite(result["loss"]).all():
        bad = np.flatnonzero(~np.isfinite(result["loss"]))
        raise FloatingPointError(f"non-finite loss for samples {bad[:10].tolist()} (of {bad.size})")
    return result


def tiling_batch_size(rows: int, batch_size: int, shards: int = 1) -> int:
    """The batch size, at most `batch_size` (rounded up to a multiple of `shards`), that covers
    `rows` in as few batches as `batch_size` would, with the least padding: 9,409 rows at 2,048
    take 5 batches of 1,882 (9,410 rows computed) instead of 5 of 2,048 (10,240)."""
    batches = -(-rows // max(batch_size, 1))
    size = -(-rows // batches)
    return -(-size // shards) * shards


def extract_splits(model_config: MoEConfig, params, splits: dict[str, tuple], batch_size: int = 32,
                   mesh: jax.sharding.Mesh | None = None, extractor=None, progress: bool | str = True
                   ) -> dict[str, dict[str, np.ndarray]]:
    """`extract_dataset` of several splits, with the rows of all splits of one sequence length
    streamed together in batches that tile them (`tiling_batch_size`): each split's own last,
    padded batch is not computed. The model is dropless, so a row's outputs do not depend on the
    rows it shares a batch with; the batch size can change them by float rounding, which rarely
    flips a near-tied top-k choice and with it the sample's later layers.

    splits: name -> (tokens [N, S], mask [N, S] or None, targets [N, S] or None, target_mask [N, S]
    or None); None as in extract_dataset (all tokens real; next-token targets).
    Returns name -> extract_dataset's dict for that split's rows, in order.
    """
    by_length: dict[int, list[str]] = {}
    for name, (tokens, *_rest) in splits.items():
        by_length.setdefault(np.shape(tokens)[1], []).append(name)
    shards = 1 if mesh is None else mesh.size
    result = {}
    for names in by_length.values():
        arrays = [_split_arrays(*splits[n]) for n in names]
        joined = [np.concatenate(column) for column in zip(*arrays, strict=True)]
        size = tiling_batch_size(joined[0].shape[0], batch_size, shards)
        out = extract_dataset(model_config, params, *joined, batch_size=size, mesh=mesh, extractor=extractor,
                              progress=progress)
        bounds = np.cumsum([len(a[0]) for a in arrays])[:-1]
        parts = {field: np.split(value, bounds) for field, value in out.items()}
        for index, name in enumerate(names):
            result[name] = {field: part[index] for field, part in parts.items()}
    return {name: result[name] for name in splits}


def check_targets(targets: np.ndarray, target_mask: np.ndarray, vocab_size: int) -> None:
    """ValueError naming the samples whose scored targets (target_mask 1) lie outside [0, vocab_size).

    targets, target_mask: [N, S] int. The loss gathers log-probabilities at the target id, and
    a gather wraps or clamps an out-of-range id: -1 would be scored as the last token of the
    vocabulary, and HF's ignore label -100 as another real token once the vocabulary exceeds 100.
    Unscored positions (target_mask 0) may hold anything."""
    scored = np.asarray(target_mask) != 0
    bad = scored & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        values = np.unique(np.asarray(targets)[bad])
        raise ValueError(f"scored target ids must lie in [0, {vocab_size}) (the vocabulary); samples "
                         f"{rows[:10].tolist()} ({rows.size} in all) hold {values[:5].tolist()} at positions with "
                         "target_mask 1. To leave a position unscored (HF's ignore label -100), set its "
                         "target_mask to 0")


def _split_arrays(tokens, mask, targets, target_mask) -> list[np.ndarray]:
    """[tokens, mask, targets, target_mask] as int32 [N, S], with the defaults of None (all tokens
    real; next-token targets) made explicit: extract_dataset's inputs, and splits ready to join.
    targets and target_mask come together: both None, or both given."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens) if mask is None else np.asarray(mask, np.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
    if (targets is None) != (target_mask is None):
        given, missing = ("targets", "target_mask") if target_mask is None else ("target_mask", "targets")
        raise ValueError(f"{given} given without {missing}: give both (which token is scored at each position, "
                         "and where), or neither for next-token targets over the real tokens")
    if targets is None:
        targets, target_mask = next_token_targets(tokens, mask)
    return [tokens, mask, np.asarray(targets, np.int32), np.asarray(target_mask, np.int32)]
