"""Benchmarks of the train step, the input pipeline, MoE routing, decoding, sharded state and
checkpoint saves, measured on this machine in this run: the entry point of scripts/bench/
(one module per subcommand; `python scripts/benchmark.py --help` lists them and their figures).

  python scripts/benchmark.py --quick     # seconds: the train figures of a tiny model
"""
import os

# Before TensorFlow or JAX is imported (here, in the measuring children, or by gin).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from t5x_lite import host_memory  # noqa: E402

# Before JAX creates its CPU client, as the entry points do (host_memory.py says why).
host_memory.reuse_freed_memory_on_cpu()

# spawn re-runs this file in each input child, which must pin its cores before TensorFlow
# loads: scripts/bench/ imports TensorFlow and JAX only inside the functions that use them.
from bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
