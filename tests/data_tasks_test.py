"""The task registry: built-in tasks, re-registration, cheap registration and clear errors."""
import json
import os

import numpy as np
import pytest
import seqio

from t5x_lite.data import objectives
from t5x_lite.data import pipeline
from t5x_lite.data import tasks
from t5x_lite.data import vocab


def test_builtin_tasks_use_the_default_vocabularies():
    sentencepiece = tasks.get_task_or_mixture("stdlib_span_corruption")
    features = sentencepiece.output_features
    assert set(features) == {"inputs", "targets"}
    assert features["targets"].add_eos and features["inputs"].add_eos
    assert not features["inputs"].required
    assert "stdlib_sp8000_" in features["targets"].vocabulary.sentencepiece_model_file
    assert features["targets"].vocabulary.extra_ids == 100
    bytes_task = tasks.get_task_or_mixture("stdlib_span_corruption_bytes")
    assert bytes_task.output_features["targets"].vocabulary.vocab_size == 359
    assert bytes_task.splits == ("train", "validation")


def test_registering_a_stdlib_task_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(vocab.CACHE_ENV_VAR, str(tmp_path))
    name = tasks.register_task("data_tasks_test_lazy", "stdlib", "ul2",
                               vocab.sentencepiece_vocabulary())
    assert name == "data_tasks_test_lazy"
    assert tasks.get_task_or_mixture(name).output_features["targets"].vocabulary._model is None
    assert len(tasks.get_task_or_mixture(name).tasks) == 7
    assert not os.listdir(tmp_path)


def test_text_task_with_a_trained_vocabulary_round_trips(tmp_path, small_sentencepiece_vocab,
                                                         rebuild_from_span_corruption):
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": text}) + "\n")
    tasks.register_text_task("data_tasks_test_code", [str(tmp_path / "code.jsonl")],
                             vocabulary=small_sentencepiece_vocab)
    batch = next(pipeline.get_batches("data_tasks_test_code", "train",
                                      {"inputs": 32, "targets": 16}, 1, shuffle=False, seed=0,
                                      repeat=False))
    inputs = batch["encoder_input_tokens"][0]
    targets = batch["decoder_target_tokens"][0]
    inputs, targets = inputs[:np.argmax(inputs == 1)], targets[:np.argmax(targets == 1)]
    ids = rebuild_from_span_corruption(inputs, targets, small_sentencepiece_vocab.vocab_size)
    assert small_sentencepiece_vocab.decode(ids) == text


def test_reregistering_replaces_the_task(tmp_path):
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b.txt").write_text("second\n")
    bytes_vocab = vocab.byte_vocabulary()
    tasks.register_text_task("data_tasks_test_replace", [str(tmp_path / "a.txt")],
                             vocabulary=bytes_vocab)
    tasks.register_text_task("data_tasks_test_replace", [str(tmp_path / "b.txt")],
                             vocabulary=bytes_vocab, validation_files=[str(tmp_path / "a.txt")])
    task = tasks.get_task_or_mixture("data_tasks_test_replace")
    assert task.splits == ("train", "validation")
    texts = [x["text"] for x in task.source.get_dataset("train", shuffle=False)
             .as_numpy_iterator()]
    assert texts == [b"second"]


def test_unknown_objective_lists_the_allowed_ones(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ValueError, match="unknown objective 'mlm': allowed values are "
                                         "span_corruption, prefix_lm, causal_lm, bart, "
                                         "bert_mlm, ul2"):
        tasks.register_text_task("data_tasks_test_bad", [str(tmp_path / "a.txt")],
                                 objective="mlm", vocabulary=vocab.byte_vocabulary())
    assert "data_tasks_test_bad" not in seqio.TaskRegistry.names()


@pytest.mark.parametrize("make_objective, message", [
    (lambda: objectives.SpanCorruption(noise_density=1.5), "noise_density must be in"),
    (lambda: objectives.SpanCorruption(mean_noise_span_length=0.5), "mean_noise_span_length"),
    (lambda: objectives.BartNoise(token_masking_rate=1.0), "token_masking_rate"),
    (lambda: objectives.UL2([{"rate": 1.0, "noise_density": 0.2, "mean_span": 3}]),
     "UL2 denoiser 0 .* has unknown key 'mean_span': allowed keys are"),
    (lambda: objectives.UL2([{"rate": 1.0, "prefix_lm": True, "noise_density": 0.2}]),
     "unknown key 'noise_density'"),
    (lambda: objectives.UL2([{"rate": 0.0, "prefix_lm": True}]), "rate must be > 0"),
])
def test_bad_objective_settings_are_rejected_when_made(make_objective, message):
    with pytest.raises(ValueError, match=message):
        make_objective()


def test_unknown_task_names_the_closest_or_the_registered_ones():
    with pytest.raises(ValueError) as error:
        tasks.get_task_or_mixture("no_such_task")
    message = str(error.value)
    assert message.startswith("unknown task or mixture 'no_such_task': registered names include ")
    assert "stdlib_span_corruption_bytes" in message and "\n" not in message
    assert "stdlib_ul2." not in message  # Denoiser tasks are an implementation detail.
    assert message.endswith("(register yours in a module of your own and pass "
                            "--module_import=my_tasks, or put `import my_tasks` in a gin file; "
                            "README: Your own corpus)")
    with pytest.raises(ValueError, match="'stdlib_ul3': did you mean stdlib_ul2"):
        tasks.get_task_or_mixture("stdlib_ul3")


def test_builtin_registry_covers_every_source_and_objective():
    for name in ("stdlib_ul2", "c4_ul2", "wikipedia_ul2"):
        mixture = tasks.get_task_or_mixture(name)
        rates = {task.name.split(".", 1)[1]: mixture.get_rate(task) for task in mixture.tasks}
        assert rates == {"nlu_span3_density0.15": 0.2, "nlu_span8_density0.15": 0.2,
                         "nlg_span3_density0.5": 0.1, "nlg_span8_density0.5": 0.1,
                         "nlg_span64_density0.15": 0.1, "nlg_span64_density0.5": 0.1,
                         "s2s_prefix_lm": 0.2}
    for name in ("stdlib_span_corruption", "stdlib_prefix_lm", "stdlib_bart", "stdlib_bert_mlm",
                 "stdlib_docstring_choice_classification", "c4_span_corruption",
                 "wikipedia_span_corruption"):
        assert isinstance(tasks.get_task_or_mixture(name), seqio.Task)
    assert tasks.get_task_or_mixture("c4_span_corruption").source.tfds_dataset.name == "c4/en:3.1.0"
