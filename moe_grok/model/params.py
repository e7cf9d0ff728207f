"""The public parameter tree and what takes it: init, shapes, mesh shardings, forward.

Public layout (what conversion, checkpoints and theory see): layers stacked on a leading [L]
axis under ``layers/``, the expert stacks at ``layers/moe/{gate,up,down}_proj`` [L, E, ...]
as HF nests them. The Flax module declares the expert stacks outside its layer scan
(``experts/``); ``_module_layout`` / ``_public_layout`` translate between the two.

With dense layers (MoEConfig.dense_layers, Qwen3-MoE) everything under ``layers/moe/`` is
stacked over the MoE layers only (router [L_moe, D, E], experts [L_moe, E, ...]) and the dense
MLPs sit at ``layers/mlp/{gate,up,down}_proj`` [L_dense, ...]; the module keeps those stacks
in ``mixed_mlp/``. `lead_axes` names the leading stack axes of a parameter.

MoEConfig.expert_layout says where the experts are. "stacked" (above): [L_moe, E, in, out]
stacks, read by the layer scan. "per_layer": no stacks at ``layers/moe/{gate,up,down}_proj``;
instead ``experts/<i>/{gate,up}_proj`` [E, F, D] and ``experts/<i>/down_proj`` [E, D, F], one
array per MoE layer i (its index among the MoE layers) stored [out, in] as HF stores them, and
`forward` runs the layers unrolled (modules ``layers_<i>``, each given its slice of the other
``layers/`` stacks, which are small): each layer's dot reads its experts where they lie, while
XLA's CPU backend copies a slice of a stack before a dot (894 ms against 108 ms for one OLMoE
layer's experts, docs/benchmarks.md). Loaders build the per-layer arrays directly (`hf.load_hf`,
`checkpoint_io.restore_params`); `to_expert_layout` converts a tree in memory.
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_grok.config import MoEConfig
from moe_grok.model.layers import (
    DENSE_MLP_WEIGHTS,
    EXPERT_WEIGHTS,
    LOGICAL_RULES,
    ModelOutput,
    MoETransformer,
    PerLayerExperts,
)

EXPERTS = "experts"  # the per-layer experts' subtree of the public tree: experts/<i>/<weight> ("per_layer")


def lead_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    """The leading stack axes of the public parameter at `path`: ("layer", "expert") for expert
    stacks (layers/moe/{gate,up,down}_proj), ("layer",) for the rest under layers/, ("expert",)
    for one layer's experts (experts/<i>/...), else ()."""
    if path[0] == EXPERTS:
        return ("expert",)
    if path[0] != "layers":
        return ()
    return ("layer", "expert") if path[1] == "moe" and path[-1] in EXPERT_WEIGHTS else ("layer",)


def stacked_axes(path: tuple[str, ...]) -> int:
    """How many leading axes of the public parameter at `path` are stacks (`lead_axes`)."""
    return len(lead_axes(path))


def _public_layout(module_params):
    """The module's tree -> the public one: ExpertStacks' weights go to layers/moe/ (HF's nesting),
    MixedMLPStacks' router to layers/moe/router and its dense MLPs to layers/mlp/."""
    params = dict(module_params)
    layers = dict(params["layers"])
    layers["moe"] = {**layers.get("moe", {}), **params.pop("experts")}
    if "mixed_mlp" in params:
        mixed = dict(params.pop("mixed_mlp"))
        layers["moe"]["router"] = mixed.pop("router")
        layers["mlp"] = {name: mixed.pop(name) for name in DENSE_MLP_WEIGHTS}
    params["layers"] = layers
    return params


def _module_layout(model_config: MoEConfig, params):
    """The public tree -> the module's: layers/moe/{gate,up,down}_proj back to experts/ (and with
    dense layers layers/moe/router and layers/mlp/ back to mixed_mlp/). "per_layer": experts/
    as it is, and layer i's slice of every layers/ stack as layers_<i> (static slices of the
    small stacks, taken inside the caller's jit)."""
    params = dict(params)
    layers = dict(params["layers"])
    moe = dict(layers.pop("moe"))
    if model_config.expert_layout == "stacked":
        params[EXPERTS] = {name: moe.pop(name) for name in EXPERT_WEIGHTS}
    if "mlp" in layers:
        params["mixed_mlp"] = {"router": moe.pop("router"), **layers.pop("mlp")}
    if moe:
        layers["moe"] = moe
    if model_config.expert_layout == "stacked":
        params["layers"] = layers
        return params
    del params["layers"]
    for i in range(model_config.num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    return params


def _stacked(model_config: MoEConfig) -> MoEConfig:
    return model_config.replace(expert_layout="stacked")


def _abstract_boxed_params(model_config: MoEConfig):
    """The public tree of jax.ShapeDtypeStruct boxed with logical axis names. A "per_layer" tree is
    the stacked one with the expert stacks replaced by PerLayerExperts' arrays."""
    model = MoETransformer(_stacked(model_config))
    tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))["params"]
    boxed = _public_layout(boxed)
    if model_config.expert_layout == "per_layer":
        boxed = _without_expert_stacks(boxed)
        boxed[EXPERTS] = jax.eval_shape(lambda: PerLayerExperts(model_config).init(jax.random.key(0)))["params"]
    return boxed


def _without_expert_stacks(params):
    """A shallow copy of a public tree without layers/moe/{gate,up,down}_proj."""
    params, layers = dict(params), dict(params["layers"])
    layers["moe"] = {name: value for name, value in layers["moe"].items() if name not in EXPERT_WEIGHTS}
    params["layers"] = layers
    return params


def to_expert_layout(model_config: MoEConfig, params, layout: str):
    """(MoEConfig, params) with the experts in `layout` (MoEConfig.expert_layout): stacks
    [L_moe, E, in, out] split into per-layer [E, out, in] arrays, or the other way. Holds both
    forms of the experts until it returns (init and small models; the loaders build the
    per-layer form directly)."""
    if layout == model_config.expert_layout:
        return model_config, params
    if layout == "per_layer":
        stacks = params["layers"]["moe"]
        per_layer = {str(i): {name: jnp.swapaxes(stacks[name][i], -1, -2) for name in EXPERT_WEIGHTS}
                     for i in range(model_config.num_moe_layers)}
        return model_config.replace(expert_layout=layout), {**_without_expert_stacks(params), EXPERTS: per_layer}
    out = {name: value for name, value in params.items() if name != EXPERTS}
    out["layers"] = dict(out["layers"])
    out["layers"]["moe"] = {**out["layers"]["moe"],
                            **{name: jnp.stack([jnp.swapaxes(params[EXPERTS][str(i)][name], -1, -2)
                                                for i in range(model_config.num_moe_layers)])
                               for name in EXPERT_WEIGHTS}}
    return model_config.replace(expert_layout=layout), out


def param_shapes(model_config: MoEConfig):
    """Pytree of jax.ShapeDtypeStruct for the model's parameters (no allocation)."""
    return nn.meta.unbox(_abstract_boxed_params(model_config))


def param_shardings(model_config: MoEConfig, mesh: jax.sharding.Mesh | None):
    """Pytree of NamedSharding (experts over the mesh's "expert" axis, the rest replicated)."""
    if mesh is None:
        return None
    specs = nn.get_partition_spec(_abstract_boxed_params(model_config))
    rules = tuple((logical, axis if axis in mesh.axis_names else None) for logical, axis in LOGICAL_RULES)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_params(model_config: MoEConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None):
    """Random parameters (normal(init_std), norms at 1) as a plain pytree, sharded if a mesh is given."""
    model = MoETransformer(_stacked(model_config))

    def init(key):  # "per_layer": the stacked model's values, split (the same model)
        params = _public_layout(nn.meta.unbox(model.init(key, jnp.zeros((1, 2), jnp.int32))["params"]))
        return to_expert_layout(_stacked(model_config), params, model_config.expert_layout)[1]

    return jax.jit(init, out_shardings=param_shardings(model_config, mesh))(rng)


def first_nonfinite_cell(array: jax.Array, lead_axes: int = 0) -> tuple[int, ...] | None:
    """Index over the first `lead_axes` axes (e.g. (layer, expert)) of the first cell of `array`
    holding a NaN or inf; () when lead_axes = 0; None when every value is finite.

    Checked on the host, shard by shard and cell by cell, on the bits (exponent all ones):
    on CPU the shards are read in place, and nothing of the array's size is allocated
    (a jitted isfinite().all() makes XLA's CPU backend materialize a float32 or boolean copy).
    """
    unsigned = np.dtype(f"uint{8 * array.dtype.itemsize}")
    exponent = np.array(np.inf, array.dtype).view(unsigned)  # +inf: every exponent bit set
    for shard in array.addressable_shards:
        bits = np.asarray(shard.data).view(unsigned)
        offsets = [s.indices(n)[0] for s, n in zip(shard.index[:lead_axes], array.shape, strict=False)]
        for cell in np.ndindex(bits.shape[:lead_axes]):
            if bits[cell].size and np.bitwise_and(bits[cell], exponent).max() == exponent:
                return tuple(int(o + i) for o, i in zip(offsets, cell, strict=True))
    return None


def router_matrices(params) -> jax.Array:
    """Router weight matrices W_l with experts as rows: [L_moe, E, D] (row k = expert embedding v_lk),
    one per MoE (routing) layer."""
    return jnp.swapaxes(params["layers"]["moe"]["router"], -1, -2)


def forward(model_config: MoEConfig, params, tokens, mask=None, with_lm_head: bool = True,
            mesh: jax.sharding.Mesh | None = None) -> ModelOutput:
    """Apply the model to tokens [B, S] (mask [B, S], 1 = real token); un-jitted, jit at the caller's boundary.

    mesh: run the expert dispatch expert-parallel over it (batch split over every mesh axis,
    `sharding.model_batch_sharding`; experts as `param_shardings`); None = one device.
    Router logits are [B, S, L_moe, E]: one per MoE layer (`MoEConfig.moe_layers`).
    """
    # Shape checks run once at trace time (no cost inside jit).
    chex.assert_rank(tokens, 2)
    chex.assert_type(tokens, int)
    if mask is not None:
        chex.assert_equal_shape([tokens, mask])
    return MoETransformer(model_config, mesh).apply({"params": _module_layout(model_config, params)}, tokens, mask,
                                                    with_lm_head=with_lm_head)
