"""Published facts of the chips t5x_lite.precompile compiles for, and topology names.

A topology is `CHIP:SHAPE`: TPUs in libtpu's names (`v5e:2x4`, `v4:2x2x2`, `v5p:2x2x2`,
`v6e:2x2`), the shape being the chips' grid.
"""
import dataclasses
import math

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: `device_kind` as jax names it, its memory (bytes), its dense
    bf16 peak (FLOP/s) and its memory bandwidth (bytes/s), from the vendor's data sheets."""

    name: str
    platform: str
    device_kind: str
    memory_bytes: int
    peak_bf16_flops: float
    memory_bandwidth: float


CHIPS = {chip.name: chip for chip in (
    Chip("v4", "tpu", "TPU v4", 32 * GIB, 275e12, 1228e9),
    Chip("v5e", "tpu", "TPU v5 lite", 16 * GIB, 197e12, 819e9),
    Chip("v5p", "tpu", "TPU v5p", 95 * GIB, 459e12, 2765e9),
    Chip("v6e", "tpu", "TPU v6 lite", 32 * GIB, 918e12, 1640e9),
)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    shape: tuple[int, ...]

    @property
    def devices(self) -> int:
        return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
    """The Topology a name such as "v5e:2x4" gives; ValueError listing the known chips."""
    chip_name, _, shape_text = name.partition(":")
    known = ", ".join(f"{chip}:2x2" for chip in CHIPS)
    if chip_name not in CHIPS:
        raise ValueError(f"unknown topology {name!r}: known chips are {known} (a chip, a "
                         "colon, its grid)")
    try:
        shape = tuple(int(size) for size in shape_text.split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"topology {name!r} has no grid: write it as {chip_name}:2x2")
    return Topology(name, CHIPS[chip_name], shape)
