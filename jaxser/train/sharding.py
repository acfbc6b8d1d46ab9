"""Device mesh, logical axis rules and global batches.

The model's layers name their axes logically (`batch`, `embed`, `mlp`, `heads`, ...);
`config.mesh.rules` maps those names to the mesh axes `data`, `fsdp` and `tensor`. So
pure data parallelism, FSDP and tensor parallelism differ only in the config.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_cfg: Mapping, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all global devices; data=-1 takes what is left."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"at most one mesh axis may be -1, got {named}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in [int(mesh_cfg[a]) for a in MESH_AXES] and np.prod(sizes) < len(devices):
        devices = devices[:int(np.prod(sizes))]  # An explicit smaller mesh (tests, bench).
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"there are {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def rules_tuple(rules) -> tuple:
    """Config rules (lists after a JSON round trip) -> the tuple form flax wants."""
    out = []
    for name, axes in rules:
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def batch_axes(rules) -> tuple[str, ...]:
    """The mesh axes the logical `batch` axis is split over."""
    for name, axes in rules_tuple(rules):
        if name == "batch":
            return axes if isinstance(axes, tuple) else (axes,)
    return ()


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways a global batch is split."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules) if a]))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def logical_shardings(tree, mesh: Mesh, rules):
    """Shardings for a pytree with flax LogicallyPartitioned boxes (or abstract of one)."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_tuple(rules))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global arrays split over the batch axes of the mesh."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def host_local(tree, mesh: Mesh, rules):
    """The rows of global batch-sharded outputs that belong to this host, as numpy."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils
    spec = PartitionSpec(batch_axes(rules))
    return jax.tree.map(np.asarray,
                        multihost_utils.global_array_to_host_local_array(tree, mesh, spec))
