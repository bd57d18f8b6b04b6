"""A gin/models/ preset as the benchmarks build it: its config (the gin file parsed alone),
its trainer with a compiled train step, and a batch shaped as a fully packed one."""
import dataclasses
import os

from t5x_lite import launch

PRESET_DIR = os.path.join(launch.GIN_DIR, "models")
OPTIMIZERS = ("adafactor", "adamw")


def available_presets() -> list[str]:
    return sorted(name[:-len(".gin")] for name in os.listdir(PRESET_DIR) if name.endswith(".gin"))


def check_preset(preset: str) -> None:
    if preset not in available_presets():
        raise launch.UsageError(f"unknown preset {preset!r}: choose one of "
                                f"{', '.join(available_presets())} (files in {PRESET_DIR})")


def bound_by_file(path: str, configurable):
    """`configurable()` as the gin file at `path` alone binds it.

    Without launch.parse_gin's defaults and imports (the data pipeline, t5x_lite.train): the
    train step's benchmark then runs where TensorFlow and seqio are not installed (GPU hosts).
    """
    import gin

    gin.clear_config()
    try:
        gin.parse_config_file(path)
        return gin.get_configurable(configurable)()
    finally:
        gin.clear_config()


def model_config_of(preset: str, **overrides):
    """The preset's models.T5Config as its gin file binds it (dropout included), in float32,
    with `overrides` of its fields."""
    import jax.numpy as jnp
    from t5x_lite import models

    check_preset(preset)
    config = bound_by_file(os.path.join(PRESET_DIR, f"{preset}.gin"), models.T5Config)
    return dataclasses.replace(config, **{"activation_dtype": jnp.float32, **overrides})


def packed_shaped_batch(batch: int, inputs: int, targets: int, vocab_size: int,
                        decoder_only: bool = False, encoder_only: bool = False) -> dict:
    """Random tokens in [1, vocab_size) in every key of pipeline.BATCH_KEYS, one segment per
    row: what a fully packed batch looks like to the train step. Arrays are int32
    [batch, inputs] (encoder_*) and [batch, targets] (decoder_*); for a decoder-only model
    the decoder_* keys alone, [batch, inputs + targets], the inputs attending as a
    prefix-LM's; for an encoder-only model a masked LM's encoder_* keys, [batch, inputs]
    (`targets` unused), the loss on every position (which positions weigh costs nothing)."""
    import numpy as np

    if encoder_only:
        arrays = packed_shaped_batch(batch, inputs, 2, vocab_size)
        arrays = {key: value for key, value in arrays.items() if key.startswith("encoder")}
        arrays["encoder_target_tokens"] = arrays["encoder_input_tokens"]
        arrays["encoder_loss_weights"] = np.ones((batch, inputs), np.int32)
        return arrays
    if decoder_only:
        arrays = packed_shaped_batch(batch, 1, inputs + targets, vocab_size)
        arrays = {key: value for key, value in arrays.items() if key.startswith("decoder")}
        # seqio's prefix-LM layout: the start token and the inputs attend bidirectionally;
        # the loss is on the targets' positions.
        position = np.arange(inputs + targets)
        arrays["decoder_causal_attention"] = np.tile((position <= inputs).astype(np.int32),
                                                     (batch, 1))
        arrays["decoder_loss_weights"] = np.tile((position >= inputs).astype(np.int32),
                                                 (batch, 1))
        return arrays
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, length in (("encoder", inputs), ("decoder", targets)):
        arrays[f"{prefix}_segment_ids"] = np.ones((batch, length), np.int32)
        arrays[f"{prefix}_positions"] = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    arrays["encoder_input_tokens"] = rng.integers(1, vocab_size, (batch, inputs), np.int32)
    arrays["decoder_target_tokens"] = rng.integers(1, vocab_size, (batch, targets), np.int32)
    arrays["decoder_input_tokens"] = np.pad(arrays["decoder_target_tokens"][:, :-1],
                                            ((0, 0), (1, 0)))
    arrays["decoder_loss_weights"] = np.ones((batch, targets), np.int32)
    return arrays


def train_setup(preset: str, batch: int, inputs: int, targets: int,
                optimizer: str = "adafactor", **overrides):
    """(trainer, initial state, compiled train step, device-resident packed-shaped batch)
    for the preset, trained as gin/runs/pretrain.gin trains it: Adafactor with T5's rsqrt
    schedule (the rate's value does not change the step's cost), or AdamW (as
    transformers is trained with --compare-hf), data parallel over all devices."""
    import jax
    from t5x_lite import optimizers
    from t5x_lite import partitioning
    from t5x_lite import trainer as trainer_lib

    if batch % jax.device_count():
        raise launch.UsageError(f"--batch {batch} must divide evenly over the "
                                f"{jax.device_count()} devices: pass a multiple of it")
    config = model_config_of(preset, **overrides)
    transform = optimizers.adamw if optimizer == "adamw" else optimizers.adafactor
    trainer = trainer_lib.build_trainer(config, optimizers.rsqrt_schedule(), transform,
                                        partitioning.MeshConfig(), seed=0)
    arrays = packed_shaped_batch(batch, inputs, targets, config.vocab_size,
                                 config.decoder_only, config.encoder_only)
    device_batch = partitioning.global_batch(arrays, trainer.mesh)
    return trainer, trainer.init_state(seed=0), trainer.compile_train_step(), device_batch
