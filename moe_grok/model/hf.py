"""Hugging Face OLMoE checkpoint -> moe_grok params, as a key map plus transposes.

`load_hf(path_or_repo, revision=None, dtype=..., mesh=None)` reads config.json and the
safetensors file(s) (single or sharded with model.safetensors.index.json), in either expert
layout (hub: per-expert `experts.{e}.{gate,up,down}_proj.weight`; fused in memory by newer
transformers: `experts.gate_up_proj [E, 2F, D]` gate rows first, `experts.down_proj [E, D, F]`).
Every parameter is built with `jax.make_array_from_callback`, so each device shard is read
straight from the (memory-mapped) files: no second full copy of the model is ever held.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from moe_grok.config import MoEConfig
from moe_grok.model import params as params_lib
from moe_grok.model.layers import EXPERT_WEIGHTS

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (missing/extra keys, wrong shapes, bad config)."""


# ----------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------
def resolve_checkpoint_dir(path_or_repo: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a hub repo id downloaded with huggingface_hub."""
    if os.path.isdir(path_or_repo):
        if revision is not None:
            raise CheckpointError(f"{path_or_repo!r} is a local directory; revision={revision!r} applies to hub repos")
        return path_or_repo
    try:
        import huggingface_hub
    except ImportError as err:
        raise CheckpointError(f"{path_or_repo!r} is not a local directory and huggingface_hub is not installed "
                              "(pip install huggingface_hub) to fetch it from the hub") from err
    try:
        return huggingface_hub.snapshot_download(path_or_repo, revision=revision,
                                                 allow_patterns=["*.json", "*.safetensors"])
    except Exception as err:  # hub errors (missing repo/revision, offline) are many types
        raise CheckpointError(f"could not fetch {path_or_repo!r} at revision {revision!r} from the hub: "
                              f"{type(err).__name__}: {err}") from err


def read_hf_config(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in {ckpt_dir}")
    with open(path) as f:
        return json.load(f)


class SafetensorsReader:
    """Lazy, sliceable access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, ckpt_dir: str):
        index_path = os.path.join(ckpt_dir, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(ckpt_dir, SINGLE_FILE)):
            with safe_open(os.path.join(ckpt_dir, SINGLE_FILE), framework="flax") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}")
        self._dir = ckpt_dir
        self._file_of = weight_map
        self._handles: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self._file_of)

    def _handle(self, key: str):
        name = self._file_of[key]
        if name not in self._handles:
            path = os.path.join(self._dir, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{INDEX_FILE} names {name}, which is missing from {self._dir}")
            self._handles[name] = safe_open(path, framework="flax")
        return self._handles[name]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """Host numpy array of tensor[index] (bfloat16 kept as ml_dtypes.bfloat16)."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(self._handle(key).get_slice(key)[index] if index else self._handle(key).get_tensor(key))


# ----------------------------------------------------------------------------------------
# Key map: every moe_grok parameter is a stack over layers (and experts) of HF tensors.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """How to read one HF tensor for one (layer, expert) cell of a moe_grok parameter.

    key: the HF key; index: the part of that tensor to take (fused experts: (expert, rows));
    transpose: HF Linear weights are [out, in], ours are [in, out].
    """

    key: str
    index: tuple = ()
    transpose: bool = True


def _layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def _expert_sources(model_config: MoEConfig, keys: set[str], layer: int) -> dict[str, Callable[[int], Source]]:
    """Per-expert sources for gate/up/down in whichever layout the checkpoint uses."""
    f = model_config.expert_intermediate_size
    fused = _layer_key(layer, "mlp.experts.gate_up_proj")
    if fused in keys:
        down = _layer_key(layer, "mlp.experts.down_proj")
        return {  # fused tensors: [E, 2F, D] and [E, D, F]; expert e is row e of axis 0
            "gate_proj": lambda e: Source(fused, index=(e, slice(0, f))),
            "up_proj": lambda e: Source(fused, index=(e, slice(f, 2 * f))),
            "down_proj": lambda e: Source(down, index=(e,)),
        }
    return {name: (lambda e, name=name: Source(_layer_key(layer, f"mlp.experts.{e}.{name}.weight")))
            for name in EXPERT_WEIGHTS}


def key_map(model_config: MoEConfig, keys: set[str]) -> dict[tuple[str, ...], Callable]:
    """moe_grok param path -> function(layer, expert) -> Source (layer/expert None where absent)."""
    per_layer = {
        ("attn", "q_proj", "kernel"): "self_attn.q_proj.weight",
        ("attn", "k_proj", "kernel"): "self_attn.k_proj.weight",
        ("attn", "v_proj", "kernel"): "self_attn.v_proj.weight",
        ("attn", "o_proj", "kernel"): "self_attn.o_proj.weight",
        ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",
        ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
        ("input_norm", "scale"): "input_layernorm.weight",
        ("post_attention_norm", "scale"): "post_attention_layernorm.weight",
        ("moe", "router"): "mlp.gate.weight",
    }
    mapping: dict[tuple[str, ...], Callable] = {
        ("embed", "embedding"): lambda l, e: Source("model.embed_tokens.weight", transpose=False),
        ("final_norm", "scale"): lambda l, e: Source("model.norm.weight", transpose=False),
    }
    if not model_config.tie_word_embeddings:
        mapping[("lm_head", "kernel")] = lambda l, e: Source("lm_head.weight")
    for path, name in per_layer.items():
        is_matrix = path[-1] != "scale"
        mapping[("layers", *path)] = (lambda l, e, name=name, t=is_matrix: Source(_layer_key(l, name), transpose=t))
    for name in EXPERT_WEIGHTS:
        mapping[("layers", "moe", name)] = (
            lambda l, e, name=name: _expert_sources(model_config, keys, l)[name](e))
    return mapping


def _shard_reader(reader: SafetensorsReader, source_fn: Callable, lead_sizes: tuple[int, ...],
                  stacked_layers: bool, dtype) -> Callable[[tuple], np.ndarray]:
    """make_array_from_callback's callback: shard index (tuple of slices) -> numpy shard.

    lead_sizes: sizes of the stacked leading axes ([L], [L, E] or []); each (layer, expert)
    cell of the shard is read from its own HF tensor, transposed, and cast to dtype.
    """

    def read(index: tuple) -> np.ndarray:
        lead, rest = index[:len(lead_sizes)], index[len(lead_sizes):]
        ranges = [range(*s.indices(n)) for s, n in zip(lead, lead_sizes)]
        cells = []
        for cell_ids in np.ndindex(*map(len, ranges)):
            picks = [r[i] for r, i in zip(ranges, cell_ids)]
            layer = picks[0] if stacked_layers else None
            expert = picks[-1] if len(picks) > stacked_layers else None
            src = source_fn(layer, expert)
            cell = reader.read(src.key, src.index)
            cell = cell.T if src.transpose else cell
            cells.append(np.asarray(cell[rest], dtype=dtype))
        return np.stack(cells).reshape(*map(len, ranges), *cells[0].shape)

    return read


def _cell_shape(path: tuple[str, ...], target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one (layer, expert) cell of a target param: its shape minus stacked axes."""
    return target_shape[(path[0] == "layers") + (path[-1] in EXPERT_WEIGHTS):]


def validate_keys(model_config: MoEConfig, reader: SafetensorsReader) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys and shape mismatches."""
    keys = reader.keys()
    shapes = param_shape_dict(model_config)
    mapping = key_map(model_config, keys)
    needed: dict[str, tuple] = {}
    for path, fn in mapping.items():
        layers = range(model_config.num_layers) if path[0] == "layers" else [None]
        experts = range(model_config.num_experts) if path[-1] in EXPERT_WEIGHTS else [None]
        cell = _cell_shape(path, shapes[path])
        for layer in layers:
            for expert in experts:
                src = fn(layer, expert)
                needed.setdefault(src.key, (path, src, cell[::-1] if src.transpose else cell))
    missing = sorted(set(needed) - keys)
    unexpected = sorted(k for k in keys - set(needed) if not k.endswith("rotary_emb.inv_freq"))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    for key, (path, src, want) in needed.items():
        if key in keys:
            got = reader.shape(key)
            if src.index:  # fused expert tensors: check the whole tensor
                f, e, d = model_config.expert_intermediate_size, model_config.num_experts, model_config.hidden_size
                want = (e, 2 * f, d) if key.endswith("gate_up_proj") else (e, d, f)
            if got != want:
                problems.append(f"{key}: shape {got} does not match config (expected {want} for {'/'.join(path)})")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems[:12]))


def param_shape_dict(model_config: MoEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params_lib.param_shapes(model_config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_hf(path_or_repo: str, revision: str | None = None, dtype=jnp.float32,
            mesh: jax.sharding.Mesh | None = None, **config_overrides) -> tuple[MoEConfig, dict]:
    """Read an OLMoE HF checkpoint into (MoEConfig, params) with params in `dtype`.

    With a mesh, each parameter is created directly in its shards (experts over the
    "expert" axis); without one, on the default device.
    """
    ckpt_dir = resolve_checkpoint_dir(path_or_repo, revision)
    dtype = jnp.dtype(dtype)
    model_config = MoEConfig.from_hf_config(read_hf_config(ckpt_dir), dtype=dtype.name, **config_overrides)
    reader = SafetensorsReader(ckpt_dir)
    validate_keys(model_config, reader)
    shardings = params_lib.param_shardings(model_config, mesh)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mapping = key_map(model_config, reader.keys())
    shapes = params_lib.param_shapes(model_config)

    def build(path, leaf, sharding=None):
        name = tuple(k.key for k in path)
        stacked_layers = name[0] == "layers"
        lead_sizes = leaf.shape[:stacked_layers + (name[-1] in EXPERT_WEIGHTS)]
        callback = _shard_reader(reader, mapping[name], lead_sizes, stacked_layers, dtype)
        return jax.make_array_from_callback(leaf.shape, sharding or default, callback)

    if shardings is None:
        params = jax.tree_util.tree_map_with_path(build, shapes)
    else:
        params = jax.tree_util.tree_map_with_path(build, shapes, shardings)
    return model_config, params
