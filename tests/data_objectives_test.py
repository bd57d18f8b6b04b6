"""Every pretraining objective's preprocessors, measured over thousands of examples: noise
statistics match the settings, corruptions that should be reversible are, and every example fits
the requested lengths. (Task-level rates, seeds and sources: data_mixtures_test.py.)"""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import objectives
from t5x_lite.data import preprocessors
from t5x_lite.data import tasks
from t5x_lite.data import vocab

BYTES = seqio.ByteVocabulary(extra_ids=100)  # 359 ids; sentinels 358 down to 259.
FIRST_SENTINEL = 259
MASK = 358  # BART's mask: the first sentinel.
PERIOD = ord(".") + 3


def byte_features(vocabulary=BYTES) -> dict[str, seqio.Feature]:
    return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
            "targets": seqio.Feature(vocabulary, add_eos=True)}


def random_documents(num_documents: int, num_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, FIRST_SENTINEL, num_tokens).astype(np.int32)
            for _ in range(num_documents)]


def apply(objective, documents, lengths, seed=0, features=None) -> list[dict]:
    """The objective's examples (before EOS) for token documents, in document order."""
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in documents),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.utils.map_seed_manager(seed):
        for step in objective.preprocessors():
            step = seqio.utils.add_kwargs_to_transform(
                step, sequence_length=lengths, output_features=features or byte_features())
            dataset = step(dataset)
    return list(dataset.as_numpy_iterator())


def brute_force_chunk_length(lengths, density, mean_span, max_spans, prefix) -> int:
    tokens = np.arange(2, 8 * lengths["inputs"])
    noise = np.clip(np.round(tokens * density), 1, tokens - 1)
    spans = np.maximum(np.round(noise / mean_span), 1)
    fits = ((prefix + tokens - noise + spans + 1 <= lengths["inputs"])
            & (noise + spans + 1 <= lengths["targets"]) & (spans <= max_spans))
    return int(tokens[np.flatnonzero(fits).max()])


@pytest.mark.parametrize("lengths, density, mean_span, max_spans, prefix", [
    ({"inputs": 512, "targets": 114}, 0.15, 3.0, 100, 0),
    ({"inputs": 512, "targets": 114}, 0.5, 3.0, 100, 1),
    ({"inputs": 512, "targets": 512}, 0.5, 3.0, 100, 1),
    ({"inputs": 128, "targets": 32}, 0.15, 64.0, 100, 1),
    ({"inputs": 4096, "targets": 4096}, 0.15, 8.0, 30, 0),
])
def test_chunk_length_is_the_longest_that_fits(lengths, density, mean_span, max_spans, prefix):
    assert preprocessors.span_corruption_chunk_length(lengths, density, mean_span, max_spans,
                                                      prefix) == brute_force_chunk_length(
        lengths, density, mean_span, max_spans, prefix)
    # T5's helper gives the same chunk when only the inputs bind.
    assert preprocessors.span_corruption_chunk_length(
        {"inputs": 512, "targets": 114}, 0.15, 3.0, 100) == 568


SPAN_SETTINGS = [(settings["noise_density"], settings["mean_noise_span_length"])
                 for settings in objectives.DEFAULT_UL2_DENOISERS if "noise_density" in settings]


@pytest.mark.parametrize("density, mean_span", SPAN_SETTINGS)
def test_span_denoisers_match_their_settings_and_rebuild_the_source(
        density, mean_span, rebuild_from_span_corruption):
    # Long spans need long chunks to hold several of them.
    length = 2048 if mean_span > 8 else 512
    lengths = {"inputs": length, "targets": length}
    documents = random_documents(40, 30_000)
    examples = apply(objectives.SpanCorruption(density, mean_span), documents, lengths)
    assert len(examples) >= (250 if length > 512 else 1000)
    noise_tokens = spans = 0
    rebuilt = []
    for example in examples:
        inputs, targets = example["inputs"], example["targets"]
        assert len(inputs) + 1 <= length and len(targets) + 1 <= length
        num_spans = int(np.sum(inputs >= FIRST_SENTINEL))
        noise_tokens += len(targets) - num_spans
        spans += num_spans
        rebuilt.extend(rebuild_from_span_corruption(inputs, targets, BYTES.vocab_size))
    np.testing.assert_array_equal(rebuilt, np.concatenate(documents))
    assert noise_tokens / len(rebuilt) == pytest.approx(density, abs=0.01)
    assert noise_tokens / spans == pytest.approx(mean_span, rel=0.1)


def test_prefix_lm_splits_uniformly_and_prefix_plus_targets_is_the_source():
    lengths = {"inputs": 512, "targets": 114}
    documents = random_documents(40, 30_000)
    examples = apply(objectives.PrefixLM(), documents, lengths)
    assert len(examples) > 2000
    joined = np.concatenate([np.concatenate([e["inputs"], e["targets"]]) for e in examples])
    np.testing.assert_array_equal(joined, np.concatenate(documents))
    # Full chunks are 511 tokens (the inputs' room); the continuation gets at most 113.
    splits = np.array([len(e["inputs"]) for e in examples
                       if len(e["inputs"]) + len(e["targets"]) == 511])
    assert len(splits) > 2000 and splits.min() == 398 and splits.max() == 510
    uniform_sd = np.sqrt((113**2 - 1) / 12)
    assert splits.mean() == pytest.approx(454, abs=4 * uniform_sd / np.sqrt(len(splits)))
    assert max(len(e["targets"]) for e in examples) == 113


def infilled(example) -> tuple[int, int]:
    """(noise tokens, masks) of a text-infilling example without other noise."""
    masks = int(np.sum(example["inputs"] == MASK))
    return len(example["targets"]) - (len(example["inputs"]) - masks), masks


def is_subsequence(short, long) -> bool:
    position = 0
    for token in short:
        hits = np.flatnonzero(long[position:] == token)
        if not len(hits):
            return False
        position += hits[0] + 1
    return True


def test_bart_text_infilling_masks_poisson_spans_at_the_rate():
    lengths = {"inputs": 512, "targets": 512}
    documents = random_documents(10, 120_000)
    objective = objectives.BartNoise(sentence_permutation=False)
    examples = apply(objective, documents, lengths)
    assert len(examples) > 2000
    noise, masks = np.sum([infilled(e) for e in examples], axis=0)
    total = sum(len(e["targets"]) for e in examples)
    assert noise / total == pytest.approx(0.3, abs=0.01)
    assert noise / masks == pytest.approx(3.0, abs=0.2)  # Poisson(3), zero-length spans too.
    np.testing.assert_array_equal(np.concatenate([e["targets"] for e in examples]),
                                  np.concatenate(documents))
    for example in examples[:200]:
        assert is_subsequence(example["inputs"][example["inputs"] != MASK], example["targets"])


def test_bart_token_masking_and_deletion_follow_their_rates():
    lengths = {"inputs": 512, "targets": 512}
    documents = random_documents(4, 300_000)
    masked = apply(objectives.BartNoise(0.0, token_masking_rate=0.2,
                                        sentence_permutation=False), documents, lengths)
    inputs, targets = (np.concatenate([e[k] for e in masked]) for k in ("inputs", "targets"))
    assert np.mean(inputs == MASK) == pytest.approx(0.2, abs=0.01)
    np.testing.assert_array_equal(inputs[inputs != MASK], targets[inputs != MASK])
    deleted = apply(objectives.BartNoise(0.0, token_deletion_rate=0.2,
                                         sentence_permutation=False), documents, lengths)
    kept = sum(len(e["inputs"]) for e in deleted) / sum(len(e["targets"]) for e in deleted)
    assert kept == pytest.approx(0.8, abs=0.01)
    assert all(is_subsequence(e["inputs"], e["targets"]) for e in deleted[:200])


def is_sentence_permutation(inputs, targets) -> bool:
    """Whether `inputs` is the sentences of `targets` (each ending at a period, the last one
    at the end of the chunk) in some order."""
    remaining = [list(s) for s in np.split(targets, np.flatnonzero(targets == PERIOD) + 1)
                 if len(s)]
    position = 0
    while remaining:
        match = next((s for s in remaining
                      if list(inputs[position:position + len(s)]) == s), None)
        if match is None:
            return False
        remaining.remove(match)
        position += len(match)
    return position == len(inputs)


def test_bart_sentence_permutation_and_document_rotation_keep_every_token():
    rng = np.random.default_rng(1)
    documents = [np.where(rng.random(50_000) < 0.1, PERIOD,
                          rng.integers(3, 100, 50_000)).astype(np.int32) for _ in range(4)]
    lengths = {"inputs": 256, "targets": 256}
    permuted = apply(objectives.BartNoise(0.0, sentence_end_chars="."), documents, lengths)
    reordered = 0
    for example in permuted:
        inputs, targets = example["inputs"], example["targets"]
        assert is_sentence_permutation(inputs, targets)
        reordered += not np.array_equal(inputs, targets)
    assert reordered > 0.95 * len(permuted)
    rotated = apply(objectives.BartNoise(0.0, sentence_permutation=False, document_rotation=True),
                    documents, lengths)
    offsets = []
    for example in rotated:
        inputs, targets = example["inputs"], example["targets"]
        matches = [k for k in range(len(targets)) if np.array_equal(np.roll(targets, -k), inputs)]
        assert matches
        offsets.append(matches[0] / len(targets))
    assert np.mean(offsets) == pytest.approx(0.5, abs=0.05)


def test_mode_tokens_are_single_entries_prepended_to_the_inputs(small_sentencepiece_vocab,
                                                               rebuild_from_span_corruption):
    features = byte_features(small_sentencepiece_vocab)
    ids = [preprocessors.mode_token_id(small_sentencepiece_vocab, t) for t in vocab.MODE_TOKENS]
    assert len(set(ids)) == 3
    assert [small_sentencepiece_vocab.decode([i]) for i in ids] == list(vocab.MODE_TOKENS)
    documents = random_documents(2, 5000)
    examples = apply(objectives.SpanCorruption(0.5, 3.0, "[NLG]"), documents,
                     {"inputs": 64, "targets": 64}, features=features)
    assert all(e["inputs"][0] == ids[1] and len(e["inputs"]) <= 63 for e in examples)
    rebuilt = []
    for e in examples:
        rebuilt.extend(rebuild_from_span_corruption(e["inputs"][1:], e["targets"],
                                                    small_sentencepiece_vocab.vocab_size))
    np.testing.assert_array_equal(rebuilt, np.concatenate(documents))
    with pytest.raises(ValueError, match="'\\[S2S\\]' is 5 pieces in ByteVocabulary"):
        apply(objectives.PrefixLM("[S2S]"), documents, {"inputs": 64, "targets": 64})


# --- T5's cut: documents concatenated, then chunks of the objective's length ------------------

T5_LENGTHS = {"inputs": 512, "targets": 114}


def write_corpus(path, kind: str) -> list[str]:
    """Plain text, one document a line: "short" is about 27,000 lines of 5 to 80 bytes,
    "long" 40 lines of 30,000 bytes. Returns the documents."""
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz  ,."))
    sizes = rng.integers(5, 81, 27_000) if kind == "short" else [30_000] * 40
    documents = ["x" + "".join(rng.choice(letters, size - 2)) + "y" for size in sizes]
    path.write_text("\n".join(documents) + "\n")
    return documents


def task_examples(name: str, lengths=T5_LENGTHS) -> list[dict]:
    """One pass over the train split, in file order, as the task yields it (EOS included)."""
    dataset = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=False)
    return list(dataset.as_numpy_iterator())


@pytest.mark.parametrize("kind", ["short", "long"])
def test_span_corruption_cuts_full_568_token_chunks_of_the_document_stream(
        tmp_path, kind, rebuild_from_span_corruption):
    documents = write_corpus(tmp_path / "corpus.txt", kind)
    stream = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int32) + 3
                             for d in documents])
    tasks.register_text_task("t5_cut", [str(tmp_path / "corpus.txt")], vocabulary=BYTES)
    examples = task_examples("t5_cut")
    assert len(examples) >= 2000
    full = [len(e["inputs"]) == 512 and len(e["targets"]) == 114 for e in examples]
    assert np.mean(full) >= 0.99 and all(full[:-1])
    sources, noise_tokens, spans = [], 0, 0
    for example in examples:
        inputs, targets = example["inputs"][:-1], example["targets"][:-1]  # EOS off.
        num_spans = int(np.sum(inputs >= FIRST_SENTINEL))
        noise_tokens += len(targets) - num_spans
        spans += num_spans
        sources.append(rebuild_from_span_corruption(inputs, targets, BYTES.vocab_size))
    assert np.mean([len(s) == 568 for s in sources]) >= 0.99
    np.testing.assert_array_equal(np.concatenate(sources), stream)
    assert noise_tokens / len(stream) == pytest.approx(0.15, abs=0.01)
    assert noise_tokens / spans == pytest.approx(3.0, abs=0.2)
    # The document-preserving cut is still there, as a setting: short documents stay short.
    tasks.register_text_task("t5_cut", [str(tmp_path / "corpus.txt")], vocabulary=BYTES,
                             objective=objectives.SpanCorruption(concatenate_documents=False))
    per_document = task_examples("t5_cut")
    assert np.mean([len(e["inputs"]) == 512 for e in per_document]) < (
        0.01 if kind == "short" else 0.99)


def brute_force_lengths(lengths, density, mean_span, prefix) -> tuple[int, int, int]:
    """(chunk, inputs, targets) with the mode token and EOS, by brute_force_chunk_length."""
    chunk = brute_force_chunk_length(lengths, density, mean_span, 100, prefix)
    noise = min(max(round(chunk * density), 1), chunk - 1)
    spans = max(round(noise / mean_span), 1)
    return chunk, prefix + chunk - noise + spans + 1, noise + spans + 1


def test_ul2_denoisers_and_prefix_lm_cut_full_chunks_of_the_stream(
        tmp_path, small_sentencepiece_vocab, rebuild_from_span_corruption):
    documents = write_corpus(tmp_path / "corpus.txt", "short")[:8000]
    (tmp_path / "corpus.txt").write_text("\n".join(documents) + "\n")
    stream = np.concatenate([small_sentencepiece_vocab.encode(d) for d in documents])
    sentinel = small_sentencepiece_vocab.vocab_size - 100
    mixture = tasks.register_text_task("ul2_cut", [str(tmp_path / "corpus.txt")],
                                       objective="ul2", vocabulary=small_sentencepiece_vocab)
    labels = [label for label, _, _ in objectives.UL2().components()]
    assert len(seqio.get_mixture_or_task(mixture).tasks) == len(labels)
    for label, settings in zip(labels, objectives.DEFAULT_UL2_DENOISERS):
        task = seqio.get_mixture_or_task(f"{mixture}.{label}")
        examples = task_examples(task.name)
        assert len(examples) >= 200, task.name
        inputs = [e["inputs"][1:-1] for e in examples]  # Mode token and EOS off.
        targets = [e["targets"][:-1] for e in examples]
        if settings.get("prefix_lm"):
            chunk = max(T5_LENGTHS["inputs"] - 2, T5_LENGTHS["targets"] - 1)
            sources = [np.concatenate(pair) for pair in zip(inputs, targets)]
        else:
            chunk, inputs_length, targets_length = brute_force_lengths(
                T5_LENGTHS, settings["noise_density"], settings["mean_noise_span_length"], 1)
            sources = [rebuild_from_span_corruption(i, t, small_sentencepiece_vocab.vocab_size)
                       for i, t in zip(inputs, targets)]
            full = [len(e["inputs"]) == inputs_length and len(e["targets"]) == targets_length
                    for e in examples]
            assert np.mean(full) >= 0.99, task.name
            assert all(np.sum(i >= sentinel) <= 100 for i in inputs)
        assert np.mean([len(s) == chunk for s in sources]) >= 0.99, task.name
        np.testing.assert_array_equal(np.concatenate(sources), stream, err_msg=task.name)
    prefix_lm = tasks.register_text_task("prefix_lm_cut", [str(tmp_path / "corpus.txt")],
                                         objective="prefix_lm",
                                         vocabulary=small_sentencepiece_vocab)
    chunks = [np.concatenate([e["inputs"][:-1], e["targets"][:-1]])
              for e in task_examples(prefix_lm)]
    assert np.mean([len(c) == 511 for c in chunks]) >= 0.99
    np.testing.assert_array_equal(np.concatenate(chunks), stream)
