"""moe_grok checkpoints: params written with orbax, the MoEConfig as moe_config.json beside them.

Layout of a checkpoint directory:
  moe_config.json   the MoEConfig (architecture and numerics)
  params/           the public parameter tree (orbax PyTreeCheckpointHandler, without OCDBT: one
                    zarr array per parameter, params/<path joined by ".">/, in chunks of at most
                    64 MiB, stacks over layers chunked within each layer)

Memory: orbax's default layout (one OCDBT store) holds every parameter's encoded chunks until
the save commits, and its restore reads each array into a buffer it then copies: both about
twice the weights. Written per chunk and read straight into page-aligned buffers that JAX's
CPU client adopts (tensorstore, one parameter at a time), saving and restoring stay within a
few chunks of the weights. Checkpoints in orbax's default layout are still restored (with
orbax's own reader).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.model import params as params_lib
from moe_grok.model.errors import CheckpointError
from moe_grok.model.hf import load_hf, page_aligned_empty

CHUNK_BYTES = 64 << 20  # bytes per stored chunk
READ_BYTES = 256 << 20  # bytes restored per TensorStore read


def convert_hf_checkpoint(path_or_repo: str, out_dir: str, dtype="bfloat16", revision: str | None = None
                          ) -> tuple[MoEConfig, int]:
    """An HF checkpoint of any supported family (`hf.load_hf`: local directory, repo or "repo@revision")
    written as a moe_grok checkpoint in out_dir. Returns (its MoEConfig, its parameter count)."""
    model_config, params = load_hf(path_or_repo, revision=revision, dtype=dtype)
    save_params(out_dir, model_config, params)
    return model_config, sum(x.size for x in jax.tree.leaves(params))


def is_checkpoint_dir(path: str) -> bool:
    """True for a directory written by `save_params` (moe_config.json + params/)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save_params(directory: str, model_config: MoEConfig, params) -> None:
    """Write params with orbax (one zarr array per parameter, CHUNK_BYTES chunks) and the
    MoEConfig as JSON beside them."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    # Stacks over layers are chunked layer by layer (a restore reads a few layers at a time).
    save_args = jax.tree_util.tree_map_with_path(
        lambda path, _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if path[0].key == "layers" else ()),
        params)
    with _without_ocdbt_merge_warning(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), args=ocp.args.PyTreeSave(params, save_args=save_args),
                          force=True)
    model_config.save(directory)


class _OcdbtMergeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


@contextlib.contextmanager
def _without_ocdbt_merge_warning():
    """Drop the one warning orbax logs after every save without OCDBT (that it merged no OCDBT
    files): the layout asked for, not a problem. Every other record passes."""
    logger, dropped = logging.getLogger("absl"), _OcdbtMergeWarning()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def _first_line(err: Exception) -> str:
    """An error's first line (orbax and TensorStore messages run to pages of specs)."""
    return (str(err).strip().splitlines() or [""])[0][:300]


def _leaf_dir(params_dir: str, name: tuple[str, ...]) -> str:
    return os.path.join(params_dir, ".".join(name))


def _read_zarr_param(leaf_dir: str, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """One parameter from its zarr array, each device shard read into a page-aligned buffer
    (cast one leading-axis slice at a time when `dtype` differs from the stored dtype)."""
    try:
        store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": leaf_dir}}, read=True).result()
    except Exception as err:  # TensorStore errors carry its whole spec: keep the first line
        raise CheckpointError(f"{leaf_dir}: cannot restore the parameter ({_first_line(err)})") from None
    if tuple(store.shape) != shape:
        raise CheckpointError(f"{leaf_dir}: stored shape {tuple(store.shape)}, its moe_config.json says {shape}")

    def read(index: tuple) -> np.ndarray:
        region = store[index].translate_to[0]  # this shard, indexed from 0
        out = page_aligned_empty(tuple(region.shape), dtype)
        # READ_BYTES of leading-axis rows at a time: TensorStore decodes every chunk of a read at once.
        step = max(1, READ_BYTES // max(1, math.prod(out.shape[1:]) * region.dtype.numpy_dtype.itemsize))
        try:
            for start in range(0, out.shape[0], step):
                stop = min(start + step, out.shape[0])
                rows = region[start:stop]
                if rows.dtype.numpy_dtype == out.dtype:
                    ts.array(out[start:stop]).write(rows).result()
                else:
                    np.copyto(out[start:stop], rows.read().result(), casting="unsafe")
        except Exception as err:
            raise CheckpointError(f"{leaf_dir}: cannot restore the parameter ({_first_line(err)})") from None
        return out

    return jax.make_array_from_callback(shape, sharding, read)


def restore_params(directory: str, mesh: jax.sharding.Mesh | None = None, dtype=None) -> tuple[MoEConfig, dict]:
    """Read back what save_params wrote, placing params in their mesh shards when given.

    dtype: cast to this parameter dtype while restoring (default: as saved). Raises
    CheckpointError naming the directory for a missing or unreadable checkpoint and for
    non-finite weights (naming the parameter, layer and expert).
    """
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}: not a moe_grok checkpoint")
    model_config = MoEConfig.load(directory)
    if dtype is not None:
        model_config = model_config.replace(dtype=jax.numpy.dtype(dtype).name)
    shapes = params_lib.param_shapes(model_config)
    shardings = params_lib.param_shardings(model_config, mesh)
    if shardings is not None:
        shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    path = os.path.join(directory, "params")
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    names = [tuple(k.key for k in key_path) for key_path, _ in flat]
    if all(os.path.exists(os.path.join(_leaf_dir(path, name), ".zarray")) for name in names):
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree_util.tree_unflatten(tree, [
            _read_zarr_param(_leaf_dir(path, name), leaf.shape, leaf.dtype, leaf.sharding or default)
            for name, (_, leaf) in zip(names, flat, strict=True)])
    else:  # orbax's default layout (moe_grok before 64 MiB zarr chunks): orbax's reader
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                params = checkpointer.restore(path, shapes)
        except Exception as err:  # orbax / TensorStore raise many types, with pages of detail
            raise CheckpointError(f"{path}: cannot restore the moe_grok checkpoint ({type(err).__name__}: "
                                  f"{_first_line(err)})") from None
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = tuple(k.key for k in key_path)
        lead = params_lib.stacked_axes(name)
        bad = params_lib.first_nonfinite_cell(leaf, lead)
        if bad is not None:
            where = ", ".join(f"{axis} {i}" for axis, i in zip(("layer", "expert"), bad, strict=False))
            raise CheckpointError(f"{directory}: non-finite (NaN/inf) weights in {'/'.join(name)}"
                                  + (f" ({where})" if where else ""))
    return model_config, params
