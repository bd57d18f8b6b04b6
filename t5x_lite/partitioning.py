"""The device mesh, the rule table from logical axis names to mesh axes, and the shardings of
parameters and batches. Model code names only logical axes; this module alone names mesh axes.
"""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). Batches split over data and fsdp; parameters shard
# their embed dimension over fsdp (ZeRO-3 style) and heads / mlp / vocab over tensor. With
# fsdp = tensor = 1 this is plain data parallelism.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over all devices; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        if sum(size == -1 for size in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig sizes must be positive with at most one -1, got {self}")

    def shape(self, num_devices: int) -> tuple[int, ...]:
        sizes = list(dataclasses.astuple(self))
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into the mesh {self}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {self} needs {int(np.prod(sizes))} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes)


def create_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on the mesh."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry their target sharding, for restoring into shards."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first (batch) dimension."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this host's rows into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, array)
            for name, array in local_batch.items()}
