"""Task metrics from decoded predictions, through seqio's Evaluator: the task's examples are
decoded in batches on the mesh, detokenised, postprocessed, and scored by the task's metric
functions (data/metrics.py) against its targets. Used by t5x_lite.eval and, every
METRICS_PERIOD steps, by training.

Every host reads every example and passes its own rows of each batch to the global array;
predictions are gathered back, so all hosts compute the same metrics.
"""
import dataclasses
import itertools
from typing import Callable, Iterator, Sequence, TypeVar

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils

from t5x_lite import decoding
from t5x_lite import models
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline
from t5x_lite.data import tasks

Item = TypeVar("Item")

def host_share(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """The global arrays [B, ...] of a batch every host holds whole: each passes its own
    rows."""
    share = len(next(iter(batch.values()))) // jax.process_count()
    rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    return partitioning.global_batch({key: value[rows] for key, value in batch.items()}, mesh)


def gathered(array: jax.Array) -> np.ndarray:
    """A global array's values on every host."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How evaluation decodes: `method` and decoding.DecodeOptions fields."""

    method: decoding.Method = decoding.Method.GREEDY
    options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "method", decoding.parse_method(self.method))
        decoding.DecodeOptions(**self.options)


def predictor(model: models.Model, mesh, rules, decode_length: int,
              eos_id: int, settings: DecodeSettings = DecodeSettings()) -> Callable:
    """predict(params, tokens [B, L] NumPy, the same on every host) -> (tokens [B, N],
    scores [B]) as NumPy, decoded on the mesh."""
    jitted = trainer_lib.in_mesh(jax.jit(lambda p, tokens: model.predict_batch(
        p, {model.inputs_key: tokens}, max_decode_length=decode_length,
        method=settings.method, eos_id=eos_id, **settings.options)), mesh, rules)

    def predict(params, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        predicted, scores = jitted(params, host_share({"tokens": tokens}, mesh)["tokens"])
        return gathered(predicted), gathered(scores)

    return predict


def scorer(model: models.Model, mesh, rules) -> Callable:
    """score(params, batch of the model's features as NumPy, the same on every host) ->
    float32 [B] NumPy: each row's summed target log-probability (Model.score_batch)."""
    jitted = trainer_lib.in_mesh(jax.jit(model.score_batch), mesh, rules)
    return lambda params, batch: gathered(jitted(params, host_share(batch, mesh)))


def padded_batches(items: Iterator[Item], batch_size: int, length: int,
                   token_ids: Callable[[Item], Sequence[int]] = lambda ids: ids
                   ) -> Iterator[tuple[list[Item], np.ndarray]]:
    """(items, their token_ids zero-padded to tokens [batch_size, length]) in groups of
    `batch_size` items; the last group may be smaller, its missing rows all zero."""
    items = iter(items)
    while group := list(itertools.islice(items, batch_size)):
        tokens = np.zeros((batch_size, length), np.int32)
        for row, item in enumerate(group):
            ids = token_ids(item)
            tokens[row, :len(ids)] = ids
        yield group, tokens


def validation_metrics(model: models.Model, mesh, rules, task_name: str,
                       task_feature_lengths: dict[str, int], batch_size: int,
                       max_examples: int | None, decode: DecodeSettings = DecodeSettings()
                       ) -> Callable[..., dict[str, float]]:
    """score(params, step): the task's metrics on its validation split, computed on the
    mesh: decoded predictions for its prediction metrics (BLEU, ROUGE, ...), teacher-forced
    target scores for its score metrics (rank classification); the examples are read once,
    here."""
    metrics = TaskMetrics(task_name, "validation", dict(task_feature_lengths), batch_size,
                          max_examples, model.config.decoder_only)
    predict = predictor(model, mesh, rules, metrics.decode_length,
                        tasks.targets_vocabulary(task_name).eos_id, decode)
    score = scorer(model, mesh, rules)
    return lambda params, step: metrics(predict, score, params, step)


def has_metrics(task_name: str) -> bool:
    """Whether any task of `task_name` (a task or mixture) has metric functions."""
    return any(task.metric_objs for task in seqio.get_subtasks(
        tasks.get_task_or_mixture(task_name)))


class TaskMetrics:
    """The metrics of one task or mixture split; the examples are read once, at creation, in
    the model family's layout (`decoder_only`: prefix-LM rows, whose inputs are the
    decoder_causal_attention positions but the first). A classification task's examples are
    a classifier's rows, its predictions one class id each (the argmax of its head)."""

    def __init__(self, task_name: str, split: str, task_feature_lengths: dict[str, int],
                 batch_size: int, max_examples: int | None = None, decoder_only: bool = False):
        classification = bool(tasks.num_classes(task_name))
        pipeline.check_lengths(task_feature_lengths,
                               ("inputs",) if classification else ("inputs", "targets"))
        self.batch_size = batch_size
        self.input_length = task_feature_lengths["inputs"]
        self.decode_length = 1 if classification else task_feature_lengths["targets"]
        self._decoder_only = decoder_only
        if classification:
            converter = pipeline.ClassificationFeatureConverter(pack=False)
            sequence_length = {"inputs": self.input_length, "targets": 1}
        else:
            converter = (seqio.PrefixLMFeatureConverter if decoder_only
                         else seqio.EncDecFeatureConverter)(pack=False)
            sequence_length = dict(task_feature_lengths)
        self._evaluator = seqio.Evaluator(
            task_name, converter, eval_split=split,
            sequence_length=sequence_length, num_examples=max_examples,
            use_memory_cache=True, async_compute_metrics=False)
        if not self._evaluator.eval_tasks:
            raise ValueError(f"{task_name!r} has no task with metric functions and a {split!r} "
                             f"split: register it with metrics (e.g. register_text_task(..., "
                             f"objective='supervised'))")

    def _inputs(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The inputs of one converted example, EOS included."""
        if not self._decoder_only:
            return np.asarray(features["encoder_input_tokens"], np.int32)
        # The start token and the inputs attend bidirectionally: all but the first position.
        count = int(np.sum(features["decoder_causal_attention"])) - 1
        return np.asarray(features["decoder_target_tokens"][:count], np.int32)

    def _predict_fn(self, predict: Callable, params) -> Callable:
        def predict_fn(dataset) -> list[tuple[int, list[int]]]:
            examples = list(dataset.as_numpy_iterator())
            rows = (self._inputs(features) for _, features in examples)
            outputs = []
            for group, tokens in padded_batches(rows, self.batch_size, self.input_length):
                predicted, _ = predict(params, tokens)
                outputs.extend(predicted[:len(group)].tolist())
            return [(int(index), tokens) for (index, _), tokens in zip(examples, outputs)]

        return predict_fn

    def _score_fn(self, score: Callable, params) -> Callable:
        def score_fn(dataset) -> list[tuple[int, float]]:
            examples = list(dataset.as_numpy_iterator())
            scores = []
            for start in range(0, len(examples), self.batch_size):
                group = [features for _, features in examples[start:start + self.batch_size]]
                missing = self.batch_size - len(group)
                batch = {key: np.concatenate([
                    np.stack([features[key] for features in group]).astype(np.int32),
                    np.zeros((missing, len(group[0][key])), np.int32)]) for key in group[0]}
                scores.extend(score(params, batch)[:len(group)].tolist())
            return [(int(index), value) for (index, _), value in zip(examples, scores)]

        return score_fn

    def __call__(self, predict: Callable, score: Callable, params, step: int | None = None
                 ) -> dict[str, float]:
        """{metric: value} for a task; {"task/metric": value} for each task of a mixture.
        `predict` comes from `predictor`, `score` from `scorer`."""
        results, _ = self._evaluator.evaluate(
            compute_metrics=True, step=step, predict_fn=self._predict_fn(predict, params),
            score_fn=self._score_fn(score, params))
        by_task = results.result()
        flat = {}
        for task_name, values in by_task.items():
            prefix = "" if len(by_task) == 1 else f"{task_name}/"
            for name, value in values.items():
                flat[prefix + name] = float(getattr(value, "value", value))
        return flat
