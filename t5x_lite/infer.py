"""Inference entry point: decodes the inputs of a task split, or of a text / JSONL file, with
the newest checkpoint in MODEL_DIR and writes one JSON line per input: input, prediction,
score (and target, for a task split).

  python -m t5x_lite.infer --gin_file=gin/quickstart.gin --gin_file=gin/runs/infer.gin \\
      --gin.INFER_OUTPUT="'runs/quickstart/predictions.jsonl'" [--gin.INFER_INPUTS="'in.txt'"]
      [--gin.DECODE_METHOD="'beam'" --gin.DECODE_OPTIONS="{'beam_size': 4, 'alpha': 0.6}"]

The output appears only once complete (written beside it, then renamed).
"""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "no predictions were written; rerun the same command to decode")

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from typing import Iterator  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402

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


def read_inputs(path: str, input_field: str = "inputs") -> list[str]:
    """The inputs of a file: each non-empty line of a .txt file, or `input_field` of each
    line of a .jsonl file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"INFER_INPUTS file {path!r} does not exist: pass a .txt file "
                                "(one input per line) or a .jsonl file")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if input_field not in record:
            raise ValueError(f"{path}:{number} has no field {input_field!r}: set "
                             "t5x_lite.infer.run.input_field to the field holding the input")
        texts.append(str(record[input_field]))
    return texts


def file_examples(texts: list[str], vocabulary, input_length: int) -> Iterator[dict]:
    """Tokenised inputs, EOS-terminated and cut to input_length."""
    for text in texts:
        ids = list(vocabulary.encode(text))[:input_length - 1] + [vocabulary.eos_id]
        yield {"input": text, "ids": ids}


def split_examples(data: run_config.DataConfig, split: str, vocabulary) -> Iterator[dict]:
    """The task split's examples, in order (every host reads all of them)."""
    lengths = data.task_feature_lengths
    for batch in pipeline.get_batches(
            data.mixture_or_task_name, split, dict(lengths), 1, shuffle=False, seed=0,
            repeat=False, pack=False):
        ids = [int(i) for i in batch["encoder_input_tokens"][0] if i]
        yield {"input": vocab.show_ids(vocabulary, ids), "ids": ids,
               "target": vocab.show_ids(vocabulary, batch["decoder_target_tokens"][0])}


def run(model_config: models.T5Config = gin.REQUIRED,
        data: run_config.DataConfig = gin.REQUIRED, model_dir: str = gin.REQUIRED,
        output_file: str = gin.REQUIRED,
        input_file: str | None = None, input_field: str = "inputs", split: str = "validation",
        max_examples: int | None = None,
        method: decoding.Method | str = decoding.Method.GREEDY,
        decode_options: dict | None = None, max_decode_length: int | None = None,
        mesh_config: partitioning.MeshConfig = partitioning.MeshConfig()) -> int:
    """Writes predictions to `output_file` and returns how many. `max_decode_length`
    defaults to the targets length of TASK_FEATURE_LENGTHS (the training run's, unless
    bound)."""
    method = decoding.parse_method(method)
    options = decoding.DecodeOptions(**(decode_options or {}))
    texts = read_inputs(input_file, input_field) if input_file else None
    restored = warm_start.restore_run(model_config, data, model_dir, mesh_config)
    model, mesh, step, params, data = (restored.model, restored.mesh, restored.step,
                                       restored.params, restored.data)
    vocabulary = tasks.targets_vocabulary(data.mixture_or_task_name)
    input_length = data.task_feature_lengths["inputs"]
    decode_length = max_decode_length or data.task_feature_lengths["targets"]
    examples = (file_examples(texts, vocabulary, input_length) if texts is not None
                else split_examples(data, split, vocabulary))
    predict = evaluation.predictor(model, mesh, mesh_config.rules, decode_length,
                                   vocabulary.eos_id,
                                   evaluation.DecodeSettings(method, vars(options)))
    rows = []
    for group, tokens in evaluation.padded_batches(
            itertools.islice(examples, max_examples), data.batch_size, input_length,
            lambda example: example["ids"]):
        predicted, scores = predict(params, tokens)
        for row, example in enumerate(group):
            record = {"input": example["input"],
                      "prediction": vocab.show_ids(vocabulary, predicted[row]),
                      "score": float(scores[row])}
            if "target" in example:
                record["target"] = example["target"]
            rows.append(record)
    if jax.process_index() == 0:
        _write_atomically(output_file, rows)
    say(f"Checkpoint step {step}: wrote {len(rows)} predictions ({method.value}) "
        f"to {output_file}")
    return len(rows)


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
