"""Whole-model properties: packing isolation, causality, packed == alone, loss and decoding
against references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import models
from t5x_lite import ops

CONFIG = models.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=48,
                         num_encoder_layers=2, num_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def model_and_params():
    model = models.EncoderDecoderModel(CONFIG)
    return model, model.init(jax.random.key(0))


def packed_batch():
    """Two examples packed into one row of each stack, then padding."""
    enc_tokens = np.array([[5, 6, 7, 1, 9, 10, 11, 12, 1, 0]], np.int32)
    enc_segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]], np.int32)
    targets = np.array([[20, 21, 1, 30, 31, 32, 1, 0]], np.int32)
    dec_segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    dec_inputs = np.array([[0, 20, 21, 0, 30, 31, 32, 0]], np.int32)
    return {"encoder_input_tokens": enc_tokens, "encoder_segment_ids": enc_segments,
            "decoder_input_tokens": dec_inputs, "decoder_target_tokens": targets,
            "decoder_segment_ids": dec_segments,
            "decoder_loss_weights": (targets > 0).astype(np.int32)}


def logits(model, params, batch):
    return np.asarray(model.logits(params, {k: jnp.asarray(v) for k, v in batch.items()}))


def test_perturbing_one_segment_leaves_the_other_unchanged(model_and_params):
    model, params = model_and_params
    batch = packed_batch()
    base = logits(model, params, batch)
    changed = dict(batch)
    changed["encoder_input_tokens"] = batch["encoder_input_tokens"].copy()
    changed["encoder_input_tokens"][0, 4:8] = [40, 41, 42, 43]   # segment 2's inputs
    changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
    changed["decoder_input_tokens"][0, 4:7] = [50, 51, 52]       # segment 2's decoder inputs
    after = logits(model, params, changed)
    np.testing.assert_allclose(after[0, :3], base[0, :3], rtol=1e-6, atol=1e-6)
    assert np.abs(after[0, 3:7] - base[0, 3:7]).max() > 1e-3


def test_packed_example_equals_the_example_alone(model_and_params):
    model, params = model_and_params
    batch = packed_batch()
    packed = logits(model, params, batch)
    alone = {"encoder_input_tokens": np.array([[9, 10, 11, 12, 1]], np.int32),
             "decoder_input_tokens": np.array([[0, 30, 31, 32]], np.int32),
             "decoder_target_tokens": np.array([[30, 31, 32, 1]], np.int32)}
    np.testing.assert_allclose(logits(model, params, alone)[0], packed[0, 3:7],
                               rtol=1e-5, atol=1e-5)


def test_decoder_is_causal(model_and_params):
    model, params = model_and_params
    batch = packed_batch()
    base = logits(model, params, batch)
    for position in (1, 5):
        changed = dict(batch)
        changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
        changed["decoder_input_tokens"][0, position] = 60
        after = logits(model, params, changed)
        np.testing.assert_allclose(after[0, :position], base[0, :position], rtol=1e-6,
                                   atol=1e-6)
        assert np.abs(after[0, position] - base[0, position]).max() > 1e-3


def test_loss_matches_numpy_float64(model_and_params):
    model, params = model_and_params
    batch = packed_batch()
    z_logits = logits(model, params, batch).astype(np.float64)[0]
    targets, weights = batch["decoder_target_tokens"][0], batch["decoder_loss_weights"][0]
    log_z = np.log(np.exp(z_logits).sum(-1))
    token_loss = log_z - z_logits[np.arange(len(targets)), targets] + CONFIG.z_loss * log_z ** 2
    want = (token_loss * weights).sum() / weights.sum()
    loss, sums = model.loss(params, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    correct = (z_logits.argmax(-1) == targets) * weights
    assert float(sums["correct"]) == correct.sum() and float(sums["weight"]) == weights.sum()


@pytest.mark.parametrize("cross_entropy", [ops.softmax_cross_entropy,
                                           ops.softmax_cross_entropy_autodiff])
def test_cross_entropy_gradient_matches_numpy_float64(cross_entropy):
    """The hand-written backward pass (CPU) and autodiff's (accelerators): d(sum of weighted
    cross-entropy and z-loss)/d logits = weight * (softmax * (1 + 2 z log Z) - onehot(target)),
    in float64; "correct" as argmax == target."""
    logits_BTV = jax.random.normal(jax.random.key(3), (2, 4, 11), jnp.float32) * 3
    targets_BT = jnp.asarray([[0, 3, 10, 5], [7, 7, 1, 2]])
    weights_BT = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]])
    z_loss = 1e-2
    sums = jax.jit(lambda logits: models.cross_entropy_sums(
        logits, targets_BT, weights_BT, z_loss, cross_entropy))
    gradient = jax.grad(lambda logits: sums(logits)["loss"])(logits_BTV)
    x = np.asarray(logits_BTV, np.float64)
    log_z = np.log(np.exp(x).sum(-1, keepdims=True))
    one_hot = np.eye(11)[np.asarray(targets_BT)]
    want = (np.exp(x - log_z) * (1 + 2 * z_loss * log_z) - one_hot) * np.asarray(
        weights_BT)[..., None]
    np.testing.assert_allclose(np.asarray(gradient), want, rtol=1e-5, atol=1e-6)
    correct = (x.argmax(-1) == np.asarray(targets_BT)) * np.asarray(weights_BT)
    assert float(sums(logits_BTV)["correct"]) == correct.sum()


def test_greedy_decode_emits_the_argmax_of_its_own_prefix(model_and_params):
    model, params = model_and_params
    inputs = {"encoder_input_tokens": jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])}
    tokens, scores = model.predict_batch(params, inputs, max_decode_length=6, eos_id=1)
    tokens = np.asarray(tokens)
    teacher = {**inputs, "decoder_input_tokens": jnp.pad(jnp.asarray(tokens), ((0, 0), (1, 0)))[:, :-1]}
    step_logits = logits(model, params, teacher).astype(np.float64)
    log_probs = step_logits - np.log(np.exp(step_logits).sum(-1, keepdims=True))
    for row in range(2):
        for t in range(6):
            if t and tokens[row, t - 1] in (0, 1) and (tokens[row, :t] == 1).any():
                assert tokens[row, t] == 0  # Nothing after EOS.
            else:
                assert tokens[row, t] == log_probs[row, t].argmax()
        ended = np.flatnonzero(tokens[row] == 1)
        length = ended[0] + 1 if len(ended) else 6
        want = log_probs[row, np.arange(length), tokens[row, :length]].sum()
        np.testing.assert_allclose(float(scores[row]), want, rtol=1e-4)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dropout_rate"):
        models.T5Config(dropout_rate=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        models.T5Config(num_heads=0)
    with pytest.raises(ValueError, match="attention must be one of"):
        models.T5Config(attention="flash")
    with pytest.raises(ValueError, match="kernel_platform must be one of"):
        models.T5Config(kernel_platform="metal")
    with pytest.raises(ValueError, match="no dropout on the attention weights"):
        models.T5Config(attention="xla", dropout_rate=0.1)


def test_dot_product_attention_gives_the_einsum_loss_and_gradients(model_and_params):
    """jax.nn.dot_product_attention (its XLA implementation here; cuDNN on GPUs) with the
    relative bias and packing mask as one bias equals the spelt-out attention, gradients
    of the relative-bias tables included."""
    import dataclasses

    reference, params = model_and_params
    fused = models.EncoderDecoderModel(dataclasses.replace(CONFIG, attention="xla"))
    batch = {key: jnp.asarray(value) for key, value in packed_batch().items()}
    loss_and_grad = {model: jax.jit(jax.value_and_grad(lambda p, m=model: m.loss(p, batch)[0]))
                     for model in (reference, fused)}
    (loss_einsum, expected), (loss_fused, actual) = (loss_and_grad[model](params)
                                                     for model in (reference, fused))
    np.testing.assert_allclose(loss_fused, loss_einsum, rtol=1e-6)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree_util.tree_leaves(actual)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    assert np.abs(actual["encoder_relative_bias"]["rel_embedding"]).max() > 0
