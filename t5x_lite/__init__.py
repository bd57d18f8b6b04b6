"""t5x_lite: T5-style pretraining in JAX/Flax."""
