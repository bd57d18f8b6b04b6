"""A NaN injected into one training step: by default the run stops naming that step before any
checkpoint holds it; with nan_policy "skip" the step leaves the parameters unchanged and is
counted, and training goes on."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import trainer as trainer_lib
from tests import train_test
from tests.finetune_test import newest_params
from tests.train_test import task_name  # noqa: F401  (the fixture registering the task)

POISONED_STEP = 7  # state.step 6 -> the 7th step, as the logs count


@pytest.fixture
def poisoned(monkeypatch):
    """Makes the loss and every gradient NaN on step POISONED_STEP only (recognised by its
    dropout key, which the trainer derives from the step)."""
    original = trainer_lib.Trainer._accumulated_grads

    def accumulated_grads(self, params, batch, dropout_rng):
        sums, grads = original(self, params, batch, dropout_rng)
        target = jax.random.fold_in(jax.random.key(self.dropout_seed), POISONED_STEP - 1)
        bad = jnp.all(jax.random.key_data(dropout_rng) == jax.random.key_data(target))
        poison = lambda x: jnp.where(bad, jnp.nan, x)  # noqa: E731
        return {**sums, "loss": poison(sums["loss"])}, jax.tree_util.tree_map(poison, grads)

    monkeypatch.setattr(trainer_lib.Trainer, "_accumulated_grads", accumulated_grads)


def run(model_dir, steps: int, *extra: str) -> None:
    from t5x_lite import launch, train
    import gin
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/pretrain.gin"], [
        *train_test.bindings(model_dir, steps), "CHECKPOINT_PERIOD = 5", "LOG_PERIOD = 5",
        "EVAL_PERIOD = 100", *extra])
    try:
        gin.get_configurable(train.run)()
    finally:
        gin.clear_config()


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(task_name, tmp_path,  # noqa: F811
                                                                 poisoned):
    from t5x_lite import train
    with pytest.raises(train.NonFiniteLoss, match=f"at step {POISONED_STEP}: stopped before "
                       r"saving it \(the newest checkpoint, step 5, is intact\)"):
        run(tmp_path, 12)
    assert os.listdir(tmp_path / "checkpoints") == ["5"]
    step, params = newest_params(tmp_path)
    assert step == 5 and all(np.all(np.isfinite(np.asarray(x)))
                             for x in jax.tree_util.tree_leaves(params))


def test_skip_leaves_the_parameters_and_counts_the_step(task_name, tmp_path,  # noqa: F811
                                                        poisoned):
    run(tmp_path, 10, "t5x_lite.train.LoopConfig.nan_policy = 'skip'")
    rows = train_test.metric_rows(tmp_path, "train")
    assert [(row["step"], row["skipped_steps"]) for row in rows] == [(5, 0), (10, 1)]
    assert all(np.isfinite(row["loss"]) for row in rows)
    _, params = newest_params(tmp_path)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))
