"""t5x_lite: T5-style pretraining in JAX/Flax."""
from t5x_lite import host_memory

# Here, before any module creates JAX's CPU client: the setting binds threads at their first
# allocation (host_memory.py says why, and what it costs).
host_memory.reuse_freed_memory()
