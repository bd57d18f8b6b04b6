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


def rms64(x, scale):
    return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale


def self_attention_layers64(params, x, bias, layer_names):
    """T5 v1.1 self-attention layers (pre-norm attention under `bias` [B, H, T, S], then a
    gated-GELU MLP) in float64: the layers `layer_names` of float64 `params` applied to the
    embeddings x [B, T, D] in order. The final norm is the caller's."""
    for name in layer_names:
        layer = params[name]
        h = rms64(x, layer["pre_attention_norm"]["scale"])
        q, k, v = (np.einsum("btd,dhk->bthk", h, layer["attention"][kind]["kernel"])
                   for kind in ("query", "key", "value"))
        weights = softmax64(np.einsum("bthk,bshk->bhts", q, k) + bias)
        x = x + np.einsum("bhts,bshk,hkd->btd", weights, v, layer["attention"]["out"]["kernel"])
        h = rms64(x, layer["pre_mlp_norm"]["scale"])
        mlp = layer["mlp"]
        x = x + (gelu_tanh64(h @ mlp["wi_0"]["kernel"]) * (h @ mlp["wi_1"]["kernel"])
                 ) @ mlp["wo"]["kernel"]
    return x


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
