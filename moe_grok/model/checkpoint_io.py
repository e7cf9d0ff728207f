"""moe_grok checkpoints: params written with orbax, the MoEConfig as moe_config.json beside them.

Layout of a checkpoint directory:
  moe_config.json   the MoEConfig (architecture and numerics)
  params/           the public parameter tree (orbax StandardCheckpointer)
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.model import params as params_lib
from moe_grok.model.hf import CheckpointError


def is_checkpoint_dir(path: str) -> bool:
    """True for a directory written by `save_params` (moe_config.json + params/)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, "params"))


def save_params(directory: str, model_config: MoEConfig, params) -> None:
    """Write params with orbax (StandardCheckpointer) and the MoEConfig as JSON beside them."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), params, force=True)
    model_config.save(directory)


def restore_params(directory: str, mesh: jax.sharding.Mesh | None = None, dtype=None) -> tuple[MoEConfig, dict]:
    """Read back what save_params wrote, placing params in their mesh shards when given.

    dtype: cast to this parameter dtype while restoring (default: as saved).
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
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(directory, "params"), shapes)
    return model_config, params
