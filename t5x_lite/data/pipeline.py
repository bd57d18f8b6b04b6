"""Task -> encoder-decoder features (packed or not) -> fixed-shape NumPy batches for one host.
Each host reads a disjoint shard of the documents; assembling global arrays and saving the
iterator position are left to the trainer.

Batch keys (all int32): encoder_* [B, L] with L = task_feature_lengths["inputs"] and
decoder_* [B, T] with T = task_feature_lengths["targets"].
"""
import os
import pathlib
import tempfile
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import tasks

ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                "decoder_segment_ids", "decoder_positions")
BATCH_KEYS = ENCODER_KEYS + DECODER_KEYS


def check_lengths(task_feature_lengths: dict[str, int]) -> None:
    for key in ("inputs", "targets"):
        if key not in task_feature_lengths:
            raise ValueError(f"task_feature_lengths needs key {key!r}, got "
                             f"{dict(task_feature_lengths)}")
        if task_feature_lengths[key] < 2:
            raise ValueError(f"task_feature_lengths[{key!r}] must be >= 2, got "
                             f"{task_feature_lengths[key]}")


def _add_unpacked_segments(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Gives an unpacked example the packed layout: segment 1 on tokens, 0 on padding, and
    positions counting from 0 (0 on padding, as packing leaves them)."""
    features = dict(features)
    # Unpacked conversion shifts the padded targets, carrying EOS into the first padding slot;
    # packing leaves 0 there, and one layout should mean one set of values.
    features["decoder_input_tokens"] *= tf.cast(features["decoder_target_tokens"] != 0,
                                                features["decoder_input_tokens"].dtype)
    for prefix, tokens_key in (("encoder", "encoder_input_tokens"),
                               ("decoder", "decoder_target_tokens")):
        is_token = tf.cast(features[tokens_key] != 0, tf.int32)
        features[f"{prefix}_segment_ids"] = is_token
        features[f"{prefix}_positions"] = tf.range(tf.size(is_token), dtype=tf.int32) * is_token
    return features


def _pad_batch(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
    """Pads a final partial batch with all-zero rows (zero loss weight) to `batch_size` rows."""
    def pad(x):
        x = tf.pad(x, [[0, batch_size - tf.shape(x)[0]], [0, 0]])
        return tf.ensure_shape(x, [batch_size, x.shape[1]])

    return {key: pad(value) for key, value in batch.items()}


def get_dataset(task_name: str, split: str, task_feature_lengths: dict[str, int],
                batch_size: int, *, shuffle: bool, seed: int | None, repeat: bool,
                pack: bool = True, shard_index: int = 0, num_shards: int = 1
                ) -> tf.data.Dataset:
    """The tf.data pipeline behind `get_batches`, yielding batches of int32 tensors."""
    check_lengths(task_feature_lengths)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if shuffle and seed is None and num_shards > 1:
        raise ValueError("shuffling across num_shards > 1 hosts needs a seed: hosts must agree on "
                         "the document order to read disjoint shards")
    provider = tasks.get_task_or_mixture(task_name)
    # Our sources list a single shard per split, so seqio shards the documents themselves before
    # any preprocessing; hosts sharing a seed shuffle them alike, so their shards are disjoint.
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
    dataset = provider.get_dataset(
        sequence_length=task_feature_lengths, split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info if num_shards > 1 else None, num_epochs=None if repeat else 1)
    converter = seqio.EncDecFeatureConverter(pack=pack)
    dataset = converter(dataset, task_feature_lengths)
    if not pack:
        dataset = dataset.map(_add_unpacked_segments, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda features: {key: tf.cast(features[key], tf.int32)
                                            for key in BATCH_KEYS})
    dataset = dataset.batch(batch_size, drop_remainder=repeat)
    if not repeat:
        dataset = dataset.map(lambda batch: _pad_batch(batch, batch_size))
    return dataset.prefetch(tf.data.AUTOTUNE)


class TrainBatches:
    """An endless iterator over this host's training batches (NumPy, like get_batches) whose
    position can be saved and restored exactly: `state()` is the tf.data iterator's state
    (shuffle buffers, packing, prefetched batches) as {file name: bytes}, and
    `restore(state)` puts a freshly built pipeline of the same settings at that position."""

    def __init__(self, dataset: tf.data.Dataset):
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise ValueError("the training split yields no examples: its corpus is empty or "
                             "every document is filtered out; check the task's source") from None
        return {key: value.numpy() for key, value in batch.items()}

    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(iterator=self._iterator)

    def state(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as directory:
            self._checkpoint().write(os.path.join(directory, "iterator"))
            return {name: pathlib.Path(directory, name).read_bytes()
                    for name in os.listdir(directory)}

    def restore(self, state: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            for name, data in state.items():
                pathlib.Path(directory, name).write_bytes(data)
            try:
                self._checkpoint().read(os.path.join(directory, "iterator")).assert_consumed()
            except (tf.errors.OpError, AssertionError, ValueError) as error:
                raise ValueError(
                    "the input position saved in the checkpoint does not fit this pipeline "
                    f"({type(error).__name__}): resume with the task, lengths and batch size "
                    "that saved it, or use another MODEL_DIR") from None


def get_batches(task_name: str, split: str, task_feature_lengths: dict[str, int],
                batch_size: int, *, shuffle: bool, seed: int | None, repeat: bool,
                pack: bool = True, shard_index: int = 0, num_shards: int = 1
                ) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `task_name`/`split` as int32 NumPy arrays keyed by BATCH_KEYS.

    Args:
      task_feature_lengths: {"inputs": L, "targets": T}, tokens per row including EOS.
      batch_size: rows per batch on this host.
      shuffle: shuffle files and examples; with `seed` (and the same `num_shards`) the batches,
        including the span-corruption noise, are the same on every run.
      repeat: cycle forever; otherwise stop after one pass, padding the last batch with
        all-zero rows.
      pack: pack several examples per row; unpacked rows still carry segment ids (1 on
        tokens) and positions so the model sees one layout.
      shard_index, num_shards: this host's disjoint share of the documents.
    """
    return get_dataset(task_name, split, task_feature_lengths, batch_size, shuffle=shuffle,
                       seed=seed, repeat=repeat, pack=pack, shard_index=shard_index,
                       num_shards=num_shards).as_numpy_iterator()
