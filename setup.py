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
    ],
    extras_require={"test": ["pytest"]},
)
