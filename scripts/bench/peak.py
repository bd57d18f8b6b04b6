"""The peak FLOP/s that MFU divides by: square matmuls in the step's dtype, one on every
device at once, timed between the train steps."""
from typing import Callable

from bench import timing

PEAK_MATMUL_SIZE = 4096  # 137 GFLOP per matmul: long enough to reach the peak on CPUs.


def peak_matmul_operands(dtype, size: int) -> list:
    """Two random [devices, size, size] arrays in `dtype`, split so that each device holds
    one `size` x `size` matrix of each."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    per_device = NamedSharding(Mesh(devices, ("devices",)), PartitionSpec("devices"))
    shape = (len(devices), size, size)
    random = jax.jit(lambda key: jax.random.normal(key, shape, dtype), out_shardings=per_device)
    return [random(jax.random.key(i)) for i in range(2)]


def peak_matmul_timer(dtype, size: int) -> Callable[[], float]:
    """A function running one jitted `size` x `size` by `size` x `size` matmul in `dtype` on
    every device at once, waited for; returns its seconds (see peak_flops). All devices run
    together so that devices sharing hardware (CPU devices forced onto the same cores) are
    not each credited with all of it."""
    import jax
    import jax.numpy as jnp

    matrices = peak_matmul_operands(dtype, size)
    matmul = jax.jit(jnp.matmul)
    return lambda: timing.timed(lambda: jax.block_until_ready(matmul(*matrices)))


def peak_flops(size: int, seconds: float) -> float:
    """FLOP/s of the devices' `size`-cubed matmuls running together in `seconds`: the rate
    MFU divides by."""
    import jax

    return 2 * size**3 / seconds * jax.device_count()
