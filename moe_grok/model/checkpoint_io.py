"""moe_grok checkpoints: params written with orbax, the MoEConfig as moe_config.json beside them.

Layout of a checkpoint directory:
  moe_config.json   the MoEConfig (architecture and numerics)
  convert.json      (converted checkpoints) the HF source, revision and dtype it was converted from
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

from moe_grok import atomic_files, strict_json
from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.locking import DirectoryLock
from moe_grok.model import params as params_lib
from moe_grok.model.errors import CheckpointError
from moe_grok.model.hf import load_hf

CHUNK_BYTES = 64 << 20  # bytes per stored chunk
CONFIG_FILE_HF = "config.json"  # an HF checkpoint's config (a directory holding it is not ours to overwrite)


CONVERT_RECORD = "convert.json"  # in a converted checkpoint: the source it was converted from


class ConvertOutputError(CheckpointError):
    """A convert's --out directory holds something other than an earlier convert of the same source."""


def _convert_source(path_or_repo: str, revision: str | None) -> dict:
    """What a convert reads, as recorded in CONVERT_RECORD: a local directory by its resolved path,
    a hub repo by its id and revision."""
    local = os.path.isdir(path_or_repo)
    return {"source": os.path.realpath(path_or_repo) if local else path_or_repo, "revision": revision}


def _describe(directory: str) -> str:
    """What a non-empty directory holds, in a few words (for a refusal)."""
    names = sorted(os.listdir(directory))
    if is_checkpoint_dir(directory):
        return "a moe_grok checkpoint that no convert recorded (saved by save_params or an older moe_grok)"
    if CONFIG_FILE_HF in names:
        return f"an HF checkpoint ({CONFIG_FILE_HF}: converting into it would shadow its weights)"
    return f"{len(names)} entries ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"


def check_convert_output(out_dir: str, path_or_repo: str, revision: str | None = None, overwrite: bool = False
                         ) -> None:
    """Raise ConvertOutputError unless a convert of `path_or_repo` may write out_dir: it does not
    exist, is empty, holds a complete earlier convert of the same source (a re-run replaces it),
    or `overwrite`. A file at out_dir, or the source directory itself, is refused even with `overwrite`."""
    if os.path.isdir(path_or_repo) and os.path.realpath(path_or_repo) == os.path.realpath(out_dir):
        raise ConvertOutputError(f"--out {out_dir} is the HF checkpoint being converted: replacing it would delete "
                                 f"the source; choose another --out")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ConvertOutputError(f"--out {out_dir} is a file, not a directory")
    if overwrite or not os.listdir(out_dir):
        return
    record_path = os.path.join(out_dir, CONVERT_RECORD)
    try:
        record = strict_json.load(record_path)
    except (OSError, ValueError):
        record = None
    if record is not None and is_checkpoint_dir(out_dir):
        recorded = {k: record.get(k) for k in ("source", "revision")}
        if recorded == _convert_source(path_or_repo, revision):
            return
        held = f"a convert of {recorded['source']}" + (f"@{recorded['revision']}" if recorded["revision"] else "")
    else:
        held = _describe(out_dir)
    raise ConvertOutputError(f"--out {out_dir} is not empty: it holds {held}; choose an empty or new --out, or "
                             f"pass --overwrite to replace it (convert_hf_checkpoint(..., overwrite=True))")


def convert_lock(out_dir: str) -> DirectoryLock:
    """The one-writer lock of a convert into out_dir: ``.<name>.convert.lock`` in its parent
    directory (out_dir itself is replaced whole, so it cannot hold the lock). A second convert
    into the same out_dir raises RuntimeError naming out_dir, the holder's pid and the lock file."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    return DirectoryLock(parent, f".{name}.convert.lock", activity="written", directory_kind="--out directory",
                         subject=f"--out {out_dir}")


def convert_hf_checkpoint(path_or_repo: str, out_dir: str, dtype="bfloat16", revision: str | None = None,
                          overwrite: bool = False) -> tuple[MoEConfig, int]:
    """An HF checkpoint of any supported family (`hf.load_hf`: local directory, repo or "repo@revision")
    written as a moe_grok checkpoint in out_dir. Returns (its MoEConfig, its parameter count).

    Before anything is read: out_dir must be new, empty or a complete earlier convert of the same
    source (`check_convert_output`; else ConvertOutputError, unless `overwrite`), and no other
    convert may be writing it (`convert_lock`: RuntimeError naming the holder). The output is
    built aside and swapped in whole (`save_params`), so a kill or a full disk leaves the previous
    output or the new one, never a mix; temporary outputs of killed converts are removed.
    CONVERT_RECORD in out_dir names the source."""
    out_dir = os.path.abspath(out_dir)
    with convert_lock(out_dir):
        check_convert_output(out_dir, path_or_repo, revision, overwrite)
        parent, name = os.path.split(out_dir)
        atomic_files.remove_stale_temporaries(parent, prefix=name + ".")
        model_config, params = load_hf(path_or_repo, revision=revision, dtype=dtype)
        record = {**_convert_source(path_or_repo, revision), "dtype": jax.numpy.dtype(dtype).name}
        save_params(out_dir, model_config, params, extra_files={CONVERT_RECORD: strict_json.dumps(record, indent=1)},
                    replace=True)
    return model_config, sum(x.size for x in jax.tree.leaves(params))


def is_checkpoint_dir(path: str) -> bool:
    """True for a directory written by `save_params` (moe_config.json + params/)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save_params(directory: str, model_config: MoEConfig, params, extra_files: dict[str, str] | None = None,
                replace: bool = False) -> None:
    """Write params with orbax (one zarr array per parameter, CHUNK_BYTES chunks) and the
    MoEConfig as JSON beside them (and `extra_files`: {name: text}).

    The checkpoint is built in a temporary directory beside `directory` and swapped in whole
    (atomic_files.directory_aside): a kill or a full disk (WriteError naming the directory)
    leaves the previous checkpoint there, or none, never half of one. An existing `directory` is
    replaced only when it is a moe_grok checkpoint or empty (or `replace`); else CheckpointError:
    its other files would be lost."""
    directory = os.path.abspath(directory)
    if (not replace and os.path.isdir(directory) and os.listdir(directory) and not is_checkpoint_dir(directory)):
        raise CheckpointError(f"{directory} holds files that are not a moe_grok checkpoint "
                              f"({', '.join(sorted(os.listdir(directory))[:5])}); save_params replaces the "
                              f"directory whole: choose another")
    # Stacks over layers are chunked layer by layer (a restore reads a few layers at a time).
    save_args = jax.tree_util.tree_map_with_path(
        lambda path, _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,) if path[0].key == "layers" else ()),
        params)
    with atomic_files.directory_aside(directory) as staging:
        with (_without_ocdbt_merge_warning(),
              ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer):
            checkpointer.save(os.path.join(staging, "params"), args=ocp.args.PyTreeSave(params, save_args=save_args),
                              force=True)
        model_config.save(staging)
        for name, text in (extra_files or {}).items():
            atomic_files.write_text(os.path.join(staging, name), text)


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
