"""Fine-tuning: a run starts from another run's parameters with a fresh optimizer state,
frozen parameters stay bit-identical, per-group rates scale the update exactly, and a
checkpoint of another model is a one-line error."""
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import checkpoints
from t5x_lite import launch
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import train
from tests import train_test
from tests import trainer_test
from tests.train_test import task_name  # noqa: F401  (the fixture registering the task)


def finetune_in_process(model_dir, init_from, steps: int, *extra: str) -> None:
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/finetune.gin"], [
        *train_test.bindings(model_dir, steps), f"INIT_FROM = '{init_from}'", *extra])
    try:
        gin.get_configurable(train.run)()
    finally:
        gin.clear_config()


def newest_params(model_dir):
    manager = checkpoints.create_manager(str(model_dir), read_only=True)
    step, metadata = checkpoints.params_metadata(manager)
    abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                      metadata)
    return checkpoints.restore_params(manager, abstract)


def test_frozen_encoder_stays_bit_identical(trained_tiny_dir, task_name, tmp_path,  # noqa: F811
                                            capsys):
    pretrained, finetuned = trained_tiny_dir, tmp_path / "finetuned"
    finetune_in_process(finetuned, pretrained, 5, "FROZEN = ['^encoder', 'embedder']")
    out = capsys.readouterr().out
    assert f"Initialised from the checkpoint at step 10 in {pretrained}" in out
    _, before = newest_params(pretrained)
    step, after = newest_params(finetuned)
    assert step == 5  # Counted from 0: a fresh run, not step 15.
    changed = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(after):
        name = optimizers.parameter_path(path)
        original = before
        for key in path:
            original = original[key.key]
        changed[name] = not np.array_equal(np.asarray(leaf), np.asarray(original))
    frozen = [name for name in changed if name.startswith("encoder") or "embedder" in name]
    assert frozen and not any(changed[name] for name in frozen)
    assert all(changed[name] for name in changed if name.startswith("decoder_layer"))


def test_rate_scales_scale_the_first_adamw_update_exactly():
    params = models.EncoderDecoderModel(trainer_test.CONFIG).init(jax.random.key(0))
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1) * jnp.sign(x + 1e-3), params)

    def first_update(optimizer):
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return updates

    adamw = lambda learning_rate: optimizers.adamw(learning_rate, weight_decay=0.0,  # noqa: E731
                                                   max_grad_norm=None)
    plain = first_update(adamw(1e-3))
    grouped = first_update(optimizers.with_parameter_groups(
        adamw, 1e-3, frozen=["relative_bias"],
        rate_scales=[("decoder_layer_1/", 0.5), ("decoder", 0.25)]))
    for path, update in jax.tree_util.tree_leaves_with_path(grouped):
        name = optimizers.parameter_path(path)
        reference = plain
        for key in path:
            reference = reference[key.key]
        scale = (0.0 if "relative_bias" in name else 0.5 if "decoder_layer_1/" in name
                 else 0.25 if "decoder" in name else 1.0)
        np.testing.assert_allclose(np.asarray(update), scale * np.asarray(reference),
                                   rtol=1e-6, atol=0)


def test_bad_init_from_is_one_line(trained_tiny_dir, task_name, tmp_path):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="INIT_FROM '.*' holds no checkpoint"):
        finetune_in_process(tmp_path / "a", tmp_path / "missing", 1)
    with pytest.raises(ValueError, match=r"holds checkpoints of another model: parameter "
                       r"decoder_layer_0/\S+ is 128x4x32 there and 64x4x32 in the gin model"):
        finetune_in_process(tmp_path / "b", trained_tiny_dir, 1, "models.T5Config.d_model = 64")
    with pytest.raises(ValueError, match="not a regular expression"):
        optimizers.with_parameter_groups(optimizers.adafactor, 1e-3, frozen=["(encoder"])
