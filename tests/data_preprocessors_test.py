"""Span corruption keeps T5's lengths and noise statistics, and inputs + targets rebuild the
source exactly; chunking cuts documents where it should."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_lite.data import preprocessors

BYTE_VOCAB = seqio.ByteVocabulary(extra_ids=100)  # 359 ids; sentinels 358 down to 259.
FEATURES = {"inputs": seqio.Feature(BYTE_VOCAB), "targets": seqio.Feature(BYTE_VOCAB)}


def expected_helper_lengths(inputs_length, noise_density, mean_span):
    """Brute force over every candidate chunk length, in NumPy."""
    tokens = np.arange(2, 4 * inputs_length)
    noise = np.clip(np.round(tokens * noise_density), 1, tokens - 1)
    spans = np.maximum(np.round(noise / mean_span), 1)
    inputs = tokens - noise + spans + 1
    best = np.flatnonzero(inputs <= inputs_length).max()
    return int(tokens[best]), int(noise[best] + spans[best] + 1), int(inputs[best])


def corrupt(token_lists, seed=0, **noise):
    dataset = tf.data.Dataset.from_generator(
        lambda: ({"targets": np.asarray(t, np.int32)} for t in token_lists),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.utils.map_seed_manager(seed):
        dataset = preprocessors.span_corruption(dataset, FEATURES, **noise)
    return list(dataset.as_numpy_iterator())


def test_random_spans_helper_matches_t5_at_512():
    assert preprocessors.random_spans_helper(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize("inputs_length, noise_density, mean_span",
                         [(128, 0.15, 3.0), (626, 0.15, 3.0), (200, 0.3, 8.0), (64, 0.5, 1.0)])
def test_random_spans_helper_matches_brute_force(inputs_length, noise_density, mean_span):
    tokens_length, targets_length, inputs_after_eos = expected_helper_lengths(
        inputs_length, noise_density, mean_span)
    assert inputs_after_eos == inputs_length
    assert preprocessors.random_spans_helper(inputs_length, noise_density, mean_span) == (
        tokens_length, targets_length)


def test_inputs_and_targets_rebuild_the_source(rebuild_from_span_corruption):
    rng = np.random.default_rng(0)
    sources = [rng.integers(3, 259, size=rng.integers(2, 600)) for _ in range(300)]
    examples = corrupt(sources, seed=3)
    assert len(examples) == len(sources)
    for source, example in zip(sources, examples):
        inputs, targets = example["inputs"], example["targets"]
        rebuilt = rebuild_from_span_corruption(inputs, targets, BYTE_VOCAB.vocab_size)
        np.testing.assert_array_equal(rebuilt, source)
        # Sentinels count down from the top id in both features, in the same order.
        input_sentinels = inputs[inputs >= 259]
        target_sentinels = targets[targets >= 259]
        np.testing.assert_array_equal(input_sentinels, 358 - np.arange(len(input_sentinels)))
        assert targets[0] == 358
        np.testing.assert_array_equal(target_sentinels[:len(input_sentinels)], input_sentinels)


def test_noise_density_and_mean_span_length():
    noise_tokens = noise_spans = total = 0
    masks = []
    for i in range(200):
        mask = preprocessors.random_spans_noise_mask(
            568, 0.15, 3.0, tf.constant([[i, 1], [i, 2]])).numpy()
        assert not mask[0]  # Spans alternate starting with kept tokens.
        noise_tokens += mask.sum()
        noise_spans += np.sum(mask[1:] & ~mask[:-1])
        total += mask.size
        masks.append(mask)
    assert abs(noise_tokens / total - 0.15) <= 0.01
    assert abs(noise_tokens / noise_spans - 3.0) <= 0.2
    # Span placement varies with the seed: noise covers most positions across examples.
    assert np.mean(np.any(masks, axis=0)) > 0.9


@pytest.mark.parametrize("noise_density, mean_span", [(0.15, 3.0), (0.3, 2.5)])
def test_noise_mask_counts_match_the_length_helper(noise_density, mean_span):
    # Lengths include ties such as 190 * 0.15 = 28.5, where float32 and float64 round apart.
    for length in list(range(2, 60)) + [190, 350, 390, 670, 710, 95, 175, 335]:
        mask = preprocessors.random_spans_noise_mask(
            length, noise_density, mean_span, tf.constant([[length, 1], [length, 2]])).numpy()
        expected_noise = min(max(round(length * noise_density), 1), length - 1)
        assert mask.sum() == expected_noise, length
        assert np.sum(mask[1:] & ~mask[:-1]) == max(round(expected_noise / mean_span), 1)


def test_inputs_fill_512_after_eos_for_568_token_chunks():
    rng = np.random.default_rng(1)
    for example in corrupt([rng.integers(3, 259, size=568) for _ in range(20)]):
        assert len(example["inputs"]) + 1 == 512
        assert len(example["targets"]) + 1 == 114


def test_span_corruption_is_reproducible_from_the_seed():
    sources = [np.arange(3, 203)] * 5
    first, again, other = corrupt(sources, seed=7), corrupt(sources, seed=7), corrupt(sources, 8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any(len(a["inputs"]) != len(c["inputs"]) or np.any(a["inputs"] != c["inputs"])
               for a, c in zip(first, other))


def test_split_tokens_cuts_consecutive_chunks_and_drops_single_tokens():
    documents = tf.ragged.constant([list(range(3, 13)), [], list(range(20, 29)), [5]])
    dataset = tf.data.Dataset.from_tensor_slices(documents).map(lambda t: {"targets": t})
    chunks = [c["targets"].tolist()
              for c in preprocessors.split_tokens(dataset, 4).as_numpy_iterator()]
    assert chunks == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12],
                      [20, 21, 22, 23], [24, 25, 26, 27]]


@pytest.mark.parametrize("noise_density, mean_span, parameter", [
    (0.0, 3.0, "noise_density"), (1.0, 3.0, "noise_density"), (-0.1, 3.0, "noise_density"),
    (0.15, 0.5, "mean_noise_span_length")])
def test_bad_noise_arguments_raise(noise_density, mean_span, parameter):
    with pytest.raises(ValueError, match=parameter):
        preprocessors.random_spans_helper(512, noise_density, mean_span)
    with pytest.raises(ValueError, match=parameter):
        corrupt([[3, 4, 5]], noise_density=noise_density, mean_noise_span_length=mean_span)


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="max_tokens_per_segment"):
        preprocessors.split_tokens(tf.data.Dataset.range(1), 1)
    with pytest.raises(ValueError, match="inputs_length"):
        preprocessors.random_spans_helper(2, 0.15, 3.0)
