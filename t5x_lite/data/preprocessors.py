"""Token-level tf.data preprocessors: cutting documents into chunks and T5 span corruption
(Raffel et al. 2020, section 3.1.4). All randomness is stateless and seeded by seqio, so a
pipeline is reproducible from its seed. Vocabularies and task wiring live elsewhere.
"""
import seqio
import tensorflow as tf


def check_noise_args(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")


def _noise_counts(length: int, noise_density: float,
                  mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) in a chunk of `length` >= 2 tokens; mirrors the TF
    computation in `random_spans_noise_mask` (both round float64 half to even)."""
    num_noise_tokens = min(max(round(length * noise_density), 1), length - 1)
    num_noise_spans = max(round(num_noise_tokens / mean_noise_span_length), 1)
    return num_noise_tokens, num_noise_spans


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest chunk whose span-corrupted inputs plus EOS
    fit in `inputs_length` tokens, and the length of its targets plus EOS.

    Corrupting n tokens with m noise tokens in s spans gives inputs of (n - m) + s tokens (kept
    tokens and one sentinel per span) and targets of m + s tokens, each plus one EOS. The
    inputs length grows by 0 or 1 per extra token, so the longest fitting chunk fills
    `inputs_length` exactly.
    """
    check_noise_args(noise_density, mean_noise_span_length)
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be >= 3 (a kept token, a sentinel and EOS), "
                         f"got {inputs_length}")

    def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _noise_counts(tokens_length, noise_density,
                                             mean_noise_span_length)
        return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = 2
    while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, corrupted_lengths(tokens_length)[1]


def _random_segment_lengths(num_items: tf.Tensor, num_segments: tf.Tensor,
                            seed: tf.Tensor) -> tf.Tensor:
    """Splits `num_items` into `num_segments` positive int32 lengths, uniformly over all such
    compositions: it picks `num_segments - 1` distinct cut points among the `num_items - 1`
    gaps. Returns int32 [num_segments]."""
    gap_scores = tf.random.stateless_uniform([num_items - 1], seed=seed)
    _, cut_gaps = tf.math.top_k(gap_scores, k=num_segments - 1, sorted=False)
    boundaries = tf.concat([[0], tf.sort(cut_gaps) + 1, [num_items]], axis=0)
    return boundaries[1:] - boundaries[:-1]


def random_spans_noise_mask(length: int | tf.Tensor, noise_density: float,
                            mean_noise_span_length: float, seeds) -> tf.Tensor:
    """T5's noise mask: bool [length], True on noise tokens.

    round(length * noise_density) noise tokens (clamped to [1, length - 1]) form
    max(1, round(noise / mean_noise_span_length)) spans; noise and kept tokens are each split
    into that many random non-empty spans, interleaved starting with kept tokens.

    Args:
      seeds: two stateless seeds (int32 [2] each), for the noise and the kept segmentation.
    """
    original_length = tf.convert_to_tensor(length, tf.int32)
    length = tf.maximum(original_length, 2)  # One noise and one kept token at minimum.
    # float64 rounds exactly as Python does in `random_spans_helper`; float32 would round
    # ties such as 190 * 0.15 = 28.5 the other way and overflow the inputs by a token.
    num_noise_tokens = tf.cast(tf.round(tf.cast(length, tf.float64) * noise_density), tf.int32)
    num_noise_tokens = tf.clip_by_value(num_noise_tokens, 1, length - 1)
    num_noise_spans = tf.maximum(tf.cast(
        tf.round(tf.cast(num_noise_tokens, tf.float64) / mean_noise_span_length), tf.int32), 1)
    noise_lengths = _random_segment_lengths(num_noise_tokens, num_noise_spans, seeds[0])
    kept_lengths = _random_segment_lengths(length - num_noise_tokens, num_noise_spans, seeds[1])
    span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
    span_is_noise = tf.tile([False, True], [num_noise_spans])
    return tf.repeat(span_is_noise, span_lengths)[:original_length]


def replace_spans_with_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor,
                                 vocab_size: int) -> tf.Tensor:
    """Replaces the k-th run of True in `span_mask` (k = 0, 1, ...) by the single sentinel id
    `vocab_size - 1 - k`. tokens: int [n]; span_mask: bool [n]. Returns int [<= n]."""
    previous_mask = tf.pad(span_mask[:-1], [[1, 0]])
    span_starts = tf.logical_and(span_mask, tf.logical_not(previous_mask))
    span_index = tf.cumsum(tf.cast(span_starts, tokens.dtype)) - 1
    tokens = tf.where(span_starts, tf.cast(vocab_size - 1, tokens.dtype) - span_index, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(tf.logical_and(span_mask, previous_mask)))


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(features, seeds, vocab_size: int, noise_density: float,
                   mean_noise_span_length: float):
    tokens = features["targets"]
    noise_mask = random_spans_noise_mask(tf.size(tokens), noise_density,
                                         mean_noise_span_length, seeds)
    return {
        "inputs": replace_spans_with_sentinels(tokens, noise_mask, vocab_size),
        "targets": replace_spans_with_sentinels(tokens, tf.logical_not(noise_mask), vocab_size),
    }


def span_corruption(dataset: tf.data.Dataset, output_features: dict[str, seqio.Feature],
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tf.data.Dataset:
    """Maps `{"targets": int [n]}` chunks to T5 span-corruption examples.

    inputs: kept tokens, each noise span replaced by one sentinel (first span vocab_size - 1,
    then descending). targets: each kept span replaced by the next sentinel, so the targets read
    sentinel 0, noise span 0, sentinel 1, noise span 1, ... No EOS is added here.
    """
    check_noise_args(noise_density, mean_noise_span_length)
    vocab_size = output_features["targets"].vocabulary.vocab_size
    return _corrupt_spans(dataset, vocab_size=vocab_size, noise_density=noise_density,
                          mean_noise_span_length=mean_noise_span_length)


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int) -> tf.data.Dataset:
    """Cuts each `{"targets": int [n]}` document into consecutive chunks of
    `max_tokens_per_segment` tokens (the last one shorter) and drops chunks of fewer than 2
    tokens, which cannot hold both a noise and a kept token. Other features are dropped."""
    if max_tokens_per_segment < 2:
        raise ValueError(f"max_tokens_per_segment must be >= 2, got {max_tokens_per_segment}")

    def to_chunks(features):
        tokens = features["targets"]
        num_tokens = tf.size(tokens, out_type=tf.int64)
        row_starts = tf.range(0, num_tokens, max_tokens_per_segment, dtype=tf.int64)
        chunks = tf.RaggedTensor.from_row_starts(tokens, row_starts)
        return {"targets": tf.ragged.boolean_mask(chunks, chunks.row_lengths() >= 2)}

    return dataset.map(to_chunks, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def split_tokens_to_inputs_length(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                                  noise_density: float = 0.15,
                                  mean_noise_span_length: float = 3.0) -> tf.data.Dataset:
    """`split_tokens` to the chunk length whose span corruption fills `sequence_length["inputs"]`
    (568 tokens for 512 inputs at the default noise)."""
    tokens_length, _ = random_spans_helper(sequence_length["inputs"], noise_density,
                                           mean_noise_span_length)
    return split_tokens(dataset, tokens_length)
