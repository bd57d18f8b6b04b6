"""Train step invariants: 8 CPU devices == 1 device, and checkpoints restore bit for bit."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from t5x_lite import checkpoints
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib

CONFIG = models.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                         num_encoder_layers=2, num_decoder_layers=2)


def make_trainer(devices) -> trainer_lib.Trainer:
    schedule = optimizers.rsqrt_schedule(warmup_steps=10)
    mesh_config = partitioning.MeshConfig()
    return trainer_lib.Trainer(models.EncoderDecoderModel(CONFIG),
                               optimizers.adafactor(schedule), schedule,
                               partitioning.create_mesh(mesh_config, devices),
                               rules=mesh_config.rules)


def random_batch(seed: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(2, 64, (batch_size, 6)).astype(np.int32)
    return {"encoder_input_tokens": rng.integers(2, 64, (batch_size, 10)).astype(np.int32),
            "encoder_segment_ids": np.ones((batch_size, 10), np.int32),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
            "decoder_loss_weights": np.ones_like(targets),
            "decoder_segment_ids": np.ones_like(targets)}


def run_steps(trainer: trainer_lib.Trainer, steps: int) -> trainer_lib.TrainState:
    state, step = trainer.init_state(seed=0), trainer.compile_train_step()
    for index in range(steps):
        state, _ = step(state, partitioning.global_batch(random_batch(index), trainer.mesh))
    return state


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from tests import trainer_test as t
    assert len(jax.devices()) == 8
    one = t.run_steps(t.make_trainer(jax.devices()[:1]), 3)
    eight_trainer = t.make_trainer(jax.devices())
    eight = t.run_steps(eight_trainer, 3)
    leaves = zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(eight.params))
    # Largest difference relative to the leaf's scale: float32 sums reduce in another order.
    worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(a)))
                for a, b in leaves)
    print("max_abs_difference", worst, "data_axis", eight_trainer.mesh.shape["data"])
""")


def test_eight_devices_match_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], capture_output=True,
                            text=True, timeout=300, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split()
    worst, data_axis = float(words[words.index("max_abs_difference") + 1]), words[-1]
    assert data_axis == "8"
    assert worst < 1e-4  # Adafactor divides by sqrt(second moment), amplifying float noise.


def test_checkpoint_restores_bit_for_bit(tmp_path):
    trainer = make_trainer(jax.devices())
    state = run_steps(trainer, 2)
    manager = checkpoints.create_manager(str(tmp_path), keep=2)
    checkpoints.save(manager, state)
    manager.wait_until_finished()
    restored, _ = checkpoints.restore_latest(manager, trainer.sharded_abstract_state())
    assert int(restored.step) == 2
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    step, params = checkpoints.restore_params(
        checkpoints.create_manager(str(tmp_path), read_only=True),
        trainer.sharded_abstract_state().params)
    assert step == 2
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
