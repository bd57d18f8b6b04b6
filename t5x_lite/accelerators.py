"""Published facts of the chips t5x_lite.precompile compiles for, and topology names.

A topology is `CHIP:SHAPE`. TPUs take libtpu's names (`v5e:2x4`, `v4:2x2x2`, `v5p:2x2x2`,
`v6e:2x2`), the shape being the chips' grid. GPUs are `h100:8` (one host of 8) or
`h100:4x8` (4 hosts of 8 each).
"""
import dataclasses
import math

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What XLA's GPU compiler needs to know of a GPU it cannot query (a GpuTargetConfig's
    gpu_device_info), from NVIDIA's data sheets and the CUDA occupancy tables."""

    compute_capability: tuple[int, int]
    sm_count: int
    fpus_per_sm: int
    clock_ghz: float
    l2_cache_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int


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
    gpu: GpuFacts | None = None


CHIPS = {chip.name: chip for chip in (
    Chip("v4", "tpu", "TPU v4", 32 * GIB, 275e12, 1228e9),
    Chip("v5e", "tpu", "TPU v5 lite", 16 * GIB, 197e12, 819e9),
    Chip("v5p", "tpu", "TPU v5p", 95 * GIB, 459e12, 2765e9),
    Chip("v6e", "tpu", "TPU v6 lite", 32 * GIB, 918e12, 1640e9),
    # H100 SXM: the memory cudaGetDeviceProperties reports (../shared/accelerators, checked
    # on a lent H100 by compiling with these facts).
    Chip("h100", "gpu", "NVIDIA H100 80GB HBM3", 84_929_347_584, 989e12, 3352e9,
         GpuFacts((9, 0), 132, 128, 1.98, 50 * 2**20, 228 * 2**10, 227 * 2**10)),
    # A100 SXM 80GB: 81,920 MiB as nvidia-smi reports it; compute capability 8.0.
    Chip("a100", "gpu", "NVIDIA A100-SXM4-80GB", 81_920 * 2**20, 312e12, 2039e9,
         GpuFacts((8, 0), 108, 64, 1.41, 40 * 2**20, 164 * 2**10, 163 * 2**10)),
)}
# The device memory a JAX process takes on a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise (JAX's GPU memory allocation notes).
GPU_DEFAULT_MEMORY_FRACTION = 0.75
# The cuDNN and CUDA runtime versions the compiler may assume: those jax-cuda12-plugin 0.10.2
# was built against and the aot extra installs.
GPU_DNN_VERSION = (9, 8)
GPU_RUNTIME_VERSION = (12, 8)


@dataclasses.dataclass(frozen=True)
class Topology:
    """`shape`: a TPU's grid of chips, or a GPU cluster's (hosts, GPUs per host)."""

    name: str
    chip: Chip
    shape: tuple[int, ...]

    @property
    def devices(self) -> int:
        return math.prod(self.shape)

    @property
    def compiler_name(self) -> str:
        """The name the platform's compiler takes: libtpu's "v5e:2x4", or the CUDA plugin's
        slices x hosts x GPUs per host ("1x4x8")."""
        if self.chip.platform == "gpu":
            return "x".join(map(str, (1, *self.shape)))
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def known_names() -> str:
    return ", ".join(f"{name}:8" if chip.platform == "gpu" else f"{name}:2x2"
                     for name, chip in CHIPS.items())


def parse_topology(name: str) -> Topology:
    """The Topology a name such as "v5e:2x4" or "h100:4x8" gives; ValueError listing the
    known chips."""
    chip_name, _, shape_text = name.partition(":")
    if chip_name not in CHIPS:
        raise ValueError(f"unknown topology {name!r}: known chips are {known_names()} (a "
                         "chip, a colon, its grid; GPUs: hosts x GPUs per host, as h100:4x8)")
    chip = CHIPS[chip_name]
    example = f"{chip_name}:8" if chip.platform == "gpu" else f"{chip_name}:2x2"
    try:
        shape = tuple(int(size) for size in shape_text.split("x"))
    except ValueError:
        shape = ()
    if chip.platform == "gpu" and len(shape) == 1:
        shape = (1, *shape)
    if not shape or min(shape) < 1 or (chip.platform == "gpu" and len(shape) != 2):
        raise ValueError(f"topology {name!r} has no grid: write it as {example}")
    return Topology(name, chip, shape)


def gpu_target_config(chip: Chip) -> str:
    """The GpuTargetConfig text XLA compiles for `chip` from, without the GPU."""
    facts = chip.gpu
    major, minor = facts.compute_capability
    info = {"threads_per_block_limit": 1024, "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 2**10,
            "shared_memory_per_core": facts.shared_memory_per_sm,
            "threads_per_core_limit": 2048, "core_count": facts.sm_count,
            "fpus_per_core": facts.fpus_per_sm, "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(chip.memory_bandwidth),
            "l2_cache_size": facts.l2_cache_bytes, "clock_rate_ghz": facts.clock_ghz,
            "device_memory_size": chip.memory_bytes,
            "shared_memory_per_block_optin": facts.shared_memory_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536}
    fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
    return (f"gpu_device_info {{\n{fields}\n"
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ major: {GPU_DNN_VERSION[0]} minor: {GPU_DNN_VERSION[1]} }}\n"
            f"runtime_version {{ major: {GPU_RUNTIME_VERSION[0]} "
            f"minor: {GPU_RUNTIME_VERSION[1]} }}\n")


def usable_memory_bytes(chip: Chip, environment: dict) -> int:
    """The memory one process may use on `chip`: all of a TPU's; on a GPU the fraction JAX
    preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION in `environment`, 0.75 by default)."""
    if chip.platform != "gpu":
        return chip.memory_bytes
    fraction = float(environment.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                     GPU_DEFAULT_MEMORY_FRACTION))
    return int(chip.memory_bytes * fraction)
