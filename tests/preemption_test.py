"""Stopping a training run at any moment loses nothing: the run is killed with SIGKILL three
times (once while a checkpoint is being written) and stopped once with SIGTERM (it finishes
its step, saves, exits 143), restarted with the same command each time, and ends exactly
where an uninterrupted run does: the same parameters, bit for bit, and the same logged
losses after the last resume."""
import os
import signal
import subprocess
import sys
import threading
import time

import gin
import jax
import numpy as np
import pytest

from t5x_lite import checkpoints
from t5x_lite import launch
from t5x_lite import metrics_io
from tests import train_test
from tests.finetune_test import newest_params

STEPS = 24
CHECKPOINT_PERIOD = 4


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


def child_environment(cache_dir) -> dict:
    """Quiet TensorFlow, and one JAX compilation cache for the test's training processes
    (each would otherwise compile the same steps again)."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def stop_when(command: list[str], ready, signal_number: int, env: dict
              ) -> tuple[list[str], int]:
    """Starts `command`, sends `signal_number` as soon as `ready(output lines so far)` holds,
    and returns (all output lines, exit status) once the process has exited."""
    process = subprocess.Popen(command, cwd=train_test.REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")))
    reader.start()
    deadline = time.time() + 200
    while process.poll() is None and time.time() < deadline:
        if ready(lines):
            process.send_signal(signal_number)
            break
        time.sleep(0.005)
    status = process.wait(timeout=120)
    reader.join()
    return lines, status


def test_kills_and_sigterm_end_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    task_flags = sentence_task_flags(tmp_path)
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    command = [sys.executable, "-m", "t5x_lite.train",
               *train_flags(stopped, task_flags, STEPS),
               f"--gin.CHECKPOINT_PERIOD={CHECKPOINT_PERIOD}"]
    checkpoint_dir = stopped / "checkpoints"

    def logged(lines, step: int) -> bool:
        return any(line.startswith(f"step {step:>6d}/{STEPS}") for line in lines)

    def saved(step: int) -> bool:
        return checkpoint_dir.exists() and str(step) in os.listdir(checkpoint_dir)

    def saving(step: int) -> bool:  # The save's temporary directory exists.
        return checkpoint_dir.exists() and any(
            name.startswith(f"{step}{checkpoints.INCOMPLETE_MARK}")
            for name in os.listdir(checkpoint_dir))

    env = child_environment(tmp_path / "jax_cache")
    # 1. SIGKILL between steps.
    _, status = stop_when(command, lambda lines: logged(lines, 6) and saved(4), signal.SIGKILL,
                          env)
    assert status == -signal.SIGKILL and saved(4)
    # 2. SIGKILL while the step-8 checkpoint is being written (it starts in the background
    # once step 8 is logged; the steps that follow take milliseconds).
    _, status = stop_when(command, lambda lines: logged(lines, 8) and saving(8),
                          signal.SIGKILL, env)
    assert status == -signal.SIGKILL
    # 3. SIGTERM (sent by this process to itself, which runs the same command in-process,
    # when step 13 is logged): the step finishes, a checkpoint is saved there, exit 143.
    def sigterm_at_13(self, step, metrics, split):
        write(self, step, metrics, split)
        if split == "train" and step == 13:
            os.kill(os.getpid(), signal.SIGTERM)

    write = metrics_io.MetricsWriter.write
    monkeypatch.setattr(metrics_io.MetricsWriter, "write", sigterm_at_13)
    with pytest.raises(SystemExit) as stopped_by:
        launch.main("t5x_lite.train.run", "", command[3:])
    gin.clear_config()
    monkeypatch.undo()
    assert stopped_by.value.code == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    (stop_line,) = [line for line in out.splitlines()
                    if line.startswith("Stopped by SIGTERM after step")]
    stopped_at = int(stop_line.split("after step ")[1].split(":")[0])
    assert 13 <= stopped_at < 16 and saved(stopped_at)
    # 4. SIGKILL just after the step-16 checkpoint; 5. the same command finishes the run.
    lines, status = stop_when(command, lambda lines: logged(lines, 17) and saved(16),
                              signal.SIGKILL, env)
    assert f"Resuming from checkpoint at step {stopped_at}." in "\n".join(lines)
    launch.main("t5x_lite.train.run", "", command[3:])
    gin.clear_config()
    out = capsys.readouterr().out
    assert "Resuming from checkpoint at step 16." in out
    # An interrupted save is reported and skipped, and never deleted.
    leftovers = checkpoints.incomplete_checkpoints(
        checkpoints.create_manager(str(stopped), read_only=True))
    for name in leftovers:
        assert f"Skipping {name}" in out

    # The same command, never stopped (in this process: same code, no start-up cost).
    launch.main("t5x_lite.train.run", "", [*train_flags(straight, task_flags, STEPS),
                                           f"--gin.CHECKPOINT_PERIOD={CHECKPOINT_PERIOD}"])
    gin.clear_config()
    losses = {}
    for name in ("stopped", "straight"):
        losses[name] = {row["step"]: row["loss"]
                        for row in train_test.metric_rows(tmp_path / name, "train")}
    after_last_resume = range(17, STEPS + 1)
    assert [losses["stopped"][s] for s in after_last_resume] == [
        losses["straight"][s] for s in after_last_resume]
    _, params = newest_params(stopped)
    _, expected = newest_params(straight)
    for leaf, expected_leaf in zip(jax.tree_util.tree_leaves(params),
                                   jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected_leaf))
