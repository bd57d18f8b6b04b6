"""The device mesh, the rule table from logical axis names to mesh axes, and the shardings of
parameters and batches. Model code names only logical axes; this module alone names mesh axes.
"""
import dataclasses
import enum

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t5x_lite import choices

MESH_AXES = ("data", "fsdp", "tensor", "expert")
# The expert axis splits the batch too: outside sparse MLPs its devices are data parallel.
BATCH_AXES = ("data", "fsdp", "expert")

# A rule table maps each logical axis to a mesh axis, a tuple of them, or None (not split).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class RuleTable(enum.Enum):
    """The partitioning strategies, one rule table each (gin/partitioning/<value>.gin)."""

    DATA = "data"
    FSDP = "fsdp"
    FSDP_TENSOR = "fsdp_tensor"
    EXPERT = "expert"


def override_rules(rules: Rules, overrides: Rules, setting: str) -> Rules:
    """`rules` with the rule of each logical axis that `overrides` names replaced. Overrides
    add no axes: naming one without a rule is an error listing those with one (a new logical
    axis gets its rule in every table below)."""
    known = [logical for logical, _ in rules]
    for logical, _ in overrides:
        if logical not in known:
            raise ValueError(f"{setting}: logical axis {logical!r} has no rule to override; "
                             f"logical axes are {', '.join(known)}")
    replaced = dict(overrides)
    return tuple((logical, replaced.get(logical, mesh_axes)) for logical, mesh_axes in rules)


# Batches split over data, fsdp and expert; parameters shard their embed dimension over fsdp
# (ZeRO-3 style), heads / mlp / vocab over tensor, and MoE expert weights over expert. Inside
# a sparse MLP, tokens move from the batch layout to [experts (expert), groups (expert_group:
# data, fsdp), ...]: the all-to-all of expert parallelism. With fsdp = tensor = expert = 1
# this is plain data parallelism.
_FSDP_TENSOR_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    # A classifier's few classes (models.EncoderOnlyTransformer's head): never split.
    ("classes", None),
    ("layers", None),
    ("expert", "expert"),
    ("expert_group", ("data", "fsdp")),
)
# FSDP: parameters split their embed dimension only (and experts, over the expert axis).
_FSDP_RULES = override_rules(_FSDP_TENSOR_RULES,
                             (("heads", None), ("mlp", None), ("vocab", None)), "fsdp rules")
# Data parallelism: parameters are whole on every device (experts aside).
_DATA_RULES = override_rules(_FSDP_RULES, (("embed", None),), "data rules")
RULE_TABLES: dict[RuleTable, Rules] = {
    RuleTable.DATA: _DATA_RULES,
    RuleTable.FSDP: _FSDP_RULES,
    RuleTable.FSDP_TENSOR: _FSDP_TENSOR_RULES,
    # Expert parallelism needs no rule of its own: data parallelism's table already splits
    # expert weights over the expert axis; gin/partitioning/expert.gin sizes that axis.
    RuleTable.EXPERT: _DATA_RULES,
}


def _override_pairs(overrides: dict | tuple) -> Rules:
    """MeshConfig.rule_overrides as (logical axis, mesh axes) pairs, gin's lists as tuples."""
    pairs = tuple(overrides.items()) if isinstance(overrides, dict) else tuple(overrides)
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError("partitioning.MeshConfig.rule_overrides must map logical axes to "
                             f"mesh axes, as {{'vocab': None}}; got {overrides!r}")
    logicals = [logical for logical, _ in pairs]
    repeated = [logical for logical in logicals if logicals.count(logical) > 1]
    if repeated:
        raise ValueError(f"partitioning.MeshConfig.rule_overrides: logical axis "
                         f"{repeated[0]!r} is overridden twice")
    return tuple((logical, tuple(mesh_axes) if isinstance(mesh_axes, list) else mesh_axes)
                 for logical, mesh_axes in pairs)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over all devices (one axis may be -1 to take the remaining devices) and
    the rule table mapping logical axis names to its axes.

    `rule_table` picks one of RULE_TABLES (gin binds its value: 'fsdp'); `rule_overrides`
    replace single rules of it, as a dict or (logical axis, mesh axes) pairs:
    {'vocab': None}. `rules` is the resulting table, the one every sharding of the run reads.

    With `dcn_data` > 1 the devices form that many slices (TPU slices, or processes where
    devices name no slice) joined by the slower data-center network: the sizes above describe
    one slice, and the data axis spans the slices too (data x dcn_data in all), so only
    data-parallel gradient reductions cross the slow links.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    rule_table: RuleTable = RuleTable.FSDP_TENSOR
    rule_overrides: dict | tuple = ()
    dcn_data: int = 1
    rules: Rules = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        sizes = self.sizes()
        if self.dcn_data < 1:
            raise ValueError(f"dcn_data must be >= 1, got {self.dcn_data}")
        if sum(size == -1 for size in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive with at most one -1, got "
                             f"{dict(zip(MESH_AXES, sizes))}")
        choices.set_parsed(self, "rule_table", RuleTable, "partitioning.MeshConfig.rule_table")
        object.__setattr__(self, "rule_overrides", _override_pairs(self.rule_overrides))
        object.__setattr__(self, "rules", override_rules(
            RULE_TABLES[self.rule_table], self.rule_overrides,
            "partitioning.MeshConfig.rule_overrides"))
        for logical, mesh_axes in self.rules:
            unknown = set(mesh_axes if isinstance(mesh_axes, tuple) else
                          [mesh_axes]) - set(MESH_AXES) - {None}
            if unknown:
                raise ValueError(f"rule {logical!r} -> {mesh_axes!r} names unknown mesh axis "
                                 f"{sorted(unknown)[0]!r}: mesh axes are {', '.join(MESH_AXES)}")

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in MESH_AXES)

    def slice_shape(self, devices_per_slice: int) -> tuple[int, ...]:
        """The sizes of one slice's mesh, with -1 filled in."""
        sizes = list(self.sizes())
        known = int(np.prod([s for s in sizes if s != -1]))
        described = ", ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
        if -1 in sizes:
            if devices_per_slice % known:
                raise ValueError(f"mesh ({described}) cannot fill {devices_per_slice} devices: "
                                 f"the fixed axes multiply to {known}, which must divide it")
            sizes[sizes.index(-1)] = devices_per_slice // known
        if int(np.prod(sizes)) != devices_per_slice:
            raise ValueError(f"mesh ({described}) needs {int(np.prod(sizes))} devices, but "
                             f"{devices_per_slice} are available: set one axis to -1 or make "
                             "the sizes multiply to the device count")
        return tuple(sizes)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The whole mesh's sizes: one slice's, with data multiplied by dcn_data."""
        if num_devices % self.dcn_data:
            raise ValueError(f"{num_devices} devices do not split into dcn_data = "
                             f"{self.dcn_data} slices")
        data, *rest = self.slice_shape(num_devices // self.dcn_data)
        return (data * self.dcn_data, *rest)

    def batch_divisor(self, num_devices: int) -> int:
        """Devices the batch is split over (data x fsdp x expert): the global batch must
        divide by it."""
        shape = dict(zip(MESH_AXES, self.shape(num_devices)))
        return int(np.prod([shape[axis] for axis in BATCH_AXES]))


def create_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config.shape(len(devices))
    if config.dcn_data == 1:
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    slice_shape = config.slice_shape(len(devices) // config.dcn_data)
    # Slices where the platform names them (TPU), otherwise processes (CPU and GPU hosts).
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    processes = len({device.process_index for device in devices})
    if config.dcn_data not in (slices, processes):
        raise ValueError(f"dcn_data = {config.dcn_data}, but the devices form {slices} "
                         f"slice(s) in {processes} process(es): set dcn_data to one of these")
    by_process = slices != config.dcn_data
    return Mesh(mesh_utils.create_hybrid_device_mesh(
        slice_shape, (config.dcn_data,) + (1,) * (len(MESH_AXES) - 1), devices,
        process_is_granule=by_process), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules: Rules):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on the mesh; a logical axis
    with no rule is an error naming it."""
    known = {logical for logical, _ in rules}
    for spec in jax.tree_util.tree_leaves(logical_specs,
                                          is_leaf=lambda x: isinstance(x, PartitionSpec)):
        missing = [axis for axis in spec if axis is not None and axis not in known]
        if missing:
            raise ValueError(f"logical axis {missing[0]!r} has no partitioning rule: add "
                             f"('{missing[0]}', None) or a mesh axis to every table in "
                             "partitioning.RULE_TABLES")
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry their target sharding, for restoring into shards."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first (batch) dimension."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, batch_size: int) -> range:
    """The rows of a global batch of `batch_size` rows that this process's devices hold (the
    rows global_batch takes from it): one block, the same for processes that replicate it."""
    blocks = sorted({(index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
                     for index in batch_sharding(mesh).addressable_devices_indices_map(
                         (batch_size,)).values()})
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if start != stop:
            raise ValueError(f"this process's devices hold rows {blocks} of each batch, not one "
                             "block: order the mesh's devices by process")
    return range(blocks[0][0], blocks[-1][1])


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this host's rows into global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, array)
            for name, array in local_batch.items()}


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings (the
    largest shard of each leaf)."""
    return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract_tree))


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
