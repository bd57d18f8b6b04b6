"""Tasks and mixtures end to end: UL2 samples each denoiser and mode token at its rate, seqio
mixtures sample at theirs, every objective is decided by its seed, lengths too short for an
objective are named, TFDS sources (C4, Wikipedia) work offline through
`tfds.testing.mock_data`, and inspect_task shows mode tokens and sentinels. (Host shards:
data_pipeline_test.py.)"""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from t5x_lite import inspect_task
from t5x_lite.data import corpora
from t5x_lite.data import objectives
from t5x_lite.data import pipeline
from t5x_lite.data import preprocessors
from t5x_lite.data import tasks
from t5x_lite.data import vocab

WORDS = ("the model reads long documents and learns to fill spans of text while a mixture "
         "of denoisers decides how much of each sentence is hidden from it").split()


def write_documents(path, num_documents: int, num_words: int) -> str:
    """A JSONL file of random-word documents in the field "body"."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(num_documents):
            f.write(json.dumps({"body": " ".join(rng.choice(WORDS, num_words))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    return write_documents(tmp_path_factory.mktemp("long") / "docs.jsonl", 12, 3000)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    return write_documents(tmp_path_factory.mktemp("short") / "docs.jsonl", 4, 300)


def take(name: str, lengths: dict[str, int], count: int, seed: int = 3,
         shuffle: bool = False, split: str = "train") -> list[dict[str, np.ndarray]]:
    dataset = tasks.get_task_or_mixture(name).get_dataset(
        sequence_length=lengths, split=split, shuffle=shuffle, seed=seed, num_epochs=None)
    return list(dataset.take(count).as_numpy_iterator())


def classify_ul2(example, components, mode_ids, first_sentinel) -> list[str]:
    """The labels of the UL2 denoisers that could have made `example`: the mode token picks
    R, X or S, then the chunk's noise and span counts must be what the denoiser's settings
    give (NumPy, rounding half to even as T5 does)."""
    inputs, targets = example["inputs"], example["targets"]
    mode = {token_id: token for token, token_id in mode_ids.items()}[int(inputs[0])]
    spans = int(np.sum(inputs >= first_sentinel))
    noise = len(targets) - 1 - spans
    length = noise + len(inputs) - 2 - spans
    labels = []
    for label, _, objective in components:
        if objective.mode_token != mode:
            continue
        if isinstance(objective, objectives.PrefixLM):
            labels.append(label)
            continue
        expected_noise = min(max(np.round(length * objective.noise_density), 1), length - 1)
        expected_spans = max(np.round(expected_noise / objective.mean_noise_span_length), 1)
        if (noise, spans) == (expected_noise, expected_spans):
            labels.append(label)
    return labels


def test_ul2_samples_each_denoiser_and_mode_token_at_its_rate(long_documents,
                                                             small_sentencepiece_vocab):
    name = tasks.register_text_task("mixtures_test_ul2", [long_documents], "ul2",
                                    small_sentencepiece_vocab, text_field="body")
    examples = take(name, {"inputs": 128, "targets": 64}, 3000)
    mode_ids = {token: preprocessors.mode_token_id(small_sentencepiece_vocab, token)
                for token in vocab.MODE_TOKENS}
    components = objectives.UL2().components()
    first_sentinel = small_sentencepiece_vocab.vocab_size - 100
    counts, modes, ambiguous = collections.Counter(), collections.Counter(), 0
    for example in examples:
        labels = classify_ul2(example, components, mode_ids, first_sentinel)
        assert labels, example
        modes[small_sentencepiece_vocab.decode([int(example["inputs"][0])])] += 1
        if len(labels) == 1:
            counts[labels[0]] += 1
        else:
            ambiguous += 1  # A document's short last chunk can fit several settings.
    assert ambiguous < 0.02 * len(examples)
    tolerance = 4 * np.sqrt(0.2 * 0.8 / len(examples))  # Four binomial standard deviations.
    for label, rate, _ in components:
        assert counts[label] / sum(counts.values()) == pytest.approx(rate, abs=tolerance), label
    for token, rate in (("[NLU]", 0.4), ("[NLG]", 0.4), ("[S2S]", 0.2)):
        assert modes[token] / len(examples) == pytest.approx(rate, abs=tolerance), token


def test_ul2_denoisers_read_the_documents_in_different_orders(tmp_path):
    files = []
    for index in range(50):  # Plain-text files are shuffled as whole files.
        files.append(str(tmp_path / f"{index}.txt"))
        (tmp_path / f"{index}.txt").write_text(f"document {index}\n")
    same_settings = {"noise_density": 0.15, "mean_noise_span_length": 3.0, "rate": 1.0}
    name = tasks.register_text_task("mixtures_test_orders", files,
                                    objectives.UL2([same_settings, same_settings]),
                                    vocab.byte_vocabulary())
    orders = [[example["text"] for example in task.source.get_dataset(
        "train", shuffle=True, seed=0).as_numpy_iterator()]
        for task in tasks.get_task_or_mixture(name).tasks]
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(orders[0])) == 50
    assert orders[0][:10] != orders[1][:10]


def test_mixture_samples_its_tasks_at_their_rates(tmp_path):
    for letter in "ab":
        (tmp_path / f"{letter}.txt").write_text((letter * 200 + "\n") * 50)
        tasks.register_text_task(f"mixtures_test_{letter}", [str(tmp_path / f"{letter}.txt")],
                                 vocabulary=vocab.byte_vocabulary())
    tasks.register_mixture("mixtures_test_ab", [("mixtures_test_a", 3.0),
                                                ("mixtures_test_b", 1.0)])
    examples = take("mixtures_test_ab", {"inputs": 64, "targets": 16}, 4000, shuffle=True)
    from_a = [bool(np.any(e["inputs"] == ord("a") + 3)) for e in examples]
    from_b = [bool(np.any(e["inputs"] == ord("b") + 3)) for e in examples]
    assert all(a != b for a, b in zip(from_a, from_b))
    assert np.mean(from_a) == pytest.approx(0.75, abs=4 * np.sqrt(0.75 * 0.25 / 4000))
    with pytest.raises(ValueError, match="unknown task or mixture 'mixtures_test_c'"):
        tasks.register_mixture("mixtures_test_bad", [("mixtures_test_c", 1.0)])


@pytest.mark.parametrize("objective", list(objectives.OBJECTIVES))
def test_each_objective_follows_the_seed(objective, short_documents, small_sentencepiece_vocab):
    name = tasks.register_text_task(f"mixtures_test_seed_{objective}", [short_documents],
                                    objective, small_sentencepiece_vocab, text_field="body")

    # A causal LM's rows are targets only, for a decoder-only model; a masked LM's rows are
    # an encoder-only model's.
    decoder_only, encoder_only = objective == "causal_lm", objective == "bert_mlm"
    key = "decoder_target_tokens" if decoder_only else "encoder_input_tokens"

    def first_batches(seed):
        iterator = pipeline.get_batches(name, "train", {"inputs": 64, "targets": 64}, 4,
                                        shuffle=True, seed=seed, repeat=True,
                                        decoder_only=decoder_only, encoder_only=encoder_only)
        return [next(iterator)[key] for _ in range(2)]

    first, again, other = first_batches(1), first_batches(1), first_batches(2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("objective, lengths, message", [
    ("span_corruption", {"inputs": 2, "targets": 16}, "too short for span corruption"),
    ("prefix_lm", {"inputs": 16, "targets": 1}, "too short for prefix-LM"),
    ("bart", {"inputs": 64, "targets": 2}, "too short for BART noise"),
    ("causal_lm", {"inputs": 64, "targets": 2}, "too short for a causal LM"),
    ("ul2", {"inputs": 2, "targets": 64}, "it needs inputs >= 4"),
    ("bert_mlm", {"inputs": 2, "targets": 64}, "too short for a masked LM"),
])
def test_lengths_too_short_for_the_objective_are_named(objective, lengths, message,
                                                       short_documents, small_sentencepiece_vocab):
    name = tasks.register_text_task(f"mixtures_test_short_{objective}", [short_documents],
                                    objective, small_sentencepiece_vocab, text_field="body")
    with pytest.raises(ValueError, match=message):
        take(name, lengths, 1)


def test_unknown_jsonl_field_and_missing_file_are_named(long_documents, tmp_path):
    with pytest.raises(ValueError, match="docs.jsonl:1: JSON line has no field 'text'"):
        tasks.register_text_task("mixtures_test_field", [long_documents], "bart")
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        tasks.register_text_task("mixtures_test_missing", [str(tmp_path / "nope.txt")])


@pytest.fixture(scope="module")
def tfds_metadata_dir(tmp_path_factory):
    """A TFDS data_dir holding only the dataset_info of C4 and Wikipedia (40 examples per
    split), which `tfds.testing.mock_data` needs to serve their random examples offline."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for tfds_name, splits in corpora.TFDS_SOURCES.values():
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        names = sorted({split.split("[")[0] for split in splits.values()})
        builder.info.set_splits(tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=name, shard_lengths=[40], num_bytes=0) for name in names]))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
    return data_dir


@pytest.mark.parametrize("source", list(corpora.TFDS_SOURCES))
def test_tfds_sources_feed_span_corruption_and_ul2(source, tfds_metadata_dir,
                                                   small_sentencepiece_vocab):
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=tfds_metadata_dir):
        for objective in ("span_corruption", "ul2"):
            name = tasks.register_task(f"mixtures_test_{source}_{objective}", source, objective,
                                       small_sentencepiece_vocab)
            for split in ("train", "validation")[:1 if objective == "ul2" else 2]:
                batch = next(pipeline.get_batches(name, split, {"inputs": 64, "targets": 32}, 4,
                                                  shuffle=True, seed=0, repeat=True))
                targets = batch["decoder_target_tokens"][batch["decoder_loss_weights"] > 0]
                text = small_sentencepiece_vocab.decode(
                    [int(t) for t in targets if 1 < t < small_sentencepiece_vocab.vocab_size - 100])
                # Mock examples are random strings of the letters a to j and spaces.
                assert len(text) > 20 and set(text) <= set("abcdefghij ")


def test_builtin_tfds_tasks_name_their_datasets():
    assert tasks.get_task_or_mixture("c4_span_corruption").source.tfds_dataset.name == "c4/en:3.1.0"
    wikipedia = tasks.get_task_or_mixture("wikipedia_span_corruption").source
    assert wikipedia.tfds_dataset.name == "wikipedia/20230601.en:1.0.0"
    assert wikipedia.splits == ("train", "validation")


def test_inspect_task_shows_mode_tokens_and_sentinels(long_documents, small_sentencepiece_vocab,
                                                      capsys):
    tasks.register_text_task("mixtures_test_inspect", [long_documents],
                             objectives.UL2([{"mode_token": "[NLG]", "noise_density": 0.5,
                                              "mean_noise_span_length": 3.0, "rate": 1.0}]),
                             small_sentencepiece_vocab, text_field="body")
    inspect_task.main(["mixtures_test_inspect", "--n", "2", "--inputs", "48", "--targets", "48"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mixtures_test_inspect (train), lengths {'inputs': 48, "
                               "'targets': 48}")
    inputs = [line for line in lines if line.startswith("inputs:  '[NLG]")]
    targets = [line for line in lines if line.startswith("targets: '<extra_id_0>")]
    assert len(inputs) == 2 and len(targets) == 2
    assert all("<extra_id_1>" in line for line in inputs + targets)


def test_inspect_task_command_answers_bad_input_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "t5x_lite.inspect_task", "stdlib_ul3", "--n", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 2 and not result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: unknown task or mixture 'stdlib_ul3': did you mean stdlib_ul2? "
                      "(register yours in a module of your own and pass "
                      "--module_import=my_tasks, or put `import my_tasks` in a gin file; "
                      "README: Your own corpus)"]
    assert "Traceback" not in result.stderr
