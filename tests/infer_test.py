"""t5x_lite.infer: predictions for a file or a task split equal predict_batch on the restored
checkpoint, with any decoding method; bad input writes nothing."""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from t5x_lite import warm_start
from t5x_lite import infer
from t5x_lite import launch
from t5x_lite import models
from t5x_lite import partitioning
from t5x_lite.data import vocab
from tests import train_test
from tests.train_test import task_name  # noqa: F401  (the fixture registering the task)

REPO = os.path.dirname(launch.GIN_DIR)
INPUTS = ["the cat sat on the <extra_id_0> and looked", "a dog ran in the park", "she read"]


@pytest.fixture(scope="module")
def trained_dir(trained_tiny_dir, task_name):  # noqa: F811
    return trained_tiny_dir


def infer_in_process(model_dir, output, *bindings: str) -> int:
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/infer.gin"], [
        *train_test.bindings(model_dir, 10)[:5], f"INFER_OUTPUT = '{output}'",
        "models.T5Config.vocab_size = 384", *bindings])
    try:
        return gin.get_configurable(infer.run)()
    finally:
        gin.clear_config()


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method, options", [
    ("greedy", {}), ("beam", {"beam_size": 3, "alpha": 0.6}),
    ("sample", {"temperature": 0.7, "top_k": 5, "seed": 2})])
def test_file_predictions_equal_predict_batch(trained_dir, tmp_path, method, options):
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": text}) + "\n" for text in INPUTS))
    output = tmp_path / "predictions.jsonl"
    count = infer_in_process(trained_dir, output, f"INFER_INPUTS = '{inputs}'",
                             f"DECODE_METHOD = '{method}'", f"DECODE_OPTIONS = {options!r}")
    rows = read_rows(output)
    assert count == 3 and [row["input"] for row in rows] == INPUTS
    # The same checkpoint, decoded directly on one padded batch of 8 rows.
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/pretrain.gin"],
                     train_test.bindings(trained_dir, 10))
    try:
        config = gin.get_configurable(models.T5Config)()
    finally:
        gin.clear_config()
    mesh_config = partitioning.MeshConfig()
    mesh = partitioning.create_mesh(mesh_config)
    model, _, params = warm_start.restore_model(config, str(trained_dir), mesh,
                                                mesh_config.rules)
    vocabulary = vocab.byte_vocabulary()
    tokens = np.zeros((8, 32), np.int32)
    for row, text in enumerate(INPUTS):
        ids = list(vocabulary.encode(text))[:31] + [1]
        tokens[row, :len(ids)] = ids
    predicted, scores = model.predict_batch(params, {"encoder_input_tokens": tokens},
                                            max_decode_length=8, method=method, **options)
    for row, record in enumerate(rows):
        assert record["prediction"] == vocab.show_ids(vocabulary, predicted[row])
        np.testing.assert_allclose(record["score"], float(scores[row]), rtol=1e-5)


def test_task_split_predictions_carry_targets(trained_dir, tmp_path):
    output = tmp_path / "split.jsonl"
    assert infer_in_process(trained_dir, output, "INFER_MAX_EXAMPLES = 5") == 5
    rows = read_rows(output)
    assert len(rows) == 5 and all({"input", "prediction", "score", "target"} <= set(row)
                                  for row in rows)
    assert all(row["score"] <= 0 for row in rows)


@pytest.mark.parametrize("bindings, message", [
    (["DECODE_METHOD = 'nucleus'"],
     r"DECODE_METHOD\) must be one of 'greedy', 'beam', 'sample', got 'nucleus'"),
    (["DECODE_METHOD = 'beam'", "DECODE_OPTIONS = {'beam_size': 0}"], "beam_size must be >= 1"),
    (["DECODE_METHOD = 'sample'", "DECODE_OPTIONS = {'top_p': 1.5}"],
     r"top_p must be in \(0, 1\]"),
])
def test_bad_decoding_settings_write_nothing(trained_dir, tmp_path, bindings, message):
    with pytest.raises(ValueError, match=message):
        infer_in_process(trained_dir, tmp_path / "out.jsonl", *bindings)
    assert not os.listdir(tmp_path)


def test_missing_input_file_is_one_line_from_the_command_line(trained_dir, tmp_path):
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "t5x_lite.infer", "--gin_file=models/t5_1_1_tiny.gin",
               "--gin_file=runs/infer.gin", f"--gin.MODEL_DIR='{trained_dir}'",
               f"--gin.INFER_OUTPUT='{output}'",
               "--gin.MIXTURE_OR_TASK_NAME='stdlib_span_corruption_bytes'",
               "--gin.INFER_INPUTS='/no/such/inputs.txt'"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: INFER_INPUTS file '/no/such/inputs.txt' does not exist: pass a .txt file "
        "(one input per line) or a .jsonl file")
    assert not os.listdir(tmp_path)
