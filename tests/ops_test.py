"""The hand-written backward passes of t5x_lite.ops against float64 NumPy gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import layers
from t5x_lite import ops
from tests.layers_test import softmax64


def test_toeplitz_closed_form_and_length_check():
    values = np.arange(2 * 8).reshape(2, 8).astype(np.float32)
    got = np.asarray(ops.toeplitz(jnp.asarray(values), 3, 6))
    for q in range(3):
        for k in range(6):
            np.testing.assert_array_equal(got[:, q, k], values[:, k - q + 2])
    with pytest.raises(ValueError, match="rows \\+ columns - 1 = 9"):
        ops.toeplitz(jnp.zeros((2, 7)), 4, 6)


def random_arrays(*shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes)]


def test_softmax_attention_gradients_match_numpy_float64():
    """The hand-written backward pass against d/dx of the plain formula, in float64, with
    masked keys and a bias broadcast over the heads (as cross-attention's mask is)."""
    query, key, value, bias, gradient = random_arrays(
        (2, 5, 3, 4), (2, 7, 3, 4), (2, 7, 3, 4), (2, 1, 5, 7), (2, 5, 3, 4))
    bias = bias.at[:, :, :, -2:].set(layers.MASKED_LOGIT)
    _, vjp = jax.vjp(jax.jit(ops.softmax_attention), query, key, value, bias)
    got = [np.asarray(g, np.float64) for g in vjp(gradient)]
    q, k, v, b, g = (np.asarray(x, np.float64) for x in (query, key, value, bias, gradient))
    weights = softmax64(np.einsum("bthk,bshk->bhts", q, k) + b)
    np.testing.assert_allclose(np.asarray(ops.softmax_attention(query, key, value, bias)),
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
    _, vjp = jax.vjp(jax.jit(ops.add_position_bias), position, mask)
    position_gradient, mask_gradient = vjp(gradient)
    g = np.asarray(gradient, np.float64)
    np.testing.assert_allclose(position_gradient, g.sum(0, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(mask_gradient, g.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", [ops.project, ops.project_autodiff])
@pytest.mark.parametrize("shape_in,shape_out", [((6,), (9,)), ((9,), (2, 3)), ((3, 2), (4,))])
def test_project_matches_numpy_float64(shape_in, shape_out, implementation):
    """Both branches of the hand-written backward pass (inputs narrower and wider than the
    output), and the autodiff version accelerators run."""
    inputs, kernel, gradient = random_arrays((2, 5) + shape_in, shape_in + shape_out,
                                             (2, 5) + shape_out)
    project = jax.jit(lambda x, w: implementation(x, w, jnp.float32, len(shape_in)))
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
