"""Host memory that XLA:CPU reuses from one execution to the next, instead of faulting in anew.

XLA:CPU allocates an execution's temporary buffers as one block (4 GB for t5_1_1_small's
train step at batch 8 x 512/114), from a worker thread. glibc serves a block that large from
a fresh mmap and unmaps it when it is freed, so every train step touches every page of it for
the first time: a million page faults, each page zero-filled by the kernel, 14% of the step on
2 cores (docs/performance.md). Served from the main heap, never trimmed, the block's pages stay
mapped and the next step reuses them.

The costs: the process keeps its peak heap until it exits, and where an execution starts
before the previous one has freed its block, one more block (t5_1_1_tiny's trainer: 3.0 GB
resident against 1.3 GB; t5_1_1_small's: 5.0 GB against 5.1 GB). Compiling takes about 40%
longer, its threads now sharing one arena (tiny's train step 5.5 -> 7.6 s; the test suite
opts out). Transparent huge pages (glibc.malloc.hugetlb=1) would keep memory returned to the
kernel, but stalled the step in compaction when torch ran beside it (docs/performance.md).
"""
import ctypes
import glob
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
OPT_OUT_VARIABLE = "T5X_LITE_SYSTEM_MALLOC"
MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                     "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# Device files of NVIDIA GPUs and of TPUs (v4 and later; v2/v3 through vfio).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def runs_on_cpu() -> bool:
    """Whether JAX will run this process on the CPU, told before JAX starts (the malloc
    setting must precede its CPU client): JAX_PLATFORMS=cpu, or no accelerator device file."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def reuse_freed_memory_on_cpu() -> bool:
    """reuse_freed_memory() where this process runs on the CPU: the entry points call it
    first thing. On an accelerator host the host heap holds no per-step temporaries, and
    keeping the peak heap would only cost memory."""
    return runs_on_cpu() and reuse_freed_memory()


def reuse_freed_memory() -> bool:
    """Has glibc's malloc serve every thread from the main heap (one arena), never by mmap,
    and never give freed heap back to the kernel; returns whether it did.

    It binds threads at their first allocation, so it must run before JAX creates its CPU
    client: the entry points call it first (startup.begin). Skipped off Linux glibc, where the environment
    already tunes malloc (GLIBC_TUNABLES, MALLOC_*), and with T5X_LITE_SYSTEM_MALLOC=1.
    """
    if (not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_VARIABLE) == "1"
            or any(name in os.environ for name in MALLOC_VARIABLES)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
