"""Hugging Face OLMoE checkpoint -> moe_grok params, as a key map plus transposes.

`load_hf(path_or_repo, revision=None, dtype=..., mesh=None)` reads config.json and the
safetensors file(s): model.safetensors if present (as transformers does), else the shards
listed in model.safetensors.index.json. Either expert layout is read (hub: per-expert
`experts.{e}.{gate,up,down}_proj.weight`; fused in memory by newer transformers:
`experts.gate_up_proj [E, 2F, D]` gate rows first, `experts.down_proj [E, D, F]`).

Memory: every parameter (or device shard of one, with a mesh) is filled cell by cell, straight
from memory-mapped file pages, into one page-aligned host buffer that the CPU client adopts
without a copy (`jax.make_array_from_callback`): loading peaks at the weights plus a few
(layer, expert) cells.

Bad input (truncated or corrupt files, an index mapping a key to the wrong shard, invalid
config.json, integer weights, non-finite weights) raises CheckpointError naming the file or
checkpoint and the key, before any parameter is built where possible.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from moe_grok.config import MoEConfig
from moe_grok.model import params as params_lib
from moe_grok.model.layers import EXPERT_WEIGHTS

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# OLMoE config.json keys without a default (MoEConfig.from_hf_config reads them).
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                        "num_experts_per_tok", "intermediate_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted (bad files, missing/extra keys, wrong shapes, bad config)."""


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


def _read_json(path: str, what: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file (and line) if it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON in the {what} (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text ({err.reason})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_hf_config(ckpt_dir: str) -> dict:
    """config.json of an OLMoE checkpoint, checked to be valid JSON with every key moe_grok needs."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in {ckpt_dir}")
    hf = _read_json(path, "model config")
    if hf.get("model_type") != "olmoe":
        raise CheckpointError(f"{path}: unsupported model_type {hf.get('model_type')!r}: moe_grok converts "
                              "'olmoe' checkpoints only")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}; an OLMoE config.json defines all of "
                              f"{list(REQUIRED_CONFIG_KEYS)}")
    return hf


def hf_model_config(ckpt_dir: str, **overrides) -> MoEConfig:
    """The MoEConfig of a local HF checkpoint directory (CheckpointError naming config.json)."""
    hf = read_hf_config(ckpt_dir)
    try:
        return MoEConfig.from_hf_config(hf, **overrides)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'config.json')}: {err}") from None


# ----------------------------------------------------------------------------------------
# Reading safetensors files
# ----------------------------------------------------------------------------------------
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")  # what a weight may be stored as (no integer / quantized tensors)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, safetensors dtype name, shape and absolute byte offset."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a .safetensors file, checked against the file's size (a truncated or
    corrupt file raises CheckpointError naming it, and the tensor its data would lie past)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_size < 0 or header_size > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; its header "
                                  f"length field says {header_size} bytes)")
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_size
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(n) for n in meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r} ({err!r})") from None
        if dtype in _DTYPES and end - begin != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors header: {key!r} of shape {shape} and dtype {dtype} "
                                  f"spans {end - begin} bytes")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes up to {data_start + end}, the file "
                                  f"has {size}")
        tensors[key] = TensorInfo(path, dtype, shape, data_start + begin)
    return tensors


class SafetensorsReader:
    """Lazy, sliceable access to every tensor of a (possibly sharded) safetensors checkpoint.

    model.safetensors wins over an index beside it, as in transformers' from_pretrained.
    Every file's header is read and checked up front.
    """

    def __init__(self, ckpt_dir: str):
        self.directory = ckpt_dir
        single, index_path = os.path.join(ckpt_dir, SINGLE_FILE), os.path.join(ckpt_dir, INDEX_FILE)
        if os.path.exists(single):
            if os.path.exists(index_path):
                logging.warning("%s holds both %s and %s: reading %s, as transformers does", ckpt_dir, SINGLE_FILE,
                                INDEX_FILE, SINGLE_FILE)
            self._tensors = read_safetensors_header(single)
        elif os.path.exists(index_path):
            self._tensors = self._read_index(ckpt_dir, index_path)
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}")

    @staticmethod
    def _read_index(ckpt_dir: str, index_path: str) -> dict[str, TensorInfo]:
        weight_map = _read_json(index_path, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: no \"weight_map\" object of key -> shard file name")
        shards = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} names shard {name}, which is missing from {ckpt_dir}")
            shards[name] = read_safetensors_header(path)
        tensors = {}
        for key, name in weight_map.items():
            if key not in shards[name]:
                actual = [other for other, held in shards.items() if key in held]
                raise CheckpointError(f"{index_path} maps {key!r} to {name}, which does not hold it"
                                      + (f" ({actual[0]} does)" if actual else ""))
            tensors[key] = shards[name][key]
        return tensors

    def keys(self) -> set[str]:
        return set(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """tensor[index] as a read-only view of the memory-mapped file (bfloat16 as ml_dtypes.bfloat16).

        The mapping lives as long as the view: copy what you keep."""
        info = self._tensors[key]
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {key!r} has dtype {info.dtype}, which moe_grok cannot read")
        if not math.prod(info.shape):
            return np.zeros(info.shape, _DTYPES[info.dtype])[index]
        return np.memmap(info.path, _DTYPES[info.dtype], mode="r", offset=info.offset, shape=info.shape)[index]


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
        ("embed", "embedding"): lambda layer, e: Source("model.embed_tokens.weight", transpose=False),
        ("final_norm", "scale"): lambda layer, e: Source("model.norm.weight", transpose=False),
    }
    if not model_config.tie_word_embeddings:
        mapping[("lm_head", "kernel")] = lambda layer, e: Source("lm_head.weight")
    for path, name in per_layer.items():
        is_matrix = path[-1] != "scale"
        mapping[("layers", *path)] = (
            lambda layer, e, name=name, t=is_matrix: Source(_layer_key(layer, name), transpose=t))
    for name in EXPERT_WEIGHTS:
        mapping[("layers", "moe", name)] = (
            lambda layer, e, name=name: _expert_sources(model_config, keys, layer)[name](e))
    return mapping


def page_aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized host array at a page boundary: JAX's CPU client adopts such a buffer
    without copying it (an unaligned one it copies, doubling the memory of a load)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _shard_reader(reader: SafetensorsReader, source_fn: Callable, lead_sizes: tuple[int, ...],
                  stacked_layers: bool, dtype) -> Callable[[tuple], np.ndarray]:
    """make_array_from_callback's callback: shard index (tuple of slices) -> numpy shard.

    lead_sizes: sizes of the stacked leading axes ([L], [L, E] or []); each (layer, expert)
    cell of the shard is copied from its own HF tensor (transposed, cast to dtype) into place.
    """

    def read(index: tuple) -> np.ndarray:
        lead, rest = index[:len(lead_sizes)], index[len(lead_sizes):]
        ranges = [range(*s.indices(n)) for s, n in zip(lead, lead_sizes, strict=True)]

        def source_cell(cell_ids):
            picks = [r[i] for r, i in zip(ranges, cell_ids, strict=True)]
            src = source_fn(picks[0] if stacked_layers else None, picks[-1] if len(picks) > stacked_layers else None)
            cell = reader.read(src.key, src.index)
            return (cell.T if src.transpose else cell)[rest]

        cells = list(np.ndindex(*map(len, ranges)))
        out = page_aligned_empty((*map(len, ranges), *source_cell(cells[0]).shape), dtype)

        def copy(cell_ids):
            np.copyto(out[cell_ids], source_cell(cell_ids), casting="unsafe")  # the view's file pages unmap after

        with concurrent.futures.ThreadPoolExecutor(min(len(cells), os.cpu_count() or 1)) as pool:
            list(pool.map(copy, cells))  # numpy copies (strided transposes, page faults) run without the GIL
        return out

    return read


def _cell_shape(path: tuple[str, ...], target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one (layer, expert) cell of a target param: its shape minus stacked axes."""
    return target_shape[(path[0] == "layers") + (path[-1] in EXPERT_WEIGHTS):]


def validate_keys(model_config: MoEConfig, reader: SafetensorsReader) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys, shape mismatches and
    tensors stored in a dtype that is not a float (integer / bool / quantized weights)."""
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
    # With tied embeddings transformers ignores a stored head equal to the embedding, but unties the
    # two (keeping the stored head) when they differ: accept the first, name the second.
    ignored = set()
    if model_config.tie_word_embeddings and "lm_head.weight" in keys:
        ignored.add("lm_head.weight")
        embedding = "model.embed_tokens.weight"
        if embedding in keys and not np.array_equal(reader.read("lm_head.weight"), reader.read(embedding)):
            raise CheckpointError(f"checkpoint {reader.directory}: config.json ties the word embeddings, but "
                                  f"lm_head.weight differs from {embedding} (transformers would untie them and use "
                                  "the stored head); set tie_word_embeddings to false in config.json to load it so")
    unexpected = sorted(k for k in keys - set(needed) - ignored if not k.endswith("rotary_emb.inv_freq"))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    for key, (path, src, want) in needed.items():
        if key in keys:
            info = reader.info(key)
            if info.dtype not in WEIGHT_DTYPES:
                problems.append(f"{key} in {os.path.basename(info.path)} has dtype {info.dtype}; weights must be "
                                f"one of {'/'.join(WEIGHT_DTYPES)} (integer, bool and quantized tensors are not "
                                f"converted)")
            got = info.shape
            if src.index:  # fused expert tensors: check the whole tensor
                f, e, d = model_config.expert_intermediate_size, model_config.num_experts, model_config.hidden_size
                want = (e, 2 * f, d) if key.endswith("gate_up_proj") else (e, d, f)
            if got != want:
                problems.append(f"{key}: shape {got} does not match config (expected {want} for {'/'.join(path)})")
    if problems:
        raise CheckpointError(f"checkpoint {reader.directory} does not match its config.json: "
                              + "; ".join(problems[:12]))


def param_shape_dict(model_config: MoEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(params_lib.param_shapes(model_config))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_hf(path_or_repo: str, revision: str | None = None, dtype=jnp.float32,
            mesh: jax.sharding.Mesh | None = None, **config_overrides) -> tuple[MoEConfig, dict]:
    """Read an OLMoE HF checkpoint into (MoEConfig, params) with params in `dtype`.

    With a mesh, each parameter is created directly in its shards (experts over the
    "expert" axis); without one, on the default device. Raises CheckpointError for bad
    files, keys or config, and for non-finite weights (naming the checkpoint and the key).
    """
    ckpt_dir = resolve_checkpoint_dir(path_or_repo, revision)
    dtype = jnp.dtype(dtype)
    model_config = hf_model_config(ckpt_dir, dtype=dtype.name, **config_overrides)
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
        array = jax.make_array_from_callback(leaf.shape, sharding or default, callback)
        bad = params_lib.first_nonfinite_cell(array, len(lead_sizes))
        if bad is not None:
            layer = bad[0] if stacked_layers else None
            expert = bad[-1] if len(bad) > stacked_layers else None
            checkpoint = path_or_repo + (f"@{revision}" if revision else "")
            raise CheckpointError(f"checkpoint {checkpoint}: non-finite (NaN/inf) weights in "
                                  f"{mapping[name](layer, expert).key} ({'/'.join(name)})")
        return array

    if shardings is None:
        params = jax.tree_util.tree_map_with_path(build, shapes)
    else:
        params = jax.tree_util.tree_map_with_path(build, shapes, shardings)
    return model_config, params

