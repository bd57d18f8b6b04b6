"""A NaN injected into one training step: by default the run stops naming that step before any
checkpoint holds it; with nan_policy "skip" the step leaves the parameters unchanged and is
counted, and training goes on."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import faults
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib
from tests import train_test
from tests.finetune_test import newest_params
from tests.train_test import task_name  # noqa: F401  (the fixture registering the task)

POISONED_STEP = 7  # The 7th training batch of an uninterrupted run carries the NaN.


@pytest.fixture
def poisoned(monkeypatch, task_name):  # noqa: F811
    """Makes the loss and every gradient NaN on one batch: the POISONED_STEP-th training
    batch (recognised by its tokens), wherever in the run it arrives."""
    from t5x_lite import run_config
    data = run_config.DataConfig(task_name, {"inputs": 32, "targets": 8}, 8).for_training()
    batches = data.batches("train", partitioning.create_mesh(partitioning.MeshConfig()),
                           shuffle=True, seed=0, repeat=True)
    for _ in range(POISONED_STEP):
        target = jnp.asarray(next(batches)["encoder_input_tokens"])
    original = trainer_lib.Trainer._accumulated_grads

    def accumulated_grads(self, params, batch, dropout_rng):
        sums, grads = original(self, params, batch, dropout_rng)
        bad = jnp.all(batch["encoder_input_tokens"] == target)
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


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, poisoned):
    with pytest.raises(faults.NonFiniteLoss, match=f"at step {POISONED_STEP}: stopped before "
                       r"saving it \(the newest checkpoint, step 5, is intact\)"):
        run(tmp_path, 12)
    assert os.listdir(tmp_path / "checkpoints") == ["5"]
    step, params = newest_params(tmp_path)
    assert step == 5 and all(np.all(np.isfinite(np.asarray(x)))
                             for x in jax.tree_util.tree_leaves(params))


def test_skip_leaves_the_parameters_and_counts_the_step(tmp_path, poisoned):
    run(tmp_path, 10, "t5x_lite.run_config.LoopConfig.nan_policy = 'skip'")
    rows = train_test.metric_rows(tmp_path, "train")
    assert [(row["step"], row["skipped_steps"]) for row in rows] == [(5, 0), (10, 1)]
    assert all(np.isfinite(row["loss"]) for row in rows)
    _, params = newest_params(tmp_path)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


def test_rollback_returns_to_the_checkpoint_and_goes_on(tmp_path, poisoned, capsys):
    run(tmp_path, 12, "t5x_lite.run_config.LoopConfig.nan_policy = 'rollback'")
    out = capsys.readouterr().out
    assert (f"Step {POISONED_STEP} had a non-finite loss or gradient norm: rolled back to the "
            "checkpoint at step 5, going on with the next batches.") in out
    assert "Finished at step 12" in out
    rows = train_test.metric_rows(tmp_path, "train")
    # Steps 6-10 ran twice (the first time with the NaN, not logged); then on to 12.
    assert [row["step"] for row in rows] == [5, 10]
    assert all(np.isfinite(row["loss"]) for row in rows)
    step, params = newest_params(tmp_path)
    assert step == 12 and all(np.all(np.isfinite(np.asarray(x)))
                              for x in jax.tree_util.tree_leaves(params))
