"""Fine-tuning a Hugging Face T5 on a supervised JSONL/TSV task, with BLEU and sequence
accuracy decoded during training and by t5x_lite.eval; the demo gin file."""
import gin
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from t5x_lite import eval as eval_lib
from t5x_lite import hf
from t5x_lite import launch
from t5x_lite import train
from tests import evaluation_test
from tests import train_test
from tests.finetune_test import newest_params


LENGTHS = '{"inputs": 32, "targets": 40}'


# A small architecture, bound over gin/models/t5_1_1_tiny.gin, to keep the runs quick.
ARCHITECTURE = {"d_model": 64, "head_dim": 16, "num_heads": 4, "d_ff": 128,
                "num_encoder_layers": 2, "num_decoder_layers": 1, "vocab_size": 384}


def tiny_hf_dir(directory, d_model: int = ARCHITECTURE["d_model"]) -> str:
    """A random transformers T5 v1.1 of ARCHITECTURE (byte vocabulary)."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=384, d_model=d_model, d_kv=ARCHITECTURE["head_dim"],
        num_heads=ARCHITECTURE["num_heads"], d_ff=ARCHITECTURE["d_ff"],
        num_layers=ARCHITECTURE["num_encoder_layers"],
        num_decoder_layers=ARCHITECTURE["num_decoder_layers"],
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(str(directory))
    return str(directory)


def model_bindings() -> list[str]:
    return [f"models.T5Config.{name} = {value}" for name, value in ARCHITECTURE.items()]


def bindings(model_dir, task: str, steps: int) -> list[str]:
    return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
            f"TRAIN_STEPS = {steps}", f"TASK_FEATURE_LENGTHS = {LENGTHS}", "BATCH_SIZE = 8",
            "CHECKPOINT_PERIOD = 50", "EVAL_PERIOD = 50", "EVAL_STEPS = 1", "LOG_PERIOD = 10",
            *model_bindings()]


def run_in_process(function, gin_file: str, extra: list[str]):
    launch.parse_gin(["models/t5_1_1_tiny.gin", gin_file], extra)
    try:
        return gin.get_configurable(function)()
    finally:
        gin.clear_config()


def test_finetune_from_hf_with_metrics(tmp_path, capsys):
    task = evaluation_test.register_pairs_task(tmp_path)
    hf_dir = tiny_hf_dir(tmp_path / "hf")
    model_dir = tmp_path / "finetuned"
    run_in_process(train.run, "runs/finetune.gin", [
        *bindings(model_dir, task, 100), f"INIT_FROM = '{hf_dir}'", "METRICS_PERIOD = 50",
        "t5x_lite.train.run.learning_rate = 0.01"])
    out = capsys.readouterr().out
    assert f"Initialised from the Hugging Face T5 in {hf_dir}" in out
    rows = [row for row in train_test.metric_rows(model_dir, "validation") if "bleu" in row]
    assert [row["step"] for row in rows] == [0, 50, 100]
    assert "step      0  validation bleu" in out
    # A random model learning ten byte-level pairs: no output shares a 4-gram with its
    # target at first; after 100 steps some do.
    assert rows[0]["bleu"] == 0.0 < rows[-1]["bleu"]
    losses = [row["loss"] for row in train_test.metric_rows(model_dir, "validation")
              if "loss" in row]
    assert losses[-1] < losses[0] / 10

    # t5x_lite.eval decodes the same checkpoint to the same metrics.
    scores = run_in_process(eval_lib.run, "runs/eval.gin", [
        f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
        f"TASK_FEATURE_LENGTHS = {LENGTHS}", "BATCH_SIZE = 8", "EVAL_STEPS = 1",
        "NUM_INFILLINGS = 1", *model_bindings()])
    out = capsys.readouterr().out
    assert scores["bleu"] == pytest.approx(rows[-1]["bleu"], abs=1e-9)
    assert scores["sequence_accuracy"] == rows[-1]["sequence_accuracy"]
    assert "Checkpoint step 100: bleu" in out and "--- example 1 ---" in out


def test_hf_init_keeps_the_weights(tmp_path):
    """Step 0 of a fine-tuning run holds exactly the Hugging Face parameters."""
    task = evaluation_test.register_pairs_task(tmp_path)
    hf_dir = tiny_hf_dir(tmp_path / "hf")
    model_dir = tmp_path / "frozen"
    # Everything frozen: the saved step-1 parameters are the imported ones.
    run_in_process(train.run, "runs/finetune.gin", [
        *bindings(model_dir, task, 1), f"INIT_FROM = '{hf_dir}'", "FROZEN = ['.*']"])
    _, params = newest_params(model_dir)
    _, expected = hf.load_t5(hf_dir)
    flat, flat_expected = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    assert flat.keys() == flat_expected.keys()
    for path in flat:
        np.testing.assert_array_equal(np.asarray(flat[path]), flat_expected[path])


def test_hf_init_of_another_architecture(tmp_path):
    task = evaluation_test.register_pairs_task(tmp_path)
    hf_dir = tiny_hf_dir(tmp_path / "hf", d_model=32)
    with pytest.raises(ValueError, match=r"has d_model = 32, the gin model 64: bind "
                                         r"models.T5Config.d_model = 32"):
        run_in_process(train.run, "runs/finetune.gin", [
            *bindings(tmp_path / "run", task, 1), f"INIT_FROM = '{hf_dir}'"])
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())
