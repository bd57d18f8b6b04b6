"""Preemption: SIGTERM makes a training process finish its step, save a checkpoint with its
input position and exit with status 143; the same command resumes there and ends with the
parameters of a run that was never stopped."""
import os
import signal
import subprocess
import sys

import gin
import jax
import numpy as np

from t5x_lite import launch

from tests import train_test
from tests.finetune_test import newest_params

REPO = train_test.REPO


def sentence_task_flags(directory) -> list[str]:
    """The byte-level sentences task, registered from gin (so a child process has it)."""
    train_file, validation_file = directory / "train.txt", directory / "validation.txt"
    train_file.write_text("\n".join(train_test.SENTENCES * 50) + "\n")
    validation_file.write_text("\n".join(train_test.SENTENCES) + "\n")
    return ["--gin.MIXTURE_OR_TASK_NAME=@tasks.register_text_task()",
            "--gin.tasks.register_text_task.name='sentences_cli'",
            f"--gin.tasks.register_text_task.files=['{train_file}']",
            f"--gin.tasks.register_text_task.validation_files=['{validation_file}']",
            "--gin.tasks.register_text_task.vocabulary=@vocab.byte_vocabulary()"]


def train_flags(model_dir, task_flags: list[str], steps: int) -> list[str]:
    bindings = [b for b in train_test.bindings(model_dir, steps)
                if not b.startswith("MIXTURE_OR_TASK_NAME")]
    return (["--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
             "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=100", "--gin.EVAL_PERIOD=100"]
            + [f"--gin.{b.replace(' = ', '=')}" for b in bindings
               if not b.startswith(("LOG_PERIOD", "CHECKPOINT_PERIOD", "EVAL_PERIOD"))]
            + task_flags)


def start_training(flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "t5x_lite.train", *flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_sigterm_saves_and_the_rerun_resumes_exactly(tmp_path):
    task_flags = sentence_task_flags(tmp_path)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    process = start_training(train_flags(stopped, task_flags, 30))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step      3/30"):
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(lines[-20:])
    stop_line = [line for line in lines if line.startswith("Stopped by SIGTERM after step")]
    assert stop_line, "".join(lines[-20:])
    stopped_at = int(stop_line[0].split("after step ")[1].split(":")[0])
    assert 3 <= stopped_at < 30
    assert sorted(os.listdir(stopped / "checkpoints")) == [str(stopped_at)]

    resumed = subprocess.run([sys.executable, "-m", "t5x_lite.train",
                              *train_flags(stopped, task_flags, 30)], cwd=REPO,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from checkpoint at step {stopped_at}." in resumed.stdout

    # The same command, never stopped (in this process: same code, no start-up cost).
    launch.main("t5x_lite.train.run", "", train_flags(straight, task_flags, 30))
    gin.clear_config()
    losses = {}
    for name in ("stopped", "straight"):
        losses[name] = {row["step"]: row["loss"]
                        for row in train_test.metric_rows(tmp_path / name, "train")}
    assert sorted(losses["stopped"]) == list(range(1, 31))
    assert losses["stopped"] == losses["straight"]
    _, params = newest_params(stopped)
    _, expected = newest_params(straight)
    for leaf, expected_leaf in zip(jax.tree_util.tree_leaves(params),
                                   jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected_leaf))
