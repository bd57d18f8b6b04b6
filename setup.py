"""t5x_lite: a compact JAX/Flax codebase for T5-style pretraining."""
import setuptools

setuptools.setup(
    name="t5x_lite",
    version="0.1.0",
    description="Compact JAX/Flax T5 pretraining: gin config, seqio tasks, sharded training.",
    packages=setuptools.find_packages(include=["t5x_lite", "t5x_lite.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "seqio",
        "gin-config",
        "tensorflow-datasets",
        "sentencepiece",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "safetensors",  # Hugging Face T5 import / export (never pickles)
        "sacrebleu",  # BLEU
        "rouge-score",  # ROUGE
    ],
    # The tests check parity with transformers' T5 on the CPU build of torch (constraints.txt
    # pins the CPU build that pip finds on this project's machines).
    # `aot`: t5x_lite.precompile's compilers for accelerators this machine lacks: libtpu, and
    # the CUDA plugin with cuDNN only (jax builds cuDNN attention only where it can read
    # cuDNN's version; cuDNN brings cuBLAS). The plugin's `with-cuda` set is not needed to
    # compile, only to run.
    # pytest-xdist: scripts/test.sh runs the suite in two processes, one per core (most of
    # it is single-threaded XLA compilation).
    extras_require={"test": ["pytest", "pytest-xdist", "torch", "transformers"],
                    "aot": ["libtpu", "jax-cuda12-plugin", "nvidia-cudnn-cu12"]},
)
