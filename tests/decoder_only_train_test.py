"""End to end for the decoder-only family: a 4-layer model trains as a causal LM and as a
prefix-LM on a small local corpus, its loss falls, a run stopped halfway resumes to the same
losses bit for bit, infer's score mode equals score_batch on a hand-built prefix-LM row, eval's
rank-classification accuracy equals picking by those scores, and bad bindings stop with one
line."""
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import eval as eval_lib
from t5x_lite import infer
from t5x_lite import launch
from t5x_lite import models
from t5x_lite import partitioning
from t5x_lite import train
from t5x_lite import warm_start
from t5x_lite.data import pipeline
from t5x_lite.data import tasks
from t5x_lite.data import vocab
from tests.train_test import QUICK, SENTENCES, error_line, metric_rows, run_train_command

LENGTHS = {"causal_lm": {"targets": 40}, "prefix_lm": {"inputs": 32, "targets": 8}}


def register(directory, objective: str) -> str:
    train_file, validation_file = directory / "train.txt", directory / "validation.txt"
    train_file.write_text("\n".join(SENTENCES * 50) + "\n")
    validation_file.write_text("\n".join(SENTENCES) + "\n")
    return tasks.register_text_task(f"decoder_only_{objective}", [str(train_file)], objective,
                                    vocabulary=vocab.byte_vocabulary(),
                                    validation_files=[str(validation_file)])


def bindings(model_dir, task: str, lengths: dict, train_steps: int) -> list[str]:
    return [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
            f"TRAIN_STEPS = {train_steps}", f"TASK_FEATURE_LENGTHS = {lengths}",
            "BATCH_SIZE = 8", "CHECKPOINT_PERIOD = 10", "EVAL_PERIOD = 10", "EVAL_STEPS = 2",
            "LOG_PERIOD = 5", "models.T5Config.vocab_size = 384",
            "optimizers.rsqrt_schedule.warmup_steps = 100"]


def run_in_process(entry_point, gin_files: list[str], bound: list[str],
                   preset: str = "models/decoder_only_tiny.gin"):
    launch.parse_gin([preset, *gin_files], bound)
    try:
        return gin.get_configurable(entry_point)()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("objective", ["causal_lm", "prefix_lm"])
def test_trains_and_resumes_bit_identically(tmp_path, objective):
    task, lengths = register(tmp_path, objective), LENGTHS[objective]
    for model_dir, stops in ((tmp_path / "whole", [20]), (tmp_path / "halved", [10, 20])):
        for train_steps in stops:
            run_in_process(train.run, ["runs/pretrain.gin"],
                           bindings(model_dir, task, lengths, train_steps))
    whole, halved = (metric_rows(tmp_path / name, "train") for name in ("whole", "halved"))
    assert [row["step"] for row in whole] == [5, 10, 15, 20]
    assert [row["loss"] for row in halved] == [row["loss"] for row in whole]
    assert whole[-1]["loss"] < whole[0]["loss"] - 1.0
    validation = [metric_rows(tmp_path / name, "validation") for name in ("whole", "halved")]
    assert validation[0] == validation[1] and validation[0][-1]["step"] == 20
    assert validation[0][0]["loss"] > validation[0][-1]["loss"]


def test_score_mode_equals_score_batch_on_a_prefix_lm_row(tmp_path):
    task = register(tmp_path, "prefix_lm")
    bound = bindings(tmp_path, task, LENGTHS["prefix_lm"], 10)
    run_in_process(train.run, ["runs/pretrain.gin"], bound)
    # Targets within the 8 tokens (EOS included) of TASK_FEATURE_LENGTHS, so nothing is cut.
    records = [("the cat sat on", " a mat"), ("a dog ran", " home")]
    inputs_file = tmp_path / "pairs.jsonl"
    inputs_file.write_text("".join(json.dumps({"inputs": i, "targets": t}) + "\n"
                                   for i, t in records))
    output = tmp_path / "scores.jsonl"
    assert run_in_process(infer.run, ["runs/infer.gin"], bound + [
        f"INFER_OUTPUT = '{output}'", f"INFER_INPUTS = '{inputs_file}'",
        "INFER_MODE = 'score'"]) == 2
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["input"], row["target"]) for row in written] == records

    score = trained_scorer(tmp_path)
    for (text, target), row in zip(records, written):
        np.testing.assert_allclose(row["score"], score(text, target), rtol=1e-5)

    # Rank classification through t5x_lite.eval: the accuracy of picking, per question, the
    # choice whose hand-built row scores highest.
    questions = [("the cat sat on", [" a mat", " home", " it"], 0),
                 ("a dog ran", [" a mat", " home", " it"], 1),
                 ("she read", [" a book", " home", " it"], 0),
                 ("he wrote", [" a mat", " a letter", " it"], 1)]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"inputs": i, "choices": c, "label": label}) + "\n"
                            for i, c, label in questions))
    choice_task = tasks.register_text_task("decoder_only_choice", [str(path)],
                                           "multiple_choice", vocab.byte_vocabulary(),
                                           validation_files=[str(path)])
    values = run_in_process(eval_lib.run, ["runs/eval.gin"], [
        line for line in bound if "MIXTURE" not in line] + [
        f"MIXTURE_OR_TASK_NAME = '{choice_task}'", "NUM_INFILLINGS = 0"])
    picked = [max(range(3), key=lambda c: score(text, choices[c]))
              for text, choices, _ in questions]
    want = 100 * np.mean([pick == label for pick, (_, _, label) in zip(picked, questions)])
    assert values["accuracy"] == pytest.approx(want)


def trained_scorer(model_dir):
    """score(input, target): score_batch of the run's newest checkpoint on a prefix-LM row
    built by hand (inputs + EOS, targets + EOS; loss on the targets)."""
    byte_vocabulary = vocab.byte_vocabulary()
    launch.parse_gin(["models/decoder_only_tiny.gin"], ["models.T5Config.vocab_size = 384"])
    config = gin.get_configurable(models.T5Config)()
    gin.clear_config()
    mesh = partitioning.create_mesh(partitioning.MeshConfig())
    model, _, params = warm_start.restore_model(config, str(model_dir), mesh,
                                                partitioning.MeshConfig().rules)

    def score(text: str, target: str) -> float:
        inputs = list(byte_vocabulary.encode(text)) + [1]
        targets = list(byte_vocabulary.encode(target)) + [1]
        tokens = np.asarray([inputs + targets])
        batch = {"decoder_target_tokens": tokens,
                 "decoder_input_tokens": np.pad(tokens, ((0, 0), (1, 0)))[:, :-1],
                 "decoder_loss_weights": np.asarray([[0] * len(inputs) + [1] * len(targets)]),
                 "decoder_segment_ids": np.ones_like(tokens),
                 "decoder_causal_attention": np.asarray(
                     [[1] * (len(inputs) + 1) + [0] * (len(targets) - 1)])}
        return float(model.score_batch(params, jax.tree_util.tree_map(jnp.asarray, batch))[0])

    return score


def test_an_encoder_decoder_on_a_causal_lm_task_is_one_line():
    line = error_line(run_train_command(
        *QUICK, "--gin_file=gin/objectives/causal_lm.gin",
        '--gin.TASK_FEATURE_LENGTHS={"targets": 64}'))
    assert "is for decoder_only models: use a decoder-only preset" in line


def test_an_encoder_decoder_cannot_read_a_causal_lm_task():
    with pytest.raises(ValueError, match="has targets only .a causal LM., which an "
                                         "encoder_decoder model cannot train on"):
        pipeline.get_dataset("stdlib_causal_lm", "train", {"targets": 64}, 2, shuffle=False,
                             seed=0, repeat=True)


def test_a_decoder_only_preset_with_an_encoder_binding_is_one_line():
    line = error_line(run_train_command(
        "--gin_file=gin/models/decoder_only_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
        "--gin.MODEL_DIR='/tmp/never'", "--gin.TRAIN_STEPS=1",
        "--gin.MIXTURE_OR_TASK_NAME='stdlib_prefix_lm'",
        "--gin.models.T5Config.num_encoder_layers=2"))
    assert "a decoder_only model has no encoder: bind num_encoder_layers = 0" in line


def test_score_mode_needs_targets_in_its_inputs_file(tmp_path):
    texts = tmp_path / "inputs.txt"
    texts.write_text("def f():\n")
    with pytest.raises(ValueError, match="score mode reads an input and a target per line, "
                                         "pass a .jsonl file"):
        infer.read_records(str(texts), {"inputs": "input_field", "targets": "target_field"})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"inputs": "def f():"}) + "\n")
    with pytest.raises(ValueError, match="has no field 'targets': set "
                                         "t5x_lite.infer.run.target_field"):
        infer.read_records(str(pairs), {"inputs": "input_field", "targets": "target_field"})


def test_prefix_lm_rows_need_an_inputs_length():
    with pytest.raises(ValueError, match="task 'stdlib_prefix_lm' needs the 'inputs' length, "
                                         "which TASK_FEATURE_LENGTHS = .'targets': 64. lacks"):
        pipeline.get_dataset("stdlib_prefix_lm", "train", {"targets": 64}, 2, shuffle=False,
                             seed=0, repeat=True, decoder_only=True)
