"""Token-level tf.data preprocessors for the pretraining objectives: cutting the documents'
token stream into chunks that fit the requested lengths, T5 span corruption (Raffel et al.
2020, section 3.1.4), prefix-LM, BART noise (Lewis et al. 2020), UL2 mode tokens (Tay et al.
2022) and BERT's masked LM (Devlin et al. 2019); and the steps of rank-classification and
classification tasks.

Every objective maps `{"targets": int [n]}` chunks to `{"inputs", "targets"}` (a masked LM
adds the chosen positions, MLM_WEIGHTS) and adds no EOS (seqio's `append_eos_after_trim`
does). All randomness is stateless and seeded by seqio, so a
pipeline is reproducible from its seed. Objective settings and task wiring live in
`objectives.py` and `tasks.py`.
"""
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import vocab as vocab_lib


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


def _span_corruption_lengths(tokens_length: int, noise_density: float,
                             mean_noise_span_length: float) -> tuple[int, int, int]:
    """(inputs, targets, spans) of corrupting `tokens_length` tokens, EOS not counted: kept
    tokens plus one sentinel per span, and noise tokens plus one sentinel per span."""
    num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
    return tokens_length - num_noise + num_spans, num_noise + num_spans, num_spans


def random_spans_helper(inputs_length: int, noise_density: float,
                        mean_noise_span_length: float) -> tuple[int, int]:
    """(tokens_length, targets_length), as T5 computes them: the longest chunk whose
    span-corrupted inputs plus EOS fit in `inputs_length` tokens, and the length of its targets
    plus EOS, which is the targets length to request (114 for 512 inputs at T5's noise).

    Corrupting n tokens with m noise tokens in s spans gives inputs of (n - m) + s tokens and
    targets of m + s tokens, each plus EOS. The inputs length grows by 0 or 1 per extra token,
    so the longest fitting chunk fills `inputs_length` exactly.
    """
    check_noise_args(noise_density, mean_noise_span_length)
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be >= 3 (a kept token, a sentinel and EOS), "
                         f"got {inputs_length}")
    unbounded = 2**31 - 1  # T5 lets only the inputs length bind.
    tokens_length = span_corruption_chunk_length(
        {"inputs": inputs_length, "targets": unbounded}, noise_density, mean_noise_span_length,
        max_spans=unbounded)
    targets = _span_corruption_lengths(tokens_length, noise_density, mean_noise_span_length)[1]
    return tokens_length, targets + 1


def _describe_lengths(sequence_length: dict[str, int]) -> str:
    return f"task_feature_lengths {{'inputs': {sequence_length['inputs']}, " \
           f"'targets': {sequence_length['targets']}}}"


def span_corruption_chunk_length(sequence_length: dict[str, int], noise_density: float,
                                 mean_noise_span_length: float, max_spans: int,
                                 num_prefix_tokens: int = 0) -> int:
    """The longest chunk whose span corruption fits `sequence_length` with nothing truncated:
    `num_prefix_tokens` (a mode token) + corrupted inputs + EOS, and targets + EOS, using at
    most `max_spans` sentinels. Equals `random_spans_helper`'s chunk when the inputs bind.

    Raises ValueError naming the lengths needed when not even a 2-token chunk fits.
    """
    check_noise_args(noise_density, mean_noise_span_length)

    def fits(tokens_length: int) -> bool:
        inputs, targets, spans = _span_corruption_lengths(tokens_length, noise_density,
                                                          mean_noise_span_length)
        return (num_prefix_tokens + inputs + 1 <= sequence_length["inputs"]
                and targets + 1 <= sequence_length["targets"] and spans <= max_spans)

    if not fits(2):
        raise ValueError(
            f"{_describe_lengths(sequence_length)} are too short for span corruption "
            f"(noise_density={noise_density}, mean_noise_span_length={mean_noise_span_length}"
            f"{', a mode token' if num_prefix_tokens else ''}): it needs inputs >= "
            f"{num_prefix_tokens + 3} and targets >= 3")
    tokens_length = 2  # Each length grows with the chunk, so the first misfit ends the search.
    while fits(tokens_length + 1):
        tokens_length += 1
    return tokens_length


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


def _check_segment_length(max_tokens_per_segment: int) -> None:
    if max_tokens_per_segment < 2:
        raise ValueError(f"max_tokens_per_segment must be >= 2, got {max_tokens_per_segment}")


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int) -> tf.data.Dataset:
    """Cuts each `{"targets": int [n]}` document on its own into consecutive chunks of
    `max_tokens_per_segment` tokens (the last one shorter) and drops chunks of fewer than 2
    tokens, which cannot hold both a noise and a kept token. Other features are dropped."""
    _check_segment_length(max_tokens_per_segment)

    def to_chunks(features):
        tokens = features["targets"]
        num_tokens = tf.size(tokens, out_type=tf.int64)
        row_starts = tf.range(0, num_tokens, max_tokens_per_segment, dtype=tf.int64)
        chunks = tf.RaggedTensor.from_row_starts(tokens, row_starts)
        return {"targets": tf.ragged.boolean_mask(chunks, chunks.row_lengths() >= 2)}

    return dataset.map(to_chunks, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def split_stream(dataset: tf.data.Dataset, max_tokens_per_segment: int) -> tf.data.Dataset:
    """Concatenates the `{"targets": int [n]}` documents into one token stream and cuts it
    into consecutive chunks of exactly `max_tokens_per_segment` tokens, so that every chunk
    is full whatever the documents' lengths: T5's `reduce_concat_tokens` then `split_tokens`,
    without T5's groups of 128 documents (each group ends in a short chunk, one in ten on short
    documents). Only a finite stream's last chunk is shorter (dropped under 2 tokens); seqio
    repeats a training split after this step, so that is one chunk per epoch. No separator
    goes between documents, as in T5. Other features are dropped.

    The carried tokens (fewer than a chunk) are the scan's state, which tf.data checkpoints
    with the iterator, so a saved input position resumes mid-document exactly.
    """
    _check_segment_length(max_tokens_per_segment)
    dtype = dataset.element_spec["targets"].dtype
    end_of_stream = tf.data.Dataset.from_tensors((tf.zeros([0], dtype), True))
    documents = dataset.map(lambda features: (features["targets"], False)).concatenate(
        end_of_stream)

    def cut(carried, document):
        tokens, is_end = document
        stream = tf.concat([carried, tokens], axis=0)
        num_full = tf.size(stream) // max_tokens_per_segment
        rest = tf.size(stream) - num_full * max_tokens_per_segment
        num_tail = tf.cast(is_end & (rest >= 2), tf.int32)  # The end emits the last piece.
        row_lengths = tf.concat([tf.fill([num_full], max_tokens_per_segment),
                                 tf.fill([num_tail], rest)], axis=0)
        chunks = tf.RaggedTensor.from_row_lengths(stream[:tf.reduce_sum(row_lengths)],
                                                  row_lengths)
        return stream[num_full * max_tokens_per_segment:], {"targets": chunks}

    return documents.scan(tf.zeros([0], dtype), cut).unbatch()


def split_documents(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                    concatenate_documents: bool) -> tf.data.Dataset:
    """`split_stream` (T5's cut, every chunk full) or, with `concatenate_documents` False,
    `split_tokens` (chunks never cross a document's end; short documents give short
    examples)."""
    cut = split_stream if concatenate_documents else split_tokens
    return cut(dataset, max_tokens_per_segment)


def split_tokens_for_span_corruption(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                                     output_features: dict[str, seqio.Feature],
                                     noise_density: float = 0.15,
                                     mean_noise_span_length: float = 3.0,
                                     num_prefix_tokens: int = 0,
                                     concatenate_documents: bool = True) -> tf.data.Dataset:
    """`split_documents` to `span_corruption_chunk_length` (568 tokens for 512 inputs and 114
    targets at T5's noise), with no more spans than the vocabulary has sentinels."""
    max_spans = output_features["targets"].vocabulary.extra_ids
    tokens_length = span_corruption_chunk_length(sequence_length, noise_density,
                                                 mean_noise_span_length, max_spans,
                                                 num_prefix_tokens)
    return split_documents(dataset, tokens_length, concatenate_documents)


# --- Rank classification ---------------------------------------------------------------------

def rank_classification(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """{"inputs", "choices" [N], "label"} questions -> N examples each, one per choice:
    {"inputs", "targets": the choice, "idx": [question, choice], "is_correct"}; a model
    ranks the choices by their score (T5's rank_classification in eval mode)."""
    def expand(index, question):
        num_choices = tf.shape(question["choices"])[0]
        choice = tf.range(num_choices)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.fill([num_choices], question["inputs"]),
            "targets": question["choices"],
            "idx": tf.stack([tf.fill([num_choices], tf.cast(index, tf.int32)), choice], 1),
            "is_correct": tf.equal(choice, question["label"])})

    return dataset.enumerate().flat_map(expand)


def rank_classification_target(target, example=None, is_target: bool = False):
    """seqio postprocess_fn: a target becomes (question index, is_correct), which
    metrics.rank_classification_accuracy groups by question; scores pass unchanged."""
    if not is_target:
        return target
    return int(example["idx"][0]), bool(example["is_correct"])


# --- Causal LM ---------------------------------------------------------------------------------

def split_tokens_for_causal_lm(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                               concatenate_documents: bool = True) -> tf.data.Dataset:
    """`split_documents` to targets - 1 tokens (EOS fills the row): a decoder-only model's
    causal-LM examples, targets only."""
    if sequence_length["targets"] < 3:
        raise ValueError(f"task_feature_lengths['targets'] = {sequence_length['targets']} is "
                         "too short for a causal LM: it needs targets >= 3")
    return split_documents(dataset, sequence_length["targets"] - 1, concatenate_documents)


# --- Prefix-LM --------------------------------------------------------------------------------

def _prefix_lm_room(sequence_length: dict[str, int], num_prefix_tokens: int) -> tuple[int, int]:
    """(prefix, continuation) tokens that fit beside the mode token and the two EOS."""
    inputs_room = sequence_length["inputs"] - 1 - num_prefix_tokens
    targets_room = sequence_length["targets"] - 1
    if inputs_room < 1 or targets_room < 1:
        raise ValueError(f"{_describe_lengths(sequence_length)} are too short for prefix-LM: "
                         f"it needs inputs >= {num_prefix_tokens + 2} and targets >= 2")
    return inputs_room, targets_room


def split_tokens_for_prefix_lm(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                               num_prefix_tokens: int = 0,
                               concatenate_documents: bool = True) -> tf.data.Dataset:
    """`split_documents` to max(prefix room, continuation room) tokens: chunks as long as the
    longer feature, so that `prefix_lm` has a range of split points that both sides fit
    (inputs 512 / targets 114: 511-token chunks split after token 398 to 510)."""
    return split_documents(dataset, max(_prefix_lm_room(sequence_length, num_prefix_tokens)),
                           concatenate_documents)


@seqio.map_over_dataset(num_seeds=1)
def _split_at_random_point(features, seed, inputs_room: int, targets_room: int):
    tokens = features["targets"]
    num_tokens = tf.size(tokens)
    lowest = tf.maximum(1, num_tokens - targets_room)
    highest = tf.minimum(num_tokens - 1, inputs_room)
    split = tf.random.stateless_uniform([], seed, minval=lowest, maxval=highest + 1,
                                        dtype=tf.int32)
    return {"inputs": tokens[:split], "targets": tokens[split:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length: dict[str, int],
              num_prefix_tokens: int = 0) -> tf.data.Dataset:
    """Splits each chunk of >= 2 tokens at a point drawn uniformly among those where the prefix
    (inputs) and the continuation (targets) both fit; prefix + targets is the chunk."""
    inputs_room, targets_room = _prefix_lm_room(sequence_length, num_prefix_tokens)
    return _split_at_random_point(dataset, inputs_room=inputs_room, targets_room=targets_room)


# --- UL2 mode tokens --------------------------------------------------------------------------

def mode_token_id(vocabulary: seqio.Vocabulary, mode_token: str) -> int:
    """The single id of `mode_token`; ValueError if the vocabulary splits it into pieces."""
    ids = list(vocabulary.encode(mode_token))
    if len(ids) != 1 or vocabulary.decode(ids) != mode_token:
        raise ValueError(
            f"mode token {mode_token!r} is {len(ids)} pieces in {type(vocabulary).__name__}, "
            "not one vocabulary entry: use a SentencePiece model that defines it as a "
            "user_defined_symbol (vocab.sentencepiece_vocabulary() does) or set mode_token=None")
    return ids[0]


def prepend_mode_token(dataset: tf.data.Dataset, output_features: dict[str, seqio.Feature],
                       mode_token: str) -> tf.data.Dataset:
    """Puts the id of `mode_token` (such as UL2's "[NLU]") before the inputs."""
    token_id = mode_token_id(output_features["inputs"].vocabulary, mode_token)

    def prepend(features):
        inputs = features["inputs"]
        return {**features, "inputs": tf.concat([[tf.cast(token_id, inputs.dtype)], inputs], 0)}

    return dataset.map(prepend, num_parallel_calls=tf.data.AUTOTUNE)


# --- BART noise -------------------------------------------------------------------------------

def check_bart_args(text_infilling_rate: float, poisson_lambda: float,
                    token_masking_rate: float, token_deletion_rate: float) -> None:
    for name, rate in (("text_infilling_rate", text_infilling_rate),
                       ("token_masking_rate", token_masking_rate),
                       ("token_deletion_rate", token_deletion_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
    if poisson_lambda <= 0:
        raise ValueError(f"poisson_lambda must be > 0, got {poisson_lambda}")


def split_tokens_for_bart(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                          concatenate_documents: bool = True) -> tf.data.Dataset:
    """`split_documents` to chunks that fit both features plus EOS: the targets are the chunk and
    the noised inputs are no longer than it (except for rare zero-length infilling spans)."""
    tokens_length = min(sequence_length["inputs"], sequence_length["targets"]) - 1
    if tokens_length < 2:
        raise ValueError(f"{_describe_lengths(sequence_length)} are too short for BART noise: "
                         "it needs inputs >= 3 and targets >= 3")
    return split_documents(dataset, tokens_length, concatenate_documents)


def sentence_end_ids(vocabulary: seqio.Vocabulary, sentence_end_chars: str) -> np.ndarray:
    """bool [vocab_size]: True for ids whose text ends with one of `sentence_end_chars`."""
    is_end = np.zeros(vocabulary.vocab_size, bool)
    for token_id in range(vocabulary.vocab_size - vocabulary.extra_ids):
        text = vocabulary.decode([token_id])
        is_end[token_id] = bool(text) and text[-1] in sentence_end_chars
    return is_end


def _permute_sentences(tokens: tf.Tensor, is_sentence_end: tf.Tensor, seed) -> tf.Tensor:
    """Shuffles the sentences of `tokens` (each ends at a sentence-end token, the last one at
    the end of the chunk), keeping the tokens inside each sentence in order."""
    ends = tf.gather(is_sentence_end, tokens)
    sentence_of_token = tf.cumsum(tf.cast(ends, tf.int32), exclusive=True)
    num_sentences = tf.reduce_max(sentence_of_token) + 1
    new_rank = tf.argsort(tf.random.stateless_uniform([num_sentences], seed))
    return tf.gather(tokens, tf.argsort(tf.gather(new_rank, sentence_of_token), stable=True))


def _rotate(tokens: tf.Tensor, seed) -> tf.Tensor:
    """Starts the chunk at a uniformly drawn token and wraps around (document rotation)."""
    start = tf.random.stateless_uniform([], seed, maxval=tf.size(tokens), dtype=tf.int32)
    return tf.concat([tokens[start:], tokens[:start]], axis=0)


def _infill_span_lengths(num_noise: tf.Tensor, poisson_lambda: float, seed) -> tf.Tensor:
    """Poisson(lambda) span lengths, int32 [spans], drawn until they cover `num_noise` tokens;
    the last span is cut so they sum to `num_noise` exactly. Zero-length spans stay (BART
    inserts a mask token for them)."""
    draws = tf.random.stateless_poisson([2 * num_noise + 4], seed, poisson_lambda, tf.int32)
    covered_before = tf.cumsum(draws, exclusive=True)
    lengths = tf.minimum(draws, num_noise - covered_before)
    return tf.boolean_mask(lengths, covered_before < num_noise)


def _infill(tokens: tf.Tensor, rate: float, poisson_lambda: float, mask_id: int,
            seeds) -> tf.Tensor:
    """Text infilling: round(rate * n) tokens in Poisson spans, each span replaced by one
    `mask_id`. Spans and kept tokens are interleaved uniformly at random: the kept tokens and
    the spans are laid out as slots, with the spans' slots a uniform draw among all slots."""
    num_tokens = tf.size(tokens)
    num_noise = tf.cast(tf.round(tf.cast(num_tokens, tf.float64) * rate), tf.int32)
    span_lengths = _infill_span_lengths(num_noise, poisson_lambda, seeds[0])
    num_spans = tf.size(span_lengths)
    num_slots = num_tokens - num_noise + num_spans
    _, span_slots = tf.math.top_k(tf.random.stateless_uniform([num_slots], seeds[1]), num_spans)
    slot_is_span = tf.scatter_nd(span_slots[:, None], tf.ones([num_spans], tf.bool),
                                 [num_slots])
    span_index = tf.maximum(tf.cumsum(tf.cast(slot_is_span, tf.int32)) - 1, 0)
    # tf.where gathers for kept slots too: a trailing 0 keeps the index valid with no spans.
    padded_lengths = tf.concat([span_lengths, [0]], axis=0)
    tokens_in_slot = tf.where(slot_is_span, tf.gather(padded_lengths, span_index), 1)
    first_token = tf.minimum(tf.cumsum(tokens_in_slot, exclusive=True), num_tokens - 1)
    return tf.where(slot_is_span, tf.cast(mask_id, tokens.dtype), tf.gather(tokens, first_token))


@seqio.map_over_dataset(num_seeds=6)
def _bart_noise(features, seeds, *, is_sentence_end, mask_id: int, text_infilling_rate: float,
                poisson_lambda: float, token_masking_rate: float, token_deletion_rate: float,
                sentence_permutation: bool, document_rotation: bool):
    original = features["targets"]
    tokens = original
    if sentence_permutation:
        tokens = _permute_sentences(tokens, is_sentence_end, seeds[0])
    if document_rotation:
        tokens = _rotate(tokens, seeds[1])
    if text_infilling_rate > 0:
        tokens = _infill(tokens, text_infilling_rate, poisson_lambda, mask_id, seeds[2:4])
    is_mask = tokens == mask_id
    if token_masking_rate > 0:
        masked = tf.random.stateless_uniform(tf.shape(tokens), seeds[4]) < token_masking_rate
        tokens = tf.where(masked, tf.cast(mask_id, tokens.dtype), tokens)
    if token_deletion_rate > 0:
        deleted = tf.random.stateless_uniform(tf.shape(tokens), seeds[5]) < token_deletion_rate
        tokens = tf.boolean_mask(tokens, tf.logical_or(tf.logical_not(deleted), is_mask))
    return {"inputs": tokens, "targets": original}


def bart_noise(dataset: tf.data.Dataset, output_features: dict[str, seqio.Feature],
               text_infilling_rate: float = 0.3, poisson_lambda: float = 3.0,
               token_masking_rate: float = 0.0, token_deletion_rate: float = 0.0,
               sentence_permutation: bool = True, document_rotation: bool = False,
               sentence_end_chars: str = ".!?\n") -> tf.data.Dataset:
    """BART's noising functions; the targets are the original chunk. Applied in this order:

    sentence permutation (sentences end at tokens whose text ends in `sentence_end_chars`),
    document rotation, text infilling (`text_infilling_rate` of the tokens in spans of
    Poisson(`poisson_lambda`) length, each span one mask token), token masking (each other
    token replaced by the mask with probability `token_masking_rate`) and token deletion (each
    non-mask token dropped with probability `token_deletion_rate`). The mask token is the first
    sentinel, id vocab_size - 1, which every vocabulary with extra ids has.
    """
    check_bart_args(text_infilling_rate, poisson_lambda, token_masking_rate, token_deletion_rate)
    vocabulary = output_features["targets"].vocabulary
    if vocabulary.extra_ids < 1:
        raise ValueError("BART noise needs a vocabulary with extra ids: its mask token is the "
                         "first sentinel")
    is_sentence_end = (sentence_end_ids(vocabulary, sentence_end_chars)
                       if sentence_permutation else np.zeros(1, bool))
    return _bart_noise(dataset, is_sentence_end=tf.constant(is_sentence_end),
                       mask_id=vocabulary.vocab_size - 1, text_infilling_rate=text_infilling_rate,
                       poisson_lambda=poisson_lambda, token_masking_rate=token_masking_rate,
                       token_deletion_rate=token_deletion_rate,
                       sentence_permutation=sentence_permutation,
                       document_rotation=document_rotation)


# --- BERT masked LM ---------------------------------------------------------------------------

def check_mlm_args(noise_density: float, mask_rate: float, random_rate: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    for name, rate in (("mask_rate", mask_rate), ("random_rate", random_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")
    if mask_rate + random_rate > 1.0:
        raise ValueError(f"mask_rate + random_rate must be <= 1 (the rest of the chosen tokens "
                         f"stay unchanged), got {mask_rate} + {random_rate}")


def split_tokens_for_mlm(dataset: tf.data.Dataset, sequence_length: dict[str, int],
                         concatenate_documents: bool = True) -> tf.data.Dataset:
    """`split_documents` to inputs - 1 tokens (EOS fills the row): a masked LM's inputs and
    targets are the same chunk, TASK_FEATURE_LENGTHS['inputs'] tokens each with EOS."""
    if sequence_length["inputs"] < 3:
        raise ValueError(f"task_feature_lengths['inputs'] = {sequence_length['inputs']} is "
                         "too short for a masked LM: it needs inputs >= 3")
    return split_documents(dataset, sequence_length["inputs"] - 1, concatenate_documents)


# The feature of a masked-LM example that marks its chosen positions (int32, 1 where the loss
# is); the masked-LM feature converter (pipeline.py) turns it into encoder_loss_weights.
MLM_WEIGHTS = "mlm_weights"


@seqio.map_over_dataset(num_seeds=3)
def _mask_tokens(features, seeds, *, noise_density: float, mask_rate: float,
                 random_rate: float, mask_id: int, replacement_ids: tf.Tensor):
    tokens = features["targets"]
    num_tokens = tf.size(tokens)
    num_chosen = tf.cast(tf.round(tf.cast(num_tokens, tf.float64) * noise_density), tf.int32)
    num_chosen = tf.clip_by_value(num_chosen, 1, num_tokens)
    _, chosen_at = tf.math.top_k(tf.random.stateless_uniform([num_tokens], seeds[0]),
                                 num_chosen)
    chosen = tf.scatter_nd(chosen_at[:, None], tf.ones([num_chosen], tf.bool), [num_tokens])
    action = tf.random.stateless_uniform([num_tokens], seeds[1])
    random_ids = tf.gather(replacement_ids, tf.random.stateless_uniform(
        [num_tokens], seeds[2], maxval=tf.size(replacement_ids), dtype=tf.int32))
    inputs = tf.where(chosen & (action < mask_rate), tf.cast(mask_id, tokens.dtype),
                      tf.where(chosen & (action >= mask_rate) & (action < mask_rate + random_rate),
                               random_ids, tokens))
    return {"inputs": inputs, "targets": tokens, MLM_WEIGHTS: tf.cast(chosen, tf.int32)}


def bert_mlm(dataset: tf.data.Dataset, output_features: dict[str, seqio.Feature],
             noise_density: float = 0.15, mask_rate: float = 0.8,
             random_rate: float = 0.1) -> tf.data.Dataset:
    """BERT's masked LM (Devlin et al. 2019, section 3.1): round(noise_density * n) of each
    chunk's n tokens are chosen (at least one) uniformly at random; each chosen token becomes
    the mask token with probability mask_rate, a uniformly drawn real token (ids 3 to
    vocab_size - extra_ids - 1: no pad, EOS, unk or sentinel, and no UL2 mode token) with
    probability random_rate,
    and stays itself otherwise. Inputs are the noised chunk, targets the chunk, and
    MLM_WEIGHTS marks the chosen positions: the loss is on them only, kept ones included.

    T5's vocabulary has no [MASK]: the mask token is the first sentinel, id vocab_size - 1
    (<extra_id_0>), as in BART noise here and in T5-style masked LMs."""
    check_mlm_args(noise_density, mask_rate, random_rate)
    vocabulary = output_features["targets"].vocabulary
    if vocabulary.extra_ids < 1:
        raise ValueError("a masked LM needs a vocabulary with extra ids: its mask token is the "
                         "first sentinel")
    return _mask_tokens(dataset, noise_density=noise_density, mask_rate=mask_rate,
                        random_rate=random_rate, mask_id=vocabulary.vocab_size - 1,
                        replacement_ids=tf.constant(replacement_ids(vocabulary), tf.int32))


def replacement_ids(vocabulary: seqio.Vocabulary) -> list[int]:
    """The ids a masked LM's random replacement draws from: the real tokens (after pad, EOS
    and unk, before the sentinels), less the UL2 mode tokens where the vocabulary holds them
    as pieces of their own (vocab.MODE_TOKENS)."""
    mode_ids = {ids[0] for ids in map(vocabulary.encode, vocab_lib.MODE_TOKENS)
                if len(ids) == 1}
    return [i for i in range(3, vocabulary.vocab_size - vocabulary.extra_ids)
            if i not in mode_ids]


# --- Classification ---------------------------------------------------------------------------

def label_as_target(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """{"inputs": string, "label": int} -> {"inputs", "targets": [label]}: the label as a
    one-id target of the task's vocab.ClassLabels."""
    return dataset.map(lambda example: {"inputs": example["inputs"], "targets": tf.reshape(
        tf.cast(example["label"], tf.int32), [1])}, num_parallel_calls=tf.data.AUTOTUNE)


def class_label(value, example=None, is_target: bool = False) -> int:
    """seqio postprocess_fn of a classification task: a target ([label]) or a prediction
    (the class picked, [class]) becomes the int class."""
    return int(np.asarray(value).reshape(-1)[0])
