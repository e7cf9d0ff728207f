"""Mesh conventions shared by every jitted entry point.

A mesh has a "data" axis (batch / sample parallelism) and optionally an "expert" axis
(expert parallelism). Every entry point takes ``mesh=None`` meaning "single device, no
sharding constraints".
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
EXPERT_AXIS = "expert"


def make_mesh(data: int | None = None, expert: int = 1, devices=None) -> Mesh:
    """A ("data", "expert") mesh over ``devices`` (default: all); ``data`` defaults to the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // expert
    if data < 1 or expert < 1 or data * expert > len(devices):
        raise ValueError(f"mesh {data}x{expert} needs {data * expert} devices, have {len(devices)}")
    grid = np.array(devices[: data * expert]).reshape(data, expert)
    return Mesh(grid, (DATA_AXIS, EXPERT_AXIS))


def check_expert_axis(mesh: Mesh | None, num_experts: int, where: str) -> None:
    """ValueError unless the mesh's "expert" axis (config `mesh.expert`) divides `num_experts`, naming
    both and `where` (the checkpoint): each device of an expert group holds an equal share of the
    experts. Called before any parameter is placed (JAX's own error names neither)."""
    if mesh is None or EXPERT_AXIS not in mesh.shape:
        return
    size = mesh.shape[EXPERT_AXIS]
    if num_experts % size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"mesh.expert={size} does not divide num_experts={num_experts} of {where}: each device "
                         f"of an expert group holds num_experts / mesh.expert experts; use one of {divisors}")


def data_axis(mesh: Mesh) -> str:
    """The axis batches are split over: "data", or the first axis of a mesh without one."""
    return DATA_AXIS if DATA_AXIS in mesh.axis_names else mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the data axis, the rest replicated (any rank)."""
    return NamedSharding(mesh, P(data_axis(mesh)))


def model_batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes a model's batch is split over: all of them. Each device of an "expert" group
    holds its own samples; the expert-parallel MoE layers exchange tokens inside the group."""
    return tuple(mesh.axis_names)


def model_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over every mesh axis (`model_batch_axes`), the rest replicated."""
    return NamedSharding(mesh, P(model_batch_axes(mesh)))


def data_axis_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[data_axis(mesh)]


def round_up_to_data_axis(n: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the data-axis size that is >= n (>= 1): a batch that shards evenly."""
    shards = data_axis_size(mesh)
    return -(-max(n, 1) // shards) * shards


def shard_batch(x, mesh: Mesh | None, placement: NamedSharding | None = None):
    """Place an array (or pytree) with its leading axis split over the data axis (or as `placement`).

    Every process holds the same full host batch (multi-host runs load identical data) and
    contributes the shards its devices own. The leading axis must be divisible by the
    number of shards; callers pad batches first.
    """
    if mesh is None:
        return x
    placement = placement or batch_sharding(mesh)

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, placement, lambda index: a[index])

    return jax.tree.map(place, x)


def replicate(x, mesh: Mesh | None):
    """Place an array (or pytree) fully replicated over the mesh."""
    if mesh is None:
        return x
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), x)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one full numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
