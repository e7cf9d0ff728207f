"""Mesh helpers shared by every jitted entry point.

Convention: a mesh has a "data" axis (batch / sample parallelism) and optionally an "expert"
axis (expert and large-matrix parallelism). Every entry point takes ``mesh=None`` meaning
"single device, no sharding constraints".
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
EXPERT_AXIS = "expert"


def make_mesh(data: int | None = None, expert: int = 1, devices=None) -> Mesh:
    """A ("data", "expert") mesh over ``devices`` (default: all); ``data`` defaults to the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // expert
    if data * expert > len(devices):
        raise ValueError(f"mesh {data}x{expert} needs {data * expert} devices, have {len(devices)}")
    grid = np.array(devices[: data * expert]).reshape(data, expert)
    return Mesh(grid, (DATA_AXIS, EXPERT_AXIS))


def batch_spec(mesh: Mesh, ndim: int) -> P:
    """PartitionSpec sharding axis 0 over the mesh's data axis, replicating the rest."""
    axis = DATA_AXIS if DATA_AXIS in mesh.axis_names else mesh.axis_names[0]
    return P(axis, *([None] * (ndim - 1)))


def shard_batch(x, mesh: Mesh | None):
    """Place an array (or pytree) with its leading axis split over the data axis.

    Every process holds the same full host batch (multi-host runs load identical data) and
    contributes the shards its devices own. The leading axis must be divisible by the
    data-axis size; callers pad batches first.
    """
    if mesh is None:
        return x

    def place(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, batch_spec(mesh, a.ndim)), lambda i: a[i])

    return jax.tree.map(place, x)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one full numpy array on every process."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def replicate(x, mesh: Mesh | None):
    """Place an array (or pytree) fully replicated over the mesh."""
    if mesh is None:
        return x
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), x)


def data_axis_size(mesh: Mesh | None) -> int:
    if mesh is None:
        return 1
    axis = DATA_AXIS if DATA_AXIS in mesh.axis_names else mesh.axis_names[0]
    return mesh.shape[axis]


def round_up_to_data_axis(n: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the data-axis size that is >= n (>= 1): a batch that shards evenly."""
    shards = data_axis_size(mesh)
    return -(-max(n, 1) // shards) * shards
