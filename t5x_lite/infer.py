"""Inference entry point: decodes the inputs of a task split, or of a text / JSONL file, with
the newest checkpoint in MODEL_DIR and writes one JSON line per input: input, prediction,
score (and target, for a task split). In score mode (INFER_MODE = 'score') it decodes nothing:
each line holds an example's input, target and score, the summed log-probability of the
target given the input (teacher forced; T5X's infer in score mode).

  python -m t5x_lite.infer --gin_file=gin/quickstart.gin --gin_file=gin/runs/infer.gin \\
      --gin.INFER_OUTPUT="'runs/quickstart/predictions.jsonl'" [--gin.INFER_INPUTS="'in.txt'"]
      [--gin.DECODE_METHOD="'beam'" --gin.DECODE_OPTIONS="{'beam_size': 4, 'alpha': 0.6}"]
      [--gin.INFER_MODE="'score'"]   # a .jsonl file then needs a target field per input

The output appears only once complete (written beside it, then renamed).
"""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "no predictions were written; rerun the same command to decode")

import enum  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from typing import Iterator  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from t5x_lite import choices  # noqa: E402
from t5x_lite import decoding  # noqa: E402
from t5x_lite import evaluation  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import models  # noqa: E402
from t5x_lite import partitioning  # noqa: E402
from t5x_lite import run_config  # noqa: E402
from t5x_lite import warm_start  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402
from t5x_lite.data import tasks  # noqa: E402
from t5x_lite.data import vocab  # noqa: E402

say = run_config.say


class Mode(enum.Enum):
    """INFER_MODE: what infer writes for each example."""

    PREDICT = "predict"  # the decoded prediction and its score
    SCORE = "score"  # the target's summed log-probability given the input; nothing decoded


def read_records(path: str, fields: dict[str, str]) -> list[tuple[str, ...]]:
    """The `fields` (JSON field -> the run() argument naming it) of each line of a .jsonl
    file; of a .txt file, each non-empty line, when one field is asked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INFER_INPUTS file {path!r} does not exist: pass a .txt file "
                                "(one input per line) or a .jsonl file")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not path.endswith(".jsonl"):
        if len(fields) > 1:
            raise ValueError(f"INFER_INPUTS {path!r} is not a .jsonl file: score mode reads an "
                             f"input and a target per line, pass a .jsonl file with fields "
                             f"{' and '.join(map(repr, fields))}")
        return [(line,) for line in lines]
    records = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        for field, argument in fields.items():
            if field not in record:
                raise ValueError(f"{path}:{number} has no field {field!r}: set "
                                 f"t5x_lite.infer.run.{argument} to the field holding it")
        records.append(tuple(str(record[field]) for field in fields))
    return records


def file_examples(texts: list[str], vocabulary, input_length: int) -> Iterator[dict]:
    """Tokenised inputs, EOS-terminated and cut to input_length."""
    for text in texts:
        yield {"input": text, "ids": _token_ids(text, vocabulary, input_length)}


def _token_ids(text: str, vocabulary, length: int) -> list[int]:
    return list(vocabulary.encode(text))[:length - 1] + [vocabulary.eos_id]


def split_examples(data: run_config.DataConfig, split: str, vocabulary) -> Iterator[dict]:
    """The task split's examples, in order (every host reads all of them): input and target
    text and token ids ("ids" the inputs', "target_ids" the targets'). A task without inputs
    (a causal LM) gives empty inputs."""
    lengths = dict(data.task_feature_lengths)
    with_inputs = tasks.has_inputs(data.mixture_or_task_name)
    for batch in pipeline.get_batches(
            data.mixture_or_task_name, split, lengths, 1, shuffle=False, seed=0,
            repeat=False, pack=False, decoder_only=not with_inputs):
        ids = [int(i) for i in batch["encoder_input_tokens"][0] if i] if with_inputs else []
        target_ids = [int(i) for i in batch["decoder_target_tokens"][0] if i]
        yield {"input": vocab.show_ids(vocabulary, ids), "ids": ids,
               "target": vocab.show_ids(vocabulary, target_ids), "target_ids": target_ids}


def run(model_config: models.T5Config = gin.REQUIRED,
        data: run_config.DataConfig = gin.REQUIRED, model_dir: str = gin.REQUIRED,
        output_file: str = gin.REQUIRED,
        input_file: str | None = None, input_field: str = "inputs",
        target_field: str = "targets", split: str = "validation",
        max_examples: int | None = None, mode: Mode | str = Mode.PREDICT,
        method: decoding.Method | str = decoding.Method.GREEDY,
        decode_options: dict | None = None, max_decode_length: int | None = None,
        mesh_config: partitioning.MeshConfig = partitioning.MeshConfig()) -> int:
    """Writes predictions (or, in score mode, scores) to `output_file` and returns how many.
    `max_decode_length` defaults to the targets length of TASK_FEATURE_LENGTHS (the training
    run's, unless bound)."""
    mode = choices.parse(Mode, mode, "INFER_MODE")
    if model_config.encoder_only:
        raise ValueError("t5x_lite.infer decodes or scores targets, which an encoder_only "
                         "model has none of: evaluate it with t5x_lite.eval (validation loss "
                         "and accuracy; a classifier's accuracy on its task)")
    method = decoding.parse_method(method)
    options = decoding.DecodeOptions(**(decode_options or {}))
    fields = {input_field: "input_field"}
    if mode is Mode.SCORE:
        fields[target_field] = "target_field"
    records = read_records(input_file, fields) if input_file else None
    restored = warm_start.restore_run(model_config, data, model_dir, mesh_config)
    vocabulary = tasks.targets_vocabulary(restored.data.mixture_or_task_name)
    if mode is Mode.SCORE:
        rows, what = scored(restored, mesh_config.rules, records, split, max_examples,
                            vocabulary), "scores"
    else:
        rows, what = predicted(restored, mesh_config.rules, records, split, max_examples,
                               vocabulary, method, options, max_decode_length), \
            f"predictions ({method.value})"
    if jax.process_index() == 0:
        _write_atomically(output_file, rows)
    say(f"Checkpoint step {restored.step}: wrote {len(rows)} {what} to {output_file}")
    return len(rows)


def predicted(restored: warm_start.RestoredRun, rules, records: list | None, split: str,
              max_examples: int | None, vocabulary, method: decoding.Method,
              options: decoding.DecodeOptions, max_decode_length: int | None) -> list[dict]:
    """One {input, prediction, score (, target)} per example, decoded on the mesh."""
    data = restored.data
    input_length = data.prompt_length()
    decode_length = max_decode_length or data.task_feature_lengths["targets"]
    examples = (file_examples([record[0] for record in records], vocabulary, input_length)
                if records is not None else split_examples(data, split, vocabulary))
    predict = evaluation.predictor(restored.model, restored.mesh, rules, decode_length,
                                   vocabulary.eos_id,
                                   evaluation.DecodeSettings(method, vars(options)))
    rows = []
    for group, tokens in evaluation.padded_batches(
            itertools.islice(examples, max_examples), data.batch_size, input_length,
            lambda example: example["ids"]):
        predicted_tokens, scores = predict(restored.params, tokens)
        for row, example in enumerate(group):
            record = {"input": example["input"],
                      "prediction": vocab.show_ids(vocabulary, predicted_tokens[row]),
                      "score": float(scores[row])}
            if "target" in example:
                record["target"] = example["target"]
            rows.append(record)
    return rows


def scored(restored: warm_start.RestoredRun, rules, records: list | None, split: str,
           max_examples: int | None, vocabulary) -> list[dict]:
    """One {input, target, score} per example: the target's summed log-probability given
    the input, teacher forced in the model family's layout (Model.score_batch)."""
    data = restored.data
    lengths = {**data.task_feature_lengths, "inputs": data.prompt_length()}
    if records is not None:
        examples = ({"input": text, "target": target,
                     "ids": _token_ids(text, vocabulary, lengths["inputs"]),
                     "target_ids": _token_ids(target, vocabulary, lengths["targets"])}
                    for text, target in records)
        cut = sum(len(vocabulary.encode(target)) >= lengths["targets"]
                  for _, target in records[:max_examples])
        if cut:
            say(f"{cut} target(s) are longer than TASK_FEATURE_LENGTHS['targets'] = "
                f"{lengths['targets']} tokens with EOS: their scores cover the first "
                f"{lengths['targets'] - 1} tokens; bind a longer targets length to score "
                "them whole.")
    else:
        examples = split_examples(data, split, vocabulary)
    examples = list(itertools.islice(examples, max_examples))
    score = evaluation.scorer(restored.model, restored.mesh, rules)
    rows = []
    for group, batch in zip(_chunks(examples, data.batch_size),
                            _score_batches(examples, data, lengths)):
        scores = score(restored.params, batch)
        rows += [{"input": example["input"], "target": example["target"],
                  "score": float(scores[row])} for row, example in enumerate(group)]
    return rows


def _chunks(items: list, size: int) -> Iterator[list]:
    return (items[start:start + size] for start in range(0, len(items), size))


def _score_batches(examples: list[dict], data: run_config.DataConfig, lengths: dict
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The examples as unpacked batches of the model family's features."""
    with_inputs = any(example["ids"] for example in examples)
    signature = {"targets": tf.TensorSpec([None], tf.int32)}
    if with_inputs:
        signature["inputs"] = tf.TensorSpec([None], tf.int32)

    def token_examples():
        for example in examples:
            yield {"targets": example["target_ids"],
                   **({"inputs": example["ids"]} if with_inputs else {})}

    dataset = tf.data.Dataset.from_generator(token_examples, output_signature=signature)
    return pipeline.model_batches(dataset, data.mixture_or_task_name, lengths, data.batch_size,
                                  pack=False, repeat=False,
                                  decoder_only=data.decoder_only).as_numpy_iterator()


def _write_atomically(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(partial, path)


if __name__ == "__main__":
    launch.main("t5x_lite.infer.run", description=__doc__)
