"""moe_grok checkpoints: params written with orbax, the MoEConfig as moe_config.json beside them.

Layout of a checkpoint directory:
  moe_config.json   the MoEConfig (architecture and numerics)
  params/           the public parameter tree (orbax PyTreeCheckpointHandler, without OCDBT: one
                    zarr array per parameter, params/<path joined by ".">/, in chunks of at most
                    64 MiB, stacks over layers chunked within each layer)

Memory: orbax's default layout (one OCDBT store) holds every parameter's encoded chunks until
the save commits: written per chunk instead, saving stays within a few chunks of the weights.
Restoring goes through orbax's public API (PyTreeCheckpointHandler, a partial restore per
parameter straight into its mesh shards and dtype), one parameter at a time, so its transient
buffers are at most about one parameter's size. Checkpoints in orbax's default layout restore
the same way.
"""
from __future__ import annotations

import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp

from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.model import params as params_lib
from moe_grok.model.errors import CheckpointError
from moe_grok.model.hf import load_hf

CHUNK_BYTES = 64 << 20  # bytes per stored chunk


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


def _one_leaf_tree(name: tuple[str, ...], leaf):
    """The nested dict holding only `leaf` at the path `name` (an orbax partial-restore item)."""
    tree = leaf
    for key in reversed(name):
        tree = {key: tree}
    return tree


def _restore_one(checkpointer: ocp.Checkpointer, path: str, name: tuple[str, ...], leaf) -> jax.Array:
    """One parameter, read by orbax straight into its shards (`leaf.sharding`) in `leaf.dtype`
    (orbax casts while reading). One parameter per call keeps a restore's transient buffers to
    one parameter's size, whatever the model's."""
    args = ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype, global_shape=leaf.shape)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=_one_leaf_tree(name, leaf), restore_args=_one_leaf_tree(name, args), partial_restore=True))
    for key in name:
        restored = restored[key]
    if tuple(restored.shape) != tuple(leaf.shape):
        raise CheckpointError(f"{path}: {'/'.join(name)} restored with shape {tuple(restored.shape)}, its "
                              f"moe_config.json says {tuple(leaf.shape)}")
    return restored


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
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    try:  # either layout: one zarr array per parameter (save_params) or orbax's default OCDBT store
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            leaves = [_restore_one(checkpointer, path, tuple(k.key for k in key_path),
                                   jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding or default))
                      for key_path, leaf in flat]
    except CheckpointError:
        raise
    except Exception as err:  # orbax / TensorStore raise many types, with pages of detail
        raise CheckpointError(f"{path}: cannot restore the moe_grok checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)})") from None
    params = jax.tree_util.tree_unflatten(tree, leaves)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = tuple(k.key for k in key_path)
        lead = params_lib.stacked_axes(name)
        bad = params_lib.first_nonfinite_cell(leaf, lead)
        if bad is not None:
            where = ", ".join(f"{axis} {i}" for axis, i in zip(("layer", "expert"), bad, strict=False))
            raise CheckpointError(f"{directory}: non-finite (NaN/inf) weights in {'/'.join(name)}"
                                  + (f" ({where})" if where else ""))
    return model_config, params
