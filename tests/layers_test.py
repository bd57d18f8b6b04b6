"""Layers against float64 NumPy references and closed forms."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers


def bucket_closed_form(relative_position: int, bidirectional: bool, num_buckets: int,
                       max_distance: int) -> int:
    """T5's bucketing written out per scalar, in float64."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        if relative_position > 0:
            offset = num_buckets
        distance = abs(relative_position)
    else:
        distance = max(-relative_position, 0)
    exact = num_buckets // 2
    if distance < exact:
        return offset + distance
    scaled = exact + int(math.log(distance / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact))
    return offset + min(scaled, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64)])
def test_relative_position_bucket_matches_closed_form(bidirectional, num_buckets, max_distance):
    relative = np.arange(-400, 401)
    got = np.asarray(layers.relative_position_bucket(relative, bidirectional, num_buckets,
                                                     max_distance))
    want = [bucket_closed_form(int(r), bidirectional, num_buckets, max_distance)
            for r in relative]
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == num_buckets - 1


def config(**overrides) -> layers.LayerConfig:
    fields = dict(d_model=16, num_heads=3, head_dim=5, d_ff=24, activation=jax.nn.gelu,
                  gated_mlp=True, dropout_rate=0.0, dtype=jnp.float32)
    return layers.LayerConfig(**{**fields, **overrides})


def init_apply(module, *args):
    variables = nn.unbox(module.init(jax.random.key(1), *args))
    return jax.tree_util.tree_map(np.asarray, variables["params"]), \
        np.asarray(module.apply(variables, *args), np.float64)


def softmax64(x):
    x = x - x.max(axis=-1, keepdims=True)
    return np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)


def test_attention_matches_numpy_float64():
    cfg = config()
    rng = np.random.default_rng(0)
    x_q = rng.normal(size=(2, 7, cfg.d_model)).astype(np.float32)
    x_kv = rng.normal(size=(2, 9, cfg.d_model)).astype(np.float32)
    bias = rng.normal(size=(2, cfg.num_heads, 7, 9)).astype(np.float32)
    bias[:, :, :, -2:] = layers.MASKED_LOGIT
    params, got = init_apply(layers.MultiHeadAttention(cfg), x_q, x_kv, bias, True)
    p = jax.tree_util.tree_map(lambda a: a.astype(np.float64), params)
    q = np.einsum("btd,dhk->bthk", x_q, p["query"]["kernel"])
    k = np.einsum("bsd,dhk->bshk", x_kv, p["key"]["kernel"])
    v = np.einsum("bsd,dhk->bshk", x_kv, p["value"]["kernel"])
    weights = softmax64(np.einsum("bthk,bshk->bhts", q, k) + bias)
    want = np.einsum("bhts,bshk,hkd->btd", weights, v, p["out"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Masked keys get no weight: changing them does not change the output.
    x_kv2 = x_kv.copy()
    x_kv2[:, -2:] += 10.0
    _, got2 = init_apply(layers.MultiHeadAttention(cfg), x_q, x_kv2, bias, True)
    np.testing.assert_allclose(got2, got, rtol=1e-5, atol=1e-6)


def gelu_tanh64(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("gated", [True, False])
def test_mlp_matches_numpy_float64(gated):
    activation = jax.nn.gelu if gated else jax.nn.relu
    cfg = config(gated_mlp=gated, activation=activation)
    x = np.random.default_rng(1).normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    params, got = init_apply(layers.Mlp(cfg), x, True)
    p = jax.tree_util.tree_map(lambda a: a.astype(np.float64), params)
    if gated:
        hidden = gelu_tanh64(x @ p["wi_0"]["kernel"]) * (x @ p["wi_1"]["kernel"])
    else:
        hidden = np.maximum(x @ p["wi"]["kernel"], 0.0)
    np.testing.assert_allclose(got, hidden @ p["wo"]["kernel"], rtol=1e-4, atol=1e-5)


def test_rms_norm_matches_numpy_float64():
    cfg = config()
    x = np.random.default_rng(2).normal(size=(3, 4, cfg.d_model)).astype(np.float32) * 3
    module = layers.rms_norm(cfg)
    variables = module.init(jax.random.key(0), x)
    scale = np.random.default_rng(3).normal(size=cfg.d_model).astype(np.float32)
    got = module.apply({"params": {"scale": scale}}, x)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(variables["params"]["scale"].unbox()),
                                  np.ones(cfg.d_model))


def test_attention_mask_for_packed_rows():
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(layers.attention_mask(segments, segments, causal=False))[0, 0]
    want = np.array([[a == b and a > 0 for b in segments[0]] for a in segments[0]])
    np.testing.assert_array_equal(mask, want)
    causal = np.asarray(layers.attention_mask(segments, segments, causal=True))[0, 0]
    np.testing.assert_array_equal(causal, want & np.tril(np.ones((6, 6), bool)))


def test_relative_position_bias_lookup():
    module = layers.RelativePositionBias(8, 20, num_heads=2, bidirectional=True)
    variables = module.init(jax.random.key(0), 5, 6)
    table = np.asarray(variables["params"]["rel_embedding"].unbox())
    got = np.asarray(module.apply(variables, 5, 6))
    assert got.shape == (1, 2, 5, 6)
    for q in range(5):
        for k in range(6):
            bucket = bucket_closed_form(k - q, True, 8, 20)
            np.testing.assert_array_equal(got[0, :, q, k], table[bucket])


def test_relative_position_bias_lookup_at_a_decoding_offset():
    module = layers.RelativePositionBias(8, 20, num_heads=2, bidirectional=False)
    variables = module.init(jax.random.key(0), 1, 7)
    table = np.asarray(variables["params"]["rel_embedding"].unbox())
    got = np.asarray(jax.jit(lambda offset: module.apply(variables, 1, 7, offset))(4))
    for k in range(7):
        np.testing.assert_array_equal(got[0, :, 0, k], table[bucket_closed_form(k - 4, False,
                                                                                8, 20)])


def test_toeplitz_closed_form_and_length_check():
    values = np.arange(2 * 8).reshape(2, 8).astype(np.float32)
    got = np.asarray(layers.toeplitz(jnp.asarray(values), 3, 6))
    for q in range(3):
        for k in range(6):
            np.testing.assert_array_equal(got[:, q, k], values[:, k - q + 2])
    with pytest.raises(ValueError, match="rows \\+ columns - 1 = 9"):
        layers.toeplitz(jnp.zeros((2, 7)), 4, 6)


def random_arrays(*shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]


def test_softmax_attention_gradients_match_numpy_float64():
    """The hand-written backward pass against d/dx of the plain formula, in float64, with
    masked keys and a bias broadcast over the heads (as cross-attention's mask is)."""
    query, key, value, bias, gradient = random_arrays(
        (2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4), (2, 1, 5, 7), (2, 5, 3, 4))
    bias = bias.at[:, :, :, -2:].set(layers.MASKED_LOGIT)
    _, vjp = jax.vjp(jax.jit(layers.softmax_attention), query, key, value, bias)
    got = [np.asarray(g, np.float64) for g in vjp(gradient)]
    q, k, v, b, g = (np.asarray(x, np.float64) for x in (query, key, value, bias, gradient))
    weights = softmax64(np.einsum("bthk,bshk->bhts", q, k) + b)
    np.testing.assert_allclose(np.asarray(layers.softmax_attention(query, key, value, bias)),
                               np.einsum("bhts,bshk->bthk", weights, v), rtol=1e-5, atol=1e-6)
    weights_gradient = np.einsum("bthk,bshk->bhts", g, v)
    logits_gradient = weights * (weights_gradient
                                 - (weights * weights_gradient).sum(-1, keepdims=True))
    want = [np.einsum("bhts,bshk->bthk", logits_gradient, k),
            np.einsum("bhts,bthk->bshk", logits_gradient, q),
            np.einsum("bhts,bthk->bshk", weights, g),
            logits_gradient.sum(axis=1, keepdims=True)]
    for name, got_gradient, want_gradient in zip("qkvb", got, want):
        np.testing.assert_allclose(got_gradient, want_gradient, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_add_position_bias_sums_the_gradient_over_the_batch():
    position, mask, gradient = random_arrays((1, 3, 4, 5), (6, 1, 4, 5), (6, 3, 4, 5))
    _, vjp = jax.vjp(jax.jit(layers.add_position_bias), position, mask)
    position_gradient, mask_gradient = vjp(gradient)
    g = np.asarray(gradient, np.float64)
    np.testing.assert_allclose(position_gradient, g.sum(0, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(mask_gradient, g.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape_in,shape_out", [((6,), (9,)), ((9,), (2, 3)), ((3, 2), (4,))])
def test_project_matches_numpy_float64(shape_in, shape_out):
    """Both branches of the backward pass (inputs narrower and wider than the output)."""
    inputs, kernel, gradient = random_arrays((2, 5) + shape_in, shape_in + shape_out,
                                             (2, 5) + shape_out)
    project = jax.jit(lambda x, w: layers.project(x, w, jnp.float32, len(shape_in)))
    output, vjp = jax.vjp(project, inputs, kernel)
    x = np.asarray(inputs, np.float64).reshape(10, -1)
    w = np.asarray(kernel, np.float64).reshape(x.shape[1], -1)
    g = np.asarray(gradient, np.float64).reshape(10, -1)
    np.testing.assert_allclose(np.asarray(output).reshape(10, -1), x @ w, rtol=1e-5, atol=1e-6)
    inputs_gradient, kernel_gradient = vjp(gradient)
    np.testing.assert_allclose(np.asarray(inputs_gradient).reshape(10, -1), g @ w.T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kernel_gradient).reshape(w.shape), x.T @ g,
                               rtol=1e-5, atol=1e-6)
