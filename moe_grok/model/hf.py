"""Hugging Face checkpoint (any supported model family) -> moe_grok params.

`load_hf(path_or_repo, revision=None, dtype=..., mesh=None)` is the one entry point: it reads
config.json, picks the model family by its "model_type" (`moe_grok.model.families`: OLMoE,
Qwen3-MoE; another type raises UnsupportedModelTypeError listing them), translates the config
with that family and fills every parameter through the family's key map from the safetensors
file(s) (`moe_grok.model.safetensors`): model.safetensors if present (as transformers does),
else the shards listed in model.safetensors.index.json. Either expert layout is read (hub:
per-expert `experts.{e}.{gate,up,down}_proj.weight`; fused: `experts.gate_up_proj [E, 2F, D]`,
`experts.down_proj [E, D, F]`).

path_or_repo: a local checkpoint directory, or a hub repo id, optionally as "repo@revision"
(downloaded with huggingface_hub, the optional extra moe_grok[hub]).

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
import math
import os
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from moe_grok.config import MoEConfig
from moe_grok.model import families
from moe_grok.model import params as params_lib
from moe_grok.model.errors import CheckpointError, UnsupportedModelTypeError
from moe_grok.model.safetensors import (
    INDEX_FILE,
    SINGLE_FILE,
    WEIGHT_DTYPES,
    SafetensorsReader,
    read_json_object,
)

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointError", "UnsupportedModelTypeError", "hf_model_config",
           "load_hf", "read_hf_config", "resolve_checkpoint_dir", "split_revision"]


# ----------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------
def _looks_like_local_path(path_or_repo: str) -> bool:
    """True for what can only be meant as a local path: absolute, starting with ".", "~", or with
    a separator a hub repo id ("owner/name") never has (a second "/", the OS's own separator
    where that is not "/"), or whose first part is an existing local directory."""
    if os.path.isabs(path_or_repo) or path_or_repo.startswith((".", "~")):
        return True
    if os.sep != "/" and os.sep in path_or_repo:
        return True
    parent = os.path.dirname(path_or_repo)
    return path_or_repo.count("/") > 1 or (bool(parent) and os.path.isdir(parent))


def split_revision(path_or_repo: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repo, revision) of "repo@revision" (a hub repo id never holds "@"); other strings as given.

    A revision both in the string and in `revision` must agree (CheckpointError otherwise)."""
    if "@" not in path_or_repo or os.path.exists(path_or_repo) or _looks_like_local_path(path_or_repo):
        return path_or_repo, revision
    repo, _, named = path_or_repo.rpartition("@")
    if not repo or not named:
        raise CheckpointError(f"{path_or_repo!r}: write a hub revision as 'owner/name@revision'")
    if revision is not None and revision != named:
        raise CheckpointError(f"{path_or_repo!r} names revision {named!r}, but revision={revision!r} was passed")
    return repo, named


def _download_snapshot(repo: str, revision: str | None) -> str:
    """The local snapshot directory of repo@revision's *.json and *.safetensors files."""
    try:
        import huggingface_hub
    except ImportError as err:
        raise CheckpointError(f"{repo!r} is not a local directory and huggingface_hub is not installed "
                              "(pip install moe_grok[hub]) to fetch it from the hub") from err
    return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors"])


def resolve_checkpoint_dir(path_or_repo: str, revision: str | None = None) -> str:
    """A local directory as is; otherwise a hub repo id ("repo" or "repo@revision") downloaded with
    huggingface_hub. A string that looks like a local path (`_looks_like_local_path`) but does not
    exist raises CheckpointError saying so, instead of being sent to the hub."""
    if os.path.isdir(path_or_repo):
        if revision is not None:
            raise CheckpointError(f"{path_or_repo!r} is a local directory; revision={revision!r} applies to hub repos")
        return path_or_repo
    if os.path.exists(path_or_repo):
        raise CheckpointError(f"{path_or_repo!r} is a file; a checkpoint is a directory (or a hub repo id)")
    if _looks_like_local_path(path_or_repo):
        raise CheckpointError(f"checkpoint directory {path_or_repo!r} does not exist")
    repo, revision = split_revision(path_or_repo, revision)
    try:
        return _download_snapshot(repo, revision)
    except CheckpointError:
        raise
    except Exception as err:  # hub errors (missing repo/revision, offline) are many types
        raise CheckpointError(f"could not fetch {repo!r} at revision {revision!r} from the hub: "
                              f"{type(err).__name__}: {err}") from err


def read_hf_config(ckpt_dir: str) -> dict:
    """config.json of a checkpoint of a supported family, checked to be valid JSON with every key
    that family needs (UnsupportedModelTypeError for another model_type)."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"no config.json in {ckpt_dir}")
    hf = read_json_object(path, "model config")
    family = families.family_of(hf.get("model_type"), where=path)
    missing = [key for key in family.REQUIRED_CONFIG_KEYS if key not in hf]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {missing}; a {family.ARCHITECTURE} config.json defines all "
                              f"of {list(family.REQUIRED_CONFIG_KEYS)}")
    return hf


def hf_model_config(ckpt_dir: str, **overrides) -> MoEConfig:
    """The MoEConfig of a local HF checkpoint directory (CheckpointError naming config.json)."""
    hf = read_hf_config(ckpt_dir)
    try:
        return families.config_from_hf(hf, **overrides)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{os.path.join(ckpt_dir, 'config.json')}: {err}") from None


# ----------------------------------------------------------------------------------------
# Building params from a checkpoint
# ----------------------------------------------------------------------------------------
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
    return target_shape[params_lib.stacked_axes(path):]


def validate_keys(model_config: MoEConfig, reader: SafetensorsReader) -> None:
    """Raise CheckpointError naming missing keys, unexpected keys, shape mismatches and
    tensors stored in a dtype that is not a float (integer / bool / quantized weights)."""
    keys = reader.keys()
    shapes = param_shape_dict(model_config)
    mapping = families.key_map(model_config, keys)
    needed: dict[str, tuple] = {}
    for path, fn in mapping.items():
        sizes = dict(zip(params_lib.lead_axes(path), shapes[path], strict=False))
        layers = range(sizes["layer"]) if "layer" in sizes else [None]
        experts = range(sizes["expert"]) if "expert" in sizes else [None]
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
            if src.index:  # fused expert tensors: check the whole tensor, as stored
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
    """Read an HF checkpoint of a supported model family into (MoEConfig, params) with params in `dtype`.

    path_or_repo: local directory, hub repo id or "repo@revision" (`resolve_checkpoint_dir`).
    The experts come in MoEConfig.expert_layout "per_layer" (one [E, out, in] array per MoE
    layer, filled straight from HF's [out, in] tensors) unless config_overrides name another.
    With a mesh, each parameter is created directly in its shards (experts over the
    "expert" axis); without one, on the default device. Raises CheckpointError for bad
    files, keys or config, and for non-finite weights (naming the checkpoint and the key);
    UnsupportedModelTypeError (a CheckpointError) for a model_type no family converts.
    """
    ckpt_dir = resolve_checkpoint_dir(path_or_repo, revision)
    dtype = jnp.dtype(dtype)
    model_config = hf_model_config(ckpt_dir, dtype=dtype.name, **{"expert_layout": "per_layer", **config_overrides})
    reader = SafetensorsReader(ckpt_dir)
    validate_keys(model_config, reader)
    shardings = params_lib.param_shardings(model_config, mesh)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mapping = families.key_map(model_config, reader.keys())
    shapes = params_lib.param_shapes(model_config)

    def build(path, leaf, sharding=None):
        name = tuple(k.key for k in path)
        stacked_layers = name[0] == "layers"
        lead_sizes = leaf.shape[:params_lib.stacked_axes(name)]
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
    chex.assert_trees_all_equal_shapes_and_dtypes(params, shapes)
    return model_config, params

