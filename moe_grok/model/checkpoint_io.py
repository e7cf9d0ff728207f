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

Expert layout: moe_config.json's `expert_layout` says how params/ holds the experts
(MoEConfig.expert_layout; a checkpoint written before the field existed holds "stacked":
[L_moe, E, in, out] stacks at layers/moe/). `restore_params(..., expert_layout=...)` migrates
while restoring: a stack is read whole (one parameter) and split into per-layer [E, out, in]
arrays, or per-layer arrays are read one at a time into a stack.
"""
from __future__ import annotations

import contextlib
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_grok import atomic_files, strict_json
from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.locking import DirectoryLock
from moe_grok.model import params as params_lib
from moe_grok.model.errors import CheckpointError
from moe_grok.model.hf import load_hf, page_aligned_empty
from moe_grok.model.layers import EXPERT_WEIGHTS

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


def _leaves_by_name(model_config: MoEConfig, mesh: jax.sharding.Mesh | None
                    ) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Every parameter's path -> its jax.ShapeDtypeStruct with its sharding (mesh shards, or the default device)."""
    shapes = params_lib.param_shapes(model_config)
    shardings = params_lib.param_shardings(model_config, mesh)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda _: default, shapes)
    flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings))[0]
    return {tuple(k.key for k in key_path): leaf for key_path, leaf in flat}


def _migrated_experts(checkpointer: ocp.Checkpointer, path: str, saved: MoEConfig,
                      saved_leaves: dict, target_leaves: dict) -> dict[tuple[str, ...], jax.Array]:
    """The expert weights of a checkpoint saved in `saved.expert_layout`, in the other layout
    (`target_leaves`' paths, shapes and shardings). Stacked -> per-layer: each [L_moe, E, in, out]
    stack read whole on the host (one parameter), its layers transposed into place one at a time;
    per-layer -> stacked: each layer's array read and transposed into the stack being built."""
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = {}
    for name in EXPERT_WEIGHTS:
        if saved.expert_layout == "stacked":
            stack_path = ("layers", "moe", name)
            leaf = saved_leaves[stack_path]
            stack = np.asarray(_restore_one(checkpointer, path, stack_path, jax.ShapeDtypeStruct(
                leaf.shape, target_leaves[("experts", "0", name)].dtype, sharding=on_host)))
            for i in range(saved.num_moe_layers):
                target = target_leaves[("experts", str(i), name)]
                out[("experts", str(i), name)] = jax.make_array_from_callback(
                    target.shape, target.sharding,
                    lambda index, i=i, stack=stack: np.ascontiguousarray(np.swapaxes(stack[i], -1, -2)[index]))
            del stack
        else:
            target = target_leaves[("layers", "moe", name)]
            host = page_aligned_empty(target.shape, target.dtype)
            for i in range(saved.num_moe_layers):
                layer_path = ("experts", str(i), name)
                leaf = saved_leaves[layer_path]
                layer = _restore_one(checkpointer, path, layer_path,
                                     jax.ShapeDtypeStruct(leaf.shape, target.dtype, sharding=on_host))
                host[i] = np.swapaxes(np.asarray(layer), -1, -2)
                del layer
            out[("layers", "moe", name)] = jax.make_array_from_callback(target.shape, target.sharding,
                                                                        lambda index, host=host: host[index])
    return out


def restore_params(directory: str, mesh: jax.sharding.Mesh | None = None, dtype=None,
                   expert_layout: str | None = None) -> tuple[MoEConfig, dict]:
    """Read back what save_params wrote, placing params in their mesh shards when given.

    dtype: cast to this parameter dtype while restoring (default: as saved). expert_layout:
    the MoEConfig.expert_layout to return (default: as saved; a checkpoint written before the
    field existed is "stacked"): another is migrated while restoring (module docstring). Raises
    CheckpointError naming the directory for a missing or unreadable checkpoint and for
    non-finite weights (naming the parameter, layer and expert).
    """
    directory = os.path.abspath(directory)
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}: not a moe_grok checkpoint")
    saved = MoEConfig.load(directory)
    if dtype is not None:
        saved = saved.replace(dtype=jax.numpy.dtype(dtype).name)
    model_config = saved if expert_layout is None else saved.replace(expert_layout=expert_layout)
    saved_leaves = _leaves_by_name(saved, mesh)
    target_leaves = _leaves_by_name(model_config, mesh)
    path = os.path.join(directory, "params")
    try:  # either layout: one zarr array per parameter (save_params) or orbax's default OCDBT store
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = {name: _restore_one(checkpointer, path, name, leaf)
                        for name, leaf in target_leaves.items() if name in saved_leaves}
            if model_config.expert_layout != saved.expert_layout:
                restored.update(_migrated_experts(checkpointer, path, saved, saved_leaves, target_leaves))
    except CheckpointError:
        raise
    except Exception as err:  # orbax / TensorStore raise many types, with pages of detail
        raise CheckpointError(f"{path}: cannot restore the moe_grok checkpoint ({type(err).__name__}: "
                              f"{_first_line(err)})") from None
    tree = jax.tree.structure(params_lib.param_shapes(model_config))
    params = jax.tree_util.tree_unflatten(tree, [restored[name] for name in target_leaves])
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = tuple(k.key for k in key_path)
        axes = params_lib.lead_axes(name)
        bad = params_lib.first_nonfinite_cell(leaf, len(axes))
        if bad is not None:
            cell = dict(zip(axes, bad, strict=True))
            if name[0] == params_lib.EXPERTS:
                cell = {"layer": int(name[1]), **cell}
            where = ", ".join(f"{axis} {i}" for axis, i in cell.items())
            raise CheckpointError(f"{directory}: non-finite (NaN/inf) weights in {'/'.join(name)}"
                                  + (f" ({where})" if where else ""))
    return model_config, params
