"""Decoding: the key/value cache against recomputing the whole prefix, sampling limits against
greedy, top-k / top-p on a hand-made distribution, exhaustive beam search against brute-force
enumeration with T5X's length penalty, and bad options as one-line errors."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import decoding
from t5x_lite import models
from t5x_lite import moe

VOCAB, EOS = 8, 1
CONFIG = models.T5Config(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=8, d_ff=64,
                         num_encoder_layers=2, num_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def model_and_params():
    model = models.EncoderDecoderModel(CONFIG)
    # Scaled-up weights give peaked, varied next-token distributions.
    params = jax.tree_util.tree_map(lambda x: 3 * x, model.init(jax.random.key(0)))
    return model, params


def encoder_inputs(batch_size: int = 3, length: int = 7) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (batch_size, length)).astype(np.int32)
    tokens[0, 5:] = 0  # Padding.
    return {"encoder_input_tokens": jnp.asarray(tokens)}


def teacher_forced_log_probs(model, params, inputs, targets_BT) -> np.ndarray:
    """log p(target_t | targets_<t) [B, T] from one full (uncached) decoder pass."""
    batch = {**inputs, "decoder_input_tokens": jnp.pad(targets_BT, ((0, 0), (1, 0)))[:, :-1],
             "decoder_segment_ids": jnp.ones_like(targets_BT)}
    log_probs = jax.nn.log_softmax(model.logits(params, batch))
    return np.take_along_axis(np.asarray(log_probs), np.asarray(targets_BT)[..., None],
                              axis=-1)[..., 0]


@pytest.mark.parametrize("moe_config", [None, moe.MoeConfig(num_experts=4)])
def test_cached_logits_equal_recomputing_the_prefix(model_and_params, moe_config):
    model, params = model_and_params
    if moe_config is not None:
        model = models.EncoderDecoderModel(models.T5Config(
            **{**{f: getattr(CONFIG, f) for f in CONFIG.__dataclass_fields__},
               "moe": moe_config}))
        params = model.init(jax.random.key(1))
    inputs, length = encoder_inputs(), 6
    targets = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (3, length)), jnp.int32)
    step_fn, cache = model.cached_decoder(params, inputs, length)
    step = jax.jit(step_fn)
    previous = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    cached = []
    for position in range(length):
        logits, cache = step(previous[:, position:position + 1], jnp.asarray(position), cache)
        cached.append(np.asarray(logits))
    full = model.logits(params, {**inputs, "decoder_input_tokens": previous,
                                 "decoder_segment_ids": jnp.ones_like(previous)})
    np.testing.assert_allclose(np.stack(cached, axis=1), np.asarray(full), rtol=1e-5,
                               atol=1e-5)


def test_greedy_tokens_and_scores_equal_the_uncached_model(model_and_params):
    model, params = model_and_params
    inputs = encoder_inputs()
    tokens, scores = jax.jit(lambda p: model.predict_batch(p, inputs, max_decode_length=6,
                                                           eos_id=EOS))(params)
    tokens = np.asarray(tokens)
    log_probs = teacher_forced_log_probs(model, params, inputs, jnp.asarray(tokens))
    emitted = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0  # Up to first EOS.
    np.testing.assert_allclose(scores, (log_probs * emitted).sum(1), rtol=1e-5)
    # Each emitted token is the argmax of the uncached model given the emitted prefix.
    batch = {**inputs, "decoder_input_tokens": jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]}
    argmax = np.asarray(jnp.argmax(model.logits(params, batch), axis=-1))
    assert (argmax[emitted] == tokens[emitted]).all()
    assert (tokens[~emitted] == 0).all()


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(top_k=1, temperature=2.0),
                                     dict(top_p=1e-6, temperature=5.0)])
def test_sampling_limits_equal_greedy(model_and_params, options):
    model, params = model_and_params
    inputs = encoder_inputs()
    greedy = model.predict_batch(params, inputs, max_decode_length=6, eos_id=EOS)
    sampled = model.predict_batch(params, inputs, max_decode_length=6, eos_id=EOS,
                                  method="sample", seed=3, **options)
    np.testing.assert_array_equal(sampled[0], greedy[0])
    np.testing.assert_allclose(sampled[1], greedy[1], rtol=1e-6)


def test_sampling_draws_follow_the_model_and_the_seed(model_and_params):
    model, params = model_and_params
    rows = 2000
    inputs = {key: jnp.repeat(value[1:2], rows, axis=0) for key, value in
              encoder_inputs().items()}
    sample = jax.jit(lambda p, seed: model.predict_batch(
        p, inputs, max_decode_length=2, eos_id=EOS, method="sample", seed=seed)[0])
    draws = np.asarray(sample(params, 0))
    log_probs = jax.nn.log_softmax(model.logits(params, {
        **inputs, "decoder_input_tokens": jnp.zeros((rows, 1), jnp.int32)})[0, 0])
    expected = np.exp(np.asarray(log_probs))
    observed = np.bincount(draws[:, 0], minlength=VOCAB) / rows
    # The first tokens of 2,000 rows are within 4 binomial standard deviations of the model's
    # first-token distribution.
    assert np.all(np.abs(observed - expected)
                  <= 4 * np.sqrt(expected * (1 - expected) / rows) + 1e-9)
    assert (np.asarray(sample(params, 1)) != draws).any()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    def kept(**options):
        filtered = decoding.filter_logits(logits, options.get("top_k", 0),
                                          options.get("top_p", 1.0))
        return sorted(np.flatnonzero(np.asarray(filtered[0]) > decoding.NEVER / 2).tolist())
    assert kept(top_p=0.5) == [1]  # 0.5 reaches 0.5 on its own.
    assert kept(top_p=0.8) == [1, 3]  # 0.5 + 0.3 reaches 0.8.
    assert kept(top_p=0.81) == [1, 2, 3]
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=3, top_p=0.6) == [1, 3]


def brute_force_best(model, params, inputs, length: int, alpha: float):
    """The highest length-penalised log-probability over every sequence that ends in EOS
    within `length` tokens, by enumeration."""
    others = [token for token in range(VOCAB) if token != EOS]
    sequences = [list(prefix) + [EOS] + [0] * (length - len(prefix) - 1)
                 for k in range(length) for prefix in itertools.product(others, repeat=k)]
    targets = jnp.asarray(sequences, jnp.int32)
    repeated = {key: jnp.repeat(value, len(sequences), axis=0) for key, value in inputs.items()}
    log_probs = teacher_forced_log_probs(model, params, repeated, targets)
    lengths = np.asarray([seq.index(EOS) + 1 for seq in sequences])
    totals = np.asarray([log_probs[i, :n].sum() for i, n in enumerate(lengths)])
    penalised = totals / ((5 + lengths) / 6) ** alpha
    best = int(np.argmax(penalised))
    return sequences[best], penalised[best]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_exhaustive_beam_search_finds_the_brute_force_best(model_and_params, alpha):
    model, params = model_and_params
    length = 3
    for row in (0, 2) if alpha == 0.6 else (1,):
        inputs = {key: value[row:row + 1] for key, value in encoder_inputs().items()}
        # 7 x 7 = 49 unfinished prefixes of length 2 fit in 64 beams: the search is exact.
        tokens, score = model.predict_batch(params, inputs, max_decode_length=length,
                                            eos_id=EOS, method="beam", beam_size=64,
                                            alpha=alpha)
        expected_tokens, expected_score = brute_force_best(model, params, inputs, length, alpha)
        assert np.asarray(tokens[0]).tolist() == expected_tokens
        np.testing.assert_allclose(float(score[0]), expected_score, rtol=1e-5, atol=1e-5)


def test_one_beam_without_length_penalty_is_greedy(model_and_params):
    model, params = model_and_params
    inputs = encoder_inputs()
    greedy = model.predict_batch(params, inputs, max_decode_length=6, eos_id=EOS)
    beam = model.predict_batch(params, inputs, max_decode_length=6, eos_id=EOS,
                               method="beam", beam_size=1, alpha=0.0)
    finished = np.asarray((greedy[0] == EOS).any(axis=1))
    np.testing.assert_array_equal(np.asarray(beam[0])[finished], np.asarray(greedy[0])[finished])


@pytest.mark.parametrize("method, options, message", [
    ("nucleus", {}, r"the decoding method \(DECODE_METHOD\) must be one of 'greedy', 'beam', "
     "'sample', got 'nucleus'"),
    ("beam", dict(beam_size=0), "beam_size must be >= 1, got 0"),
    ("sample", dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    ("sample", dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ("sample", dict(temprature=0.5), "unknown decoding option in \\['temprature'\\]"),
])
def test_bad_decoding_options_are_one_line(model_and_params, method, options, message):
    model, params = model_and_params
    with pytest.raises(ValueError, match=message):
        model.predict_batch(params, encoder_inputs(), max_decode_length=2, method=method,
                            **options)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_scanned_layers_decode_like_the_loop(model_and_params, method):
    """A scan_layers model (caches stacked on a leading layers axis) with the same weights
    decodes the same tokens, beam search included."""
    model, params = model_and_params
    stacked = dict(params)
    for stack in ("encoder", "decoder"):
        layers = [stacked.pop(f"{stack}_layer_{i}") for i in range(2)]
        stacked[f"{stack}_layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    scanned = models.EncoderDecoderModel(dataclasses.replace(CONFIG, scan_layers=True))
    options = {"beam_size": 3, "alpha": 0.6} if method == "beam" else {}
    expected, expected_scores = model.predict_batch(params, encoder_inputs(), 6, method,
                                                    eos_id=EOS, **options)
    tokens, scores = scanned.predict_batch(stacked, encoder_inputs(), 6, method,
                                           eos_id=EOS, **options)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(expected_scores), rtol=1e-5)
