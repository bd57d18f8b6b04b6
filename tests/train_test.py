"""End to end: a 2-layer model trains on a small local task, its loss falls, and rerunning the
same command resumes from the checkpoint (bad input: tests/bad_input_test.py)."""
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from t5x_lite import eval as eval_lib
from t5x_lite import flops
from t5x_lite import launch
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import run_config
from t5x_lite import train
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import tasks
from t5x_lite.data import vocab

TASK = "train_test_bytes"
REPO = os.path.dirname(launch.GIN_DIR)
SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park and the cat watched it run",
    "she read the book by the window while the rain fell",
    "he wrote a letter to his friend about the long trip",
]


def register_sentences_task(directory) -> str:
    """Registers TASK: the byte-level SENTENCES corpus, written under `directory`."""
    train_file, validation_file = directory / "train.txt", directory / "validation.txt"
    train_file.write_text("\n".join(SENTENCES * 50) + "\n")
    validation_file.write_text("\n".join(SENTENCES) + "\n")
    return tasks.register_text_task(TASK, [str(train_file)], vocabulary=vocab.byte_vocabulary(),
                                    validation_files=[str(validation_file)])


@pytest.fixture(scope="module")
def task_name(tmp_path_factory):
    return register_sentences_task(tmp_path_factory.mktemp("corpus"))


def bindings(model_dir, train_steps: int) -> list[str]:
    return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{TASK}'",
            f"TRAIN_STEPS = {train_steps}", 'TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 8}',
            "BATCH_SIZE = 8", "CHECKPOINT_PERIOD = 10", "EVAL_PERIOD = 10", "EVAL_STEPS = 2",
            "LOG_PERIOD = 5", "models.T5Config.vocab_size = 384",
            "optimizers.rsqrt_schedule.warmup_steps = 100"]


def train_in_process(model_dir, train_steps: int) -> None:
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/pretrain.gin"],
                     bindings(model_dir, train_steps))
    try:
        gin.get_configurable(train.run)()
    finally:
        gin.clear_config()


def metric_rows(model_dir, split: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["split"] == split]


def test_loss_falls_and_rerun_resumes(task_name, tmp_path, capsys):
    train_in_process(tmp_path, 10)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    train_in_process(tmp_path, 20)
    out = capsys.readouterr().out
    assert "Resuming from checkpoint at step 10." in out
    rows = metric_rows(tmp_path, "train")
    assert [row["step"] for row in rows] == [5, 10, 15, 20]
    # Byte-level loss starts near log(384) = 5.95 nats; steps 2-5 average about 4.2, and by
    # step 20 the model has learnt much of this repetitive text (about 1.7).
    assert rows[0]["loss"] > 3.5 and rows[-1]["loss"] < rows[0]["loss"] - 1.5
    # Model FLOPs per token slot, through the same seconds as tok/s; no MFU on CPUs (no
    # published peak). 8 rows of 32 + 8 slots per step on one device.
    config = models.T5Config(vocab_size=384, d_model=128, num_heads=4, head_dim=32, d_ff=512,
                             num_encoder_layers=2, num_decoder_layers=2)
    for row in rows:
        np.testing.assert_allclose(
            row["model_tflops_per_device"] * 1e12 / row["tokens_per_second"],
            flops.model_flops_per_step(config, 8, 32, 8) / (8 * 40), rtol=1e-6)
        assert "mfu" not in row
    validation = metric_rows(tmp_path, "validation")
    assert [row["step"] for row in validation] == [0, 10, 20]
    assert validation[0]["loss"] > validation[1]["loss"] > validation[2]["loss"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
    config = (tmp_path / "config.gin").read_text()
    assert "train_steps = %TRAIN_STEPS" in config and "TRAIN_STEPS = 20" in config
    train_in_process(tmp_path, 20)
    assert "Training already finished: checkpoint at step 20" in capsys.readouterr().out

    # The checkpoint holds the input position (exact resume: tests/preemption_test.py).
    assert (tmp_path / "checkpoints" / "20" / "data" / "shard_00000-of-00001").is_dir()

    # Evaluation restores the newest checkpoint and reproduces the in-training eval exactly.
    scores = eval_in_process(tmp_path)
    np.testing.assert_allclose(scores["loss"], validation[2]["loss"], rtol=1e-6)
    out = capsys.readouterr().out
    assert "Checkpoint step 20: validation loss" in out
    assert out.count("--- infilling") == 3 and "<extra_id_0>" in out


def test_ul2_preset_trains_on_the_batches_its_mixture_yields(tmp_path, monkeypatch):
    """The UL2 objective file wired through the whole loop: the first logged loss is the
    initial model's loss, computed apart from the loop, on the first batch the UL2 mixture
    yields for the run's seed."""
    monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path / "cache"))
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/pretrain.gin", "objectives/ul2.gin"], [
        f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 4", "BATCH_SIZE = 4", "LOG_PERIOD = 1",
        'TASK_FEATURE_LENGTHS = {"inputs": 64, "targets": 32}', "CHECKPOINT_PERIOD = 4",
        "EVAL_PERIOD = 4", "EVAL_STEPS = 1", "models.T5Config.vocab_size = 1152",
        # A small vocabulary (1000 pieces, with the mode tokens) trains in about a second.
        "tasks.register_task.vocabulary = @vocab.sentencepiece_vocabulary()",
        "vocab.sentencepiece_vocabulary.vocab_size = 1000",
        "vocab.sentencepiece_vocabulary.max_training_bytes = 300000"])
    try:
        gin.get_configurable(train.run)()
        model_config = gin.get_configurable(models.T5Config)()
        data = gin.get_configurable(run_config.DataConfig)().for_training()
    finally:
        gin.clear_config()
    rows = metric_rows(tmp_path, "train")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    trainer = trainer_lib.build_trainer(model_config, 1.0, optimizers.adafactor,
                                        partitioning.MeshConfig(), seed=0)
    first = next(data.batches("train", trainer.mesh, shuffle=True, seed=0, repeat=True))
    sums = trainer.compile_eval_step()(trainer.init_state(0).params,
                                       partitioning.global_batch(first, trainer.mesh))
    initial = trainer_lib.summarize_eval([jax.device_get(sums)])
    np.testing.assert_allclose(rows[0]["loss"], initial["loss"], rtol=1e-5)
    assert rows[0]["target_tokens"] == initial["target_tokens"]
    assert [row["step"] for row in metric_rows(tmp_path, "validation")] == [0, 4]
    assert "MIXTURE_OR_TASK_NAME = @tasks.register_task()" in (tmp_path / "config.gin").read_text()


def eval_in_process(model_dir) -> dict[str, float]:
    launch.parse_gin(["models/t5_1_1_tiny.gin", "runs/eval.gin"],
                     [line for line in bindings(model_dir, 20) if "TRAIN_STEPS" not in line
                      and "PERIOD" not in line and "rsqrt" not in line])
    try:
        return gin.get_configurable(eval_lib.run)()
    finally:
        gin.clear_config()


def run_train_command(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t5x_lite.train", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


QUICK = ["--gin_file=gin/quickstart.gin", "--gin.TRAIN_STEPS=1"]
