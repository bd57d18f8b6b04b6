"""Task -> model features (packed or not) -> fixed-shape NumPy batches.

The input stream of a run is a fixed number of input shards (disjoint shares of the documents,
each its own tf.data pipeline): the global batch is their batches concatenated in shard order,
so it is the same whatever the number of hosts that read them. Each host reads the shards whose
rows its devices hold; each shard's position is saved by name, so a checkpoint resumes on any
host count that divides the shard count. Assembling global arrays is left to the trainer.

Batch keys (all int32). For an encoder-decoder: encoder_* [B, L] with
L = task_feature_lengths["inputs"] and decoder_* [B, T] with T = task_feature_lengths["targets"].
For a decoder-only model (`decoder_only`), decoder_* and decoder_causal_attention alone: a task
with inputs becomes a prefix-LM row [B, L + T] (seqio's PrefixLMFeatureConverter: inputs and
targets concatenated, loss on the targets, decoder_causal_attention 1 over the inputs), a task
of targets only a causal-LM row [B, T] (LMFeatureConverter; decoder_causal_attention all 0).
For an encoder-only model (`encoder_only`), rows of L = task_feature_lengths["inputs"] tokens (a
'targets' length is ignored): a masked-LM task gives ENCODER_ONLY_KEYS [B, L], the loss weights
on its chosen positions; a classification task CLASSIFICATION_KEYS, one example per row (never
packed), its label as classification_labels [B, 1].
"""
import os
import pathlib
import tempfile
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import preprocessors
from t5x_lite.data import tasks

ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                "decoder_segment_ids", "decoder_positions")
BATCH_KEYS = ENCODER_KEYS + DECODER_KEYS
DECODER_ONLY_KEYS = DECODER_KEYS + ("decoder_causal_attention",)
ENCODER_ONLY_KEYS = ("encoder_input_tokens", "encoder_target_tokens", "encoder_loss_weights",
                     "encoder_segment_ids", "encoder_positions")
CLASSIFICATION_KEYS = ENCODER_KEYS + ("classification_labels", "classification_weights")


def check_lengths(task_feature_lengths: dict[str, int],
                  keys: tuple[str, ...] = ("inputs", "targets")) -> None:
    for key in keys:
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
    if "decoder_input_tokens" in features:
        # Unpacked conversion shifts the padded targets, carrying EOS into the first padding
        # slot; packing leaves 0 there, and one layout should mean one set of values.
        features["decoder_input_tokens"] *= tf.cast(features["decoder_target_tokens"] != 0,
                                                    features["decoder_input_tokens"].dtype)
    for prefix, tokens_key in (("encoder", "encoder_input_tokens"),
                               ("decoder", "decoder_target_tokens")):
        if tokens_key not in features:
            continue
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


class MaskedLMFeatureConverter(seqio.FeatureConverter):
    """Masked-LM examples {"inputs", "targets", MLM_WEIGHTS} -> encoder_input_tokens,
    encoder_target_tokens, encoder_loss_weights (packed: and encoder_segment_ids,
    encoder_positions) of the "inputs" length. seqio's EncoderFeatureConverter weights only
    the positions holding the mask token; BERT's loss is on every chosen position, those
    replaced by a random token and those kept included, which MLM_WEIGHTS marks."""

    TASK_FEATURES = {key: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                     for key in ("inputs", "targets", preprocessors.MLM_WEIGHTS)}
    MODEL_FEATURES = {key: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                      for key in ENCODER_ONLY_KEYS[:3]}
    PACKING_FEATURE_DTYPES = {"encoder_segment_ids": tf.int32, "encoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: dict[str, int]
                          ) -> tf.data.Dataset:
        def align_weights(features):
            # The weights end where the chunk did, before the EOS the task appended. Packing
            # takes trailing zeros for padding and drops them, which would shift the next
            # example's weights: they travel as 1 (not chosen) and 2 (chosen) until unpacked.
            weights = features[preprocessors.MLM_WEIGHTS][:tf.size(features["inputs"])]
            padding = tf.size(features["inputs"]) - tf.size(weights)
            return {**features, preprocessors.MLM_WEIGHTS: tf.pad(weights, [[0, padding]]) + 1}

        def convert(features):
            weights = tf.maximum(features[preprocessors.MLM_WEIGHTS] - 1, 0)
            converted = {"encoder_input_tokens": features["inputs"],
                         "encoder_target_tokens": features["targets"],
                         "encoder_loss_weights": weights}
            if self.pack:
                converted["encoder_segment_ids"] = features["inputs_segment_ids"]
                converted["encoder_positions"] = features["inputs_positions"]
            return converted

        ds = ds.map(align_weights, num_parallel_calls=tf.data.AUTOTUNE)
        return self._pack_or_pad(ds, task_feature_lengths).map(
            convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: dict[str, int]
                                  ) -> dict[str, int]:
        keys = ENCODER_ONLY_KEYS if self.pack else ENCODER_ONLY_KEYS[:3]
        return {key: task_feature_lengths["inputs"] for key in keys}


class ClassificationFeatureConverter(seqio.FeatureConverter):
    """Classification examples {"inputs", "targets": [label]} -> encoder_input_tokens of the
    "inputs" length, classification_labels [1] and classification_weights [1] (1: a real
    example; the all-zero rows that pad a last batch weigh 0). One example per row: a
    pooled head reads a whole row, so rows are never packed."""

    TASK_FEATURES = {key: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                     for key in ("inputs", "targets")}
    MODEL_FEATURES = {key: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                      for key in ("encoder_input_tokens", *CLASSIFICATION_KEYS[3:])}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, **options):
        super().__init__(**options)
        if self.pack:
            raise ValueError("classification rows hold one example each: pass pack=False")

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: dict[str, int]
                          ) -> tf.data.Dataset:
        return self._pack_or_pad(ds, task_feature_lengths).map(lambda features: {
            "encoder_input_tokens": features["inputs"],
            "classification_labels": features["targets"],
            "classification_weights": tf.ones_like(features["targets"])},
            num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: dict[str, int]
                                  ) -> dict[str, int]:
        return {"encoder_input_tokens": task_feature_lengths["inputs"],
                "classification_labels": 1, "classification_weights": 1}


def encoder_only_lengths(task_feature_lengths: dict[str, int]) -> dict[str, int]:
    """The lengths an encoder-only model's tasks are read at: its rows' 'inputs' length for
    inputs and targets alike (a masked LM's targets are its inputs' chunk; a classifier's,
    one label). ValueError naming the fix when 'inputs' is missing."""
    if "inputs" not in task_feature_lengths:
        raise ValueError(f"an encoder_only model's rows are TASK_FEATURE_LENGTHS['inputs'] "
                         f"tokens, which {dict(task_feature_lengths)} lacks: add it, e.g. "
                         "{'inputs': 512} (a 'targets' length is ignored)")
    check_lengths(task_feature_lengths, ("inputs",))
    length = task_feature_lengths["inputs"]
    return {"inputs": length, "targets": length}


def feature_converter(task_name: str, element_spec: dict, decoder_only: bool, pack: bool,
                      encoder_only: bool = False
                      ) -> tuple[seqio.FeatureConverter, tuple[str, ...]]:
    """(the seqio converter for the model family and the task's features, the batch keys)."""
    has_inputs = "inputs" in element_spec
    masked_lm = preprocessors.MLM_WEIGHTS in element_spec
    classification = bool(tasks.num_classes(task_name))
    if encoder_only:
        if masked_lm:
            return MaskedLMFeatureConverter(pack=pack), ENCODER_ONLY_KEYS
        if classification:
            return ClassificationFeatureConverter(pack=False), CLASSIFICATION_KEYS
        raise ValueError(
            f"task {task_name!r} has targets to generate, which an encoder_only model cannot: "
            "train it on a masked-LM task (gin/objectives/bert_mlm.gin) or a classification "
            "task (tasks.register_classification_task), or use an encoder_decoder or "
            "decoder_only model")
    if masked_lm or classification:
        kind = "a masked-LM" if masked_lm else "a classification"
        raise ValueError(f"task {task_name!r} is {kind} task, for encoder_only models: use "
                         "an encoder-only preset (gin/models/encoder_only_*.gin)")
    if not decoder_only:
        if not has_inputs:
            raise ValueError(
                f"task {task_name!r} has targets only (a causal LM), which an encoder_decoder "
                "model cannot train on: use a decoder-only model (gin/models/decoder_only_*.gin)"
                " or an objective with inputs")
        return seqio.EncDecFeatureConverter(pack=pack), BATCH_KEYS
    if has_inputs:
        return seqio.PrefixLMFeatureConverter(pack=pack), DECODER_ONLY_KEYS
    return seqio.LMFeatureConverter(pack=pack), DECODER_ONLY_KEYS


def task_dataset(task_name: str, task_feature_lengths: dict[str, int], **options
                 ) -> tf.data.Dataset:
    """The task's (or mixture's) token examples, seqio's get_dataset with `options`; a
    length its preprocessors need but TASK_FEATURE_LENGTHS lacks is a one-line error."""
    try:
        return tasks.get_task_or_mixture(task_name).get_dataset(
            sequence_length=dict(task_feature_lengths), **options)
    except KeyError as missing:
        raise ValueError(
            f"task {task_name!r} needs the {missing.args[0]!r} length, which "
            f"TASK_FEATURE_LENGTHS = {dict(task_feature_lengths)} lacks: add it (e.g. "
            "{'inputs': 512, 'targets': 114}; a decoder-only model's rows hold both)"
            ) from None


def converter_lengths(task_feature_lengths: dict[str, int], element_spec: dict,
                      converter: seqio.FeatureConverter | None = None) -> dict[str, int]:
    """The lengths `converter` takes: a masked LM's inputs length for its three features; a
    classifier's inputs length and its one-id target; a causal-LM task's targets alone;
    otherwise both."""
    if isinstance(converter, MaskedLMFeatureConverter):
        length = encoder_only_lengths(task_feature_lengths)["inputs"]
        return {key: length for key in MaskedLMFeatureConverter.TASK_FEATURES}
    if isinstance(converter, ClassificationFeatureConverter):
        return {"inputs": encoder_only_lengths(task_feature_lengths)["inputs"], "targets": 1}
    keys = ("inputs", "targets") if "inputs" in element_spec else ("targets",)
    check_lengths(task_feature_lengths, keys)
    return {key: task_feature_lengths[key] for key in keys}


def get_dataset(task_name: str, split: str, task_feature_lengths: dict[str, int],
                batch_size: int, *, shuffle: bool, seed: int | None, repeat: bool,
                pack: bool = True, shard_index: int = 0, num_shards: int = 1,
                decoder_only: bool = False, encoder_only: bool = False) -> tf.data.Dataset:
    """One input shard's tf.data pipeline (shard `shard_index` of `num_shards`, `batch_size`
    rows a batch), yielding batches of int32 tensors in the layout of the model family."""
    if encoder_only:
        task_feature_lengths = encoder_only_lengths(task_feature_lengths)
    check_lengths(task_feature_lengths, ("targets",))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if shuffle and seed is None and num_shards > 1:
        raise ValueError("shuffling num_shards > 1 input shards needs a seed: the shards must "
                         "agree on the document order to be disjoint")
    # Our sources list a single shard per split, so seqio shards the documents themselves before
    # any preprocessing; shards sharing a seed shuffle them alike, so they are disjoint.
    shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
    dataset = task_dataset(
        task_name, task_feature_lengths, split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info if num_shards > 1 else None, num_epochs=None if repeat else 1)
    return model_batches(dataset, task_name, task_feature_lengths, batch_size, pack=pack,
                         repeat=repeat, decoder_only=decoder_only, encoder_only=encoder_only)


def model_batches(dataset: tf.data.Dataset, task_name: str,
                  task_feature_lengths: dict[str, int], batch_size: int, *, pack: bool,
                  repeat: bool, decoder_only: bool, encoder_only: bool = False
                  ) -> tf.data.Dataset:
    """Token examples {"inputs"?, "targets"} -> batches of the model family's features
    (`task_name`, a registered task or mixture, names the examples in errors and says
    whether they are a classifier's); without `repeat` the last batch is padded with
    all-zero rows."""
    converter, keys = feature_converter(task_name, dataset.element_spec, decoder_only, pack,
                                        encoder_only)
    dataset = converter(dataset, converter_lengths(task_feature_lengths, dataset.element_spec,
                                                   converter))
    if not converter.pack:
        dataset = dataset.map(_add_unpacked_segments, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda features: {
        key: tf.cast(features[key], tf.int32) if key in features
        else tf.zeros_like(features["decoder_target_tokens"], tf.int32) for key in keys})
    dataset = dataset.batch(batch_size, drop_remainder=repeat)
    if not repeat:
        dataset = dataset.map(lambda batch: _pad_batch(batch, batch_size))
    return dataset.prefetch(tf.data.AUTOTUNE)


def shard_name(index: int, num_shards: int) -> str:
    """Input shard `index` of `num_shards` as checkpoints name its saved position."""
    return f"shard_{index:05d}-of-{num_shards:05d}"


class ShardedBatches:
    """An iterator over this host's rows of each global batch (NumPy, like get_batches): the
    batches of the input shards it reads, concatenated in shard order.

    Endless pipelines (training) must yield; a finite one (evaluation) that has run out
    gives all-zero rows (zero loss weight) until every shard has, which ends the iteration.
    `state()` is each shard's tf.data iterator state (shuffle buffers, carried tokens, packing,
    prefetched batches) as {shard name: {file name: bytes}}; `restore(state)` puts freshly
    built shards of the same settings at those positions.
    """

    def __init__(self, datasets: dict[str, tf.data.Dataset], endless: bool):
        self._iterators = {name: iter(dataset) for name, dataset in datasets.items()}
        self._zeros = {name: {key: np.zeros(spec.shape, spec.dtype.as_numpy_dtype)
                              for key, spec in dataset.element_spec.items()}
                       for name, dataset in datasets.items()}
        self._endless = endless
        self._exhausted = set()

    def __iter__(self):
        return self

    def _next_rows(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._exhausted:
            batch = next(self._iterators[name], None)
            if batch is not None:
                return {key: value.numpy() for key, value in batch.items()}
            if self._endless:
                raise ValueError("the training split yields no examples: its corpus is empty "
                                 "or every document is filtered out; check the task's source")
            self._exhausted.add(name)
        return self._zeros[name]

    def zeros(self) -> dict[str, np.ndarray]:
        """This host's rows of a batch, all zero (zero loss weight): what it feeds to a step
        every host must join after its own shards have run out."""
        return self._concatenated(list(self._zeros.values()))

    def _concatenated(self, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.concatenate([shard[key] for shard in rows]) for key in rows[0]}

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_rows(name) for name in self._iterators]
        if len(self._exhausted) == len(self._iterators):
            raise StopIteration
        return self._concatenated(rows)

    def state(self) -> dict[str, dict[str, bytes]]:
        return {name: _iterator_state(iterator) for name, iterator in self._iterators.items()}

    def restore(self, state: dict[str, dict[str, bytes]]) -> None:
        for name, iterator in self._iterators.items():
            _restore_iterator(iterator, state[name])


def _iterator_state(iterator) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as directory:
        tf.train.Checkpoint(iterator=iterator).write(os.path.join(directory, "iterator"))
        return {name: pathlib.Path(directory, name).read_bytes()
                for name in os.listdir(directory)}


def _restore_iterator(iterator, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        for name, data in files.items():
            pathlib.Path(directory, name).write_bytes(data)
        try:
            tf.train.Checkpoint(iterator=iterator).read(
                os.path.join(directory, "iterator")).assert_consumed()
        except (tf.errors.OpError, AssertionError, ValueError) as error:
            raise ValueError(
                "the input position saved in the checkpoint does not fit this pipeline "
                f"({type(error).__name__}): resume with the task, lengths and batch size "
                "that saved it, or use another MODEL_DIR") from None


def get_shard_batches(task_name: str, split: str, task_feature_lengths: dict[str, int],
                      batch_size: int, *, shuffle: bool, seed: int | None, repeat: bool,
                      pack: bool = True, num_shards: int = 1,
                      shard_indices: Sequence[int] | None = None,
                      decoder_only: bool = False, encoder_only: bool = False
                      ) -> ShardedBatches:
    """This host's rows of each global batch of `batch_size` rows, read from `num_shards`
    input shards: shard s gives rows [s * B / S, (s + 1) * B / S) of every batch. The host
    reads `shard_indices` (default all; consecutive) and gets their rows. Other arguments as
    `get_batches`; with `repeat` the iterator is endless and its position can be saved."""
    if batch_size % num_shards:
        raise ValueError(f"batch_size {batch_size} does not split over {num_shards} input "
                         f"shards: use a multiple of {num_shards}")
    shard_indices = range(num_shards) if shard_indices is None else shard_indices
    datasets = {shard_name(index, num_shards): get_dataset(
        task_name, split, task_feature_lengths, batch_size // num_shards, shuffle=shuffle,
        seed=seed, repeat=repeat, pack=pack, shard_index=index, num_shards=num_shards,
        decoder_only=decoder_only, encoder_only=encoder_only) for index in shard_indices}
    return ShardedBatches(datasets, endless=repeat)


def get_batches(task_name: str, split: str, task_feature_lengths: dict[str, int],
                batch_size: int, *, shuffle: bool, seed: int | None, repeat: bool,
                pack: bool = True, decoder_only: bool = False, encoder_only: bool = False
                ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `task_name`/`split` read as one input shard, as int32 NumPy arrays keyed by
    BATCH_KEYS (DECODER_ONLY_KEYS with `decoder_only`; with `encoder_only`,
    ENCODER_ONLY_KEYS for a masked-LM task, CLASSIFICATION_KEYS for a classification one).

    Args:
      task_feature_lengths: {"inputs": L, "targets": T}, tokens per row including EOS.
      batch_size: rows per batch on this host.
      shuffle: shuffle files and examples; with `seed` the batches, including the
        span-corruption noise, are the same on every run.
      repeat: cycle forever; otherwise stop after one pass, padding the last batch with
        all-zero rows.
      pack: pack several examples per row; unpacked rows still carry segment ids (1 on
        tokens) and positions so the model sees one layout.
    """
    return get_dataset(task_name, split, task_feature_lengths, batch_size, shuffle=shuffle,
                       seed=seed, repeat=repeat, pack=pack,
                       decoder_only=decoder_only,
                       encoder_only=encoder_only).as_numpy_iterator()
