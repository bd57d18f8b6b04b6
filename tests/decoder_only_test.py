"""The decoder-only model: its logits against a float64 NumPy forward pass, the causal and
prefix-LM masks by perturbation, scan == loop, bf16 against fp32, cached decoding against
recomputing the prefix, beam search against enumeration, score_batch against teacher-forced
log-probabilities (both families), and the presets' parameter counts."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models
from t5x_lite import moe
from tests.layers_test import bucket_closed_form, rms64, self_attention_layers64

VOCAB, EOS = 8, 1
CONFIG = models.T5Config(architecture="decoder_only", vocab_size=VOCAB, d_model=32,
                         num_heads=2, head_dim=8, d_ff=64, num_encoder_layers=0,
                         num_decoder_layers=2, relative_attention_num_buckets=8,
                         relative_attention_max_distance=16, tie_embeddings=True)
MODEL = models.DecoderOnlyModel(CONFIG)


@pytest.fixture(scope="module")
def params():
    # Scaled-up weights give peaked, varied next-token distributions.
    return jax.tree_util.tree_map(lambda x: 3 * x, MODEL.init(jax.random.key(0)))


def prefix_lm_batch() -> dict:
    """Two rows: two packed examples (inputs 3 + targets 3, inputs 2 + targets 2) then
    padding, and one example (inputs 4 + targets 5)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 9 + [0] * 3], np.int32)
    prefix = np.array([[1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    tokens[segments == 0] = 0
    return {"decoder_input_tokens": tokens, "decoder_segment_ids": segments,
            "decoder_causal_attention": prefix}


def numpy_logits(params, batch) -> np.ndarray:
    """The decoder-only forward pass in float64: RMSNorm, T5 attention (no 1/sqrt(K)) with a
    unidirectional relative position bias and the prefix-LM mask, gated-GELU MLP, tied
    logits scaled by d_model ** -0.5."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    tokens, segments = batch["decoder_input_tokens"], batch["decoder_segment_ids"]
    prefix = batch["decoder_causal_attention"] > 0
    length = tokens.shape[1]

    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    buckets = np.vectorize(bucket_closed_form)(key - query, False, 8, 16)
    position_bias = p["decoder_relative_bias"]["rel_embedding"][buckets].transpose(2, 0, 1)
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    visible = same & ((key <= query)[None] | (prefix[:, :, None] & prefix[:, None, :]))
    bias = position_bias[None] + np.where(visible, 0.0, -1e10)[:, None]
    x = self_attention_layers64(p, p["token_embedder"]["embedding"][tokens], bias,
                                [f"decoder_layer_{i}" for i in range(CONFIG.num_decoder_layers)])
    y = rms64(x, p["decoder_norm"]["scale"]) * CONFIG.d_model ** -0.5
    return y @ p["token_embedder"]["embedding"].T


def logits(params, batch, model=MODEL) -> np.ndarray:
    return np.asarray(model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def test_logits_match_numpy_float64(params):
    batch = prefix_lm_batch()
    real = batch["decoder_segment_ids"] > 0
    np.testing.assert_allclose(logits(params, batch)[real], numpy_logits(params, batch)[real],
                               rtol=1e-4, atol=1e-4)


def perturbed(batch: dict, row: int, position: int) -> dict:
    changed = {key: value.copy() for key, value in batch.items()}
    token = changed["decoder_input_tokens"][row, position]
    changed["decoder_input_tokens"][row, position] = 2 + (token - 1) % (VOCAB - 2)
    return changed


def changed_positions(params, batch, row: int, position: int) -> list[int]:
    """The real (non-padding) positions of `row` whose logits change with its token at
    `position`; a padding position attends to nothing, so its logits mean nothing."""
    before, after = logits(params, batch)[row], logits(params, perturbed(batch, row, position))[row]
    real = np.flatnonzero(batch["decoder_segment_ids"][row])
    return [int(t) for t in real if not np.allclose(before[t], after[t], atol=1e-6)]


def test_causal_lm_never_looks_ahead_nor_across_packed_segments(params):
    batch = prefix_lm_batch()
    batch["decoder_causal_attention"][:] = 0
    # Row 0: segment 1 is positions 0-5, segment 2 positions 6-9.
    assert changed_positions(params, batch, 0, 3) == [3, 4, 5]
    assert changed_positions(params, batch, 0, 7) == [7, 8, 9]
    assert changed_positions(params, batch, 1, 0) == list(range(9))


def test_prefix_lm_inputs_attend_bidirectionally_and_targets_causally(params):
    batch = prefix_lm_batch()
    # Row 1: inputs at 0-3, targets at 4-8. A later input changes every earlier input.
    assert changed_positions(params, batch, 1, 3) == list(range(9))
    # A target changes itself and later targets only: no input, no earlier target.
    assert changed_positions(params, batch, 1, 6) == [6, 7, 8]
    # Row 0's second example (inputs 6-7) sees nothing of the first.
    assert changed_positions(params, batch, 0, 7) == [6, 7, 8, 9]


def stacked_layers(params):
    """The loop's parameters with the layers stacked on a leading axis, as scan_layers has
    them."""
    stacked = dict(params)
    layer_params = [stacked.pop(f"decoder_layer_{i}") for i in range(2)]
    stacked["decoder_layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layer_params)
    return stacked


SCANNED = models.DecoderOnlyModel(dataclasses.replace(CONFIG, scan_layers=True))


def test_scanned_layers_equal_the_loop(params):
    batch = prefix_lm_batch()
    np.testing.assert_allclose(logits(stacked_layers(params), batch, SCANNED),
                               logits(params, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_scanned_layers_decode_like_the_loop(params, method):
    """Caches stacked on a leading layers axis (beam search reorders them on axis 1) give
    the loop's tokens and scores."""
    options = {"beam_size": 3, "alpha": 0.6} if method == "beam" else {}
    want = MODEL.predict_batch(params, inputs_batch(), 5, method, eos_id=EOS, **options)
    got = SCANNED.predict_batch(stacked_layers(params), inputs_batch(), 5, method, eos_id=EOS,
                                **options)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5)


def test_bfloat16_activations_track_float32():
    params = MODEL.init(jax.random.key(0))
    bf16 = models.DecoderOnlyModel(dataclasses.replace(CONFIG, activation_dtype=jnp.bfloat16))
    batch = prefix_lm_batch()
    real = batch["decoder_segment_ids"] > 0
    want, got = logits(params, batch)[real], logits(params, batch, bf16)[real]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def inputs_batch() -> dict:
    """Prompts of different lengths: EOS-terminated inputs, zero-padded."""
    return {MODEL.inputs_key: jnp.asarray([[5, 6, 7, EOS, 0, 0], [2, 3, 4, 5, 6, EOS]],
                                          jnp.int32)}


def teacher_forced_log_probs(params, inputs_row: list[int], targets_NT: np.ndarray
                             ) -> np.ndarray:
    """log p(target_t | prompt, targets_<t) [N, T] from one uncached pass over each row
    laid out as the prefix-LM converter lays out training rows."""
    prompt = [0] + inputs_row
    rows = np.asarray([prompt + list(targets[:-1]) for targets in targets_NT], np.int32)
    batch = {"decoder_input_tokens": rows, "decoder_segment_ids": np.ones_like(rows),
             "decoder_causal_attention": (np.arange(rows.shape[1]) < len(prompt))[None]
             .repeat(len(rows), 0).astype(np.int32)}
    log_probs = np.asarray(jax.nn.log_softmax(logits(params, batch)))[:, len(prompt) - 1:]
    return np.take_along_axis(log_probs, targets_NT[..., None], axis=-1)[..., 0]


def test_cached_greedy_decoding_equals_recomputing_the_prefix(params):
    tokens, scores = MODEL.predict_batch(params, inputs_batch(), max_decode_length=5,
                                         eos_id=EOS)
    for row, inputs in enumerate(np.asarray(inputs_batch()[MODEL.inputs_key])):
        prompt, generated = [int(t) for t in inputs if t], []
        for _ in range(5):
            log_probs = np.asarray(jax.nn.log_softmax(logits(params, {
                "decoder_input_tokens": np.asarray([[0] + prompt + generated], np.int32),
                "decoder_segment_ids": np.ones((1, len(prompt) + len(generated) + 1),
                                               np.int32),
                "decoder_causal_attention": np.asarray(
                    [[1] * (len(prompt) + 1) + [0] * len(generated)], np.int32)})))
            generated.append(int(np.argmax(log_probs[0, -1])))
            if generated[-1] == EOS:
                break
        assert np.asarray(tokens[row, :len(generated)]).tolist() == generated
        want = teacher_forced_log_probs(params, prompt, np.asarray([generated])).sum()
        np.testing.assert_allclose(float(scores[row]), want, rtol=1e-5)


def test_exhaustive_beam_search_finds_the_brute_force_best(params):
    length, alpha = 3, 0.6
    others = [token for token in range(VOCAB) if token != EOS]
    sequences = [list(prefix) + [EOS] + [0] * (length - len(prefix) - 1)
                 for k in range(length) for prefix in itertools.product(others, repeat=k)]
    for row in (0, 1):
        prompt = [int(t) for t in np.asarray(inputs_batch()[MODEL.inputs_key][row]) if t]
        log_probs = teacher_forced_log_probs(params, prompt, np.asarray(sequences))
        lengths = np.asarray([seq.index(EOS) + 1 for seq in sequences])
        totals = np.asarray([log_probs[i, :n].sum() for i, n in enumerate(lengths)])
        penalised = totals / ((5 + lengths) / 6) ** alpha
        best = int(np.argmax(penalised))
        # 7 x 7 = 49 unfinished prefixes of length 2 fit in 64 beams: the search is exact.
        tokens, score = MODEL.predict_batch(
            params, {MODEL.inputs_key: inputs_batch()[MODEL.inputs_key][row:row + 1]},
            max_decode_length=length, eos_id=EOS, method="beam", beam_size=64, alpha=alpha)
        assert np.asarray(tokens[0]).tolist() == sequences[best]
        np.testing.assert_allclose(float(score[0]), penalised[best], rtol=1e-5, atol=1e-5)


def test_score_batch_matches_float64_numpy_on_packed_prefix_lm_rows(params):
    batch = prefix_lm_batch()
    rng = np.random.default_rng(5)
    batch["decoder_target_tokens"] = rng.integers(1, VOCAB, (2, 12)).astype(np.int32)
    real = batch["decoder_segment_ids"] > 0
    batch["decoder_loss_weights"] = (real & (batch["decoder_causal_attention"] == 0)
                                     ).astype(np.int32)
    logits64 = numpy_logits(params, batch)
    log_probs = logits64 - np.log(np.exp(logits64 - logits64.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits64.max(-1, keepdims=True)
    picked = np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    want = (picked * batch["decoder_loss_weights"]).sum(axis=1)
    got = MODEL.score_batch(params, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["decoder_only", "encoder_decoder"])
def test_score_batch_of_a_decoded_sequence_is_its_decoding_score(architecture):
    """Teacher forcing the greedy output, each family's score_batch gives the summed
    log-probability that cached decoding reported for it."""
    config = dataclasses.replace(CONFIG, architecture=architecture,
                                 num_encoder_layers=2 * (architecture == "encoder_decoder"),
                                 tie_embeddings=False)
    model = models.model_for(config)
    params = jax.tree_util.tree_map(lambda x: 3 * x, model.init(jax.random.key(2)))
    inputs = np.asarray(inputs_batch()[MODEL.inputs_key])
    tokens, scores = model.predict_batch(params, {model.inputs_key: jnp.asarray(inputs)}, 5,
                                         eos_id=EOS)
    for row, (prompt, decoded) in enumerate(zip(inputs, np.asarray(tokens))):
        prompt, decoded = prompt[prompt > 0], decoded[:np.argmax(decoded == EOS) + 1
                                                      if EOS in decoded else len(decoded)]
        if architecture == "encoder_decoder":
            batch = {"encoder_input_tokens": prompt[None],
                     "decoder_target_tokens": decoded[None],
                     "decoder_input_tokens": np.pad(decoded, (1, 0))[None, :-1],
                     "decoder_loss_weights": np.ones((1, len(decoded)), np.int32)}
        else:
            targets = np.concatenate([prompt, decoded])[None]
            batch = {"decoder_target_tokens": targets,
                     "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
                     "decoder_loss_weights": (np.arange(targets.shape[1]) >= len(prompt)
                                              ).astype(np.int32)[None],
                     "decoder_causal_attention": (np.arange(targets.shape[1]) <= len(prompt)
                                                  ).astype(np.int32)[None]}
        # Greedy may emit token 0, which segment ids derived from the tokens would mask.
        batch["decoder_segment_ids"] = np.ones_like(batch["decoder_target_tokens"])
        got = model.score_batch(params, {k: jnp.asarray(v) for k, v in batch.items()})
        np.testing.assert_allclose(float(got[0]), float(scores[row]), rtol=1e-5)


def test_presets_have_t5x_parameter_counts():
    """T5X's decoder-only base and xxl: one embedding V x D (logits through it), per layer
    4 D A attention + 3 D F gated MLP + 2 D norms, a final norm and one relative bias 32 x H."""
    import gin

    counts = {}
    for preset, (d, heads, d_ff, num_layers) in {"base": (768, 12, 2048, 12),
                                                 "xxl": (4096, 64, 10240, 24)}.items():
        gin.clear_config()
        gin.parse_config_file(f"gin/models/decoder_only_{preset}.gin")
        config = gin.get_configurable(models.T5Config)()
        gin.clear_config()
        shapes = jax.eval_shape(models.model_for(config).init, jax.random.key(0))
        closed_form = (32128 * d + num_layers * (4 * d * heads * 64 + 3 * d * d_ff + 2 * d)
                       + d + 32 * heads)
        assert models.count_parameters(shapes) == closed_form
        counts[preset] = closed_form
    assert counts == {"base": 109_628_544, "xxl": 4_762_310_656}


def test_architecture_bindings_that_do_not_fit_are_one_line_errors():
    with pytest.raises(ValueError, match="decoder_only model has no encoder: bind "
                                         "num_encoder_layers = 0"):
        models.T5Config(architecture="decoder_only", num_encoder_layers=8)
    with pytest.raises(ValueError, match="bind architecture = 'decoder_only'"):
        models.T5Config(num_encoder_layers=0)
    with pytest.raises(ValueError, match="T5Config.architecture must be one of"):
        models.T5Config(architecture="bert")


def test_a_sparse_decoder_only_model_stays_causal_when_experts_drop_tokens():
    """MoE layers route a decoder's tokens in position order: with capacity for a few tokens
    per expert, a later token still never changes an earlier position's logits (nor does it
    displace one), and the loss carries the routing losses."""
    sparse = models.DecoderOnlyModel(dataclasses.replace(CONFIG, moe=moe.MoeConfig(
        num_experts=2, capacity_factor_eval=0.25, min_expert_capacity=1, sparse_every=1,
        batch_prioritized_routing=True)))
    params = sparse.init(jax.random.key(4))
    batch = prefix_lm_batch()
    batch["decoder_causal_attention"][:] = 0
    before = logits(params, batch, sparse)[1]
    after = logits(params, perturbed(batch, 1, 5), sparse)[1]
    np.testing.assert_array_equal(after[:5], before[:5])
    assert not np.allclose(after[5], before[5])
    rows = {key: jnp.asarray(value) for key, value in batch.items()}
    rows["decoder_target_tokens"] = rows["decoder_input_tokens"]
    rows["decoder_loss_weights"] = rows["decoder_segment_ids"]
    sums = sparse.loss_sums(params, rows)
    assert {"moe_load_balancing_loss", "moe_router_z_loss"} <= set(sums)
    assert float(sums["moe_load_balancing_loss"]) > 0
