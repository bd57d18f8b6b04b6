"""The backend table (kernels.py): what each platform resolves to, the TPU's Pallas flash
attention (in interpret mode) against the spelled-out einsums, and whole models on each
platform's kernels against the CPU's."""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from t5x_lite import kernels
from t5x_lite import layers
from t5x_lite import models
from t5x_lite import ops
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib

from tests.models_test import CONFIG, packed_batch


def test_each_platform_resolves_to_its_kernels():
    cpu = kernels.resolve("cpu", "auto", jnp.float32, 64, 0.1)
    assert (cpu.attention, cpu.embedding, cpu.project, cpu.add_position_bias,
            cpu.cross_entropy, cpu.precision) == (
        kernels.Attention.EINSUM, kernels.Embedding.GATHER, ops.project, ops.add_position_bias,
        ops.softmax_cross_entropy, jax.lax.Precision.HIGHEST)
    gpu = kernels.resolve("gpu", "auto", jnp.bfloat16, 64, 0.0)
    assert (gpu.platform, gpu.attention, gpu.embedding, gpu.project, gpu.cross_entropy,
            gpu.precision, gpu.note) == (
        kernels.Platform.GPU, kernels.Attention.CUDNN, kernels.Embedding.GATHER,
        ops.project_autodiff, ops.softmax_cross_entropy_autodiff, jax.lax.Precision.DEFAULT, "")
    tpu = kernels.resolve("tpu", "auto", jnp.bfloat16, 64, 0.0)
    assert (tpu.attention, tpu.embedding, tpu.project) == (
        kernels.Attention.PALLAS_TPU, kernels.Embedding.ONE_HOT, ops.project_autodiff)
    # This machine's backend is the CPU, and a model built here runs the CPU's table.
    assert models.T5Config(dropout_rate=0.1).kernels() == cpu


@pytest.mark.parametrize("platform, dtype, head_dim, reason", [
    ("gpu", jnp.float32, 64, "needs bfloat16 activations"),
    ("gpu", jnp.bfloat16, 160, "multiple of 8 up to 128"),
    ("tpu", jnp.bfloat16, 192, "up to 128 or a multiple of it"),
])
def test_a_model_the_kernel_cannot_take_falls_back_to_xla_and_says_why(platform, dtype,
                                                                      head_dim, reason, capsys):
    resolved = kernels.resolve(platform, "auto", dtype, head_dim, 0.0)
    assert resolved.attention is kernels.Attention.XLA and reason in resolved.note
    kernels.resolve(platform, "auto", dtype, head_dim, 0.0)
    assert capsys.readouterr().out.count(reason) <= 1  # Once per process.
    # Named explicitly, the attention is what the configuration asks for.
    assert kernels.resolve(platform, "einsum", dtype, head_dim, 0.0).attention is (
        kernels.Attention.EINSUM)
    # Named explicitly but unable to take the model: bad input naming the fallback.
    first_choice = "cudnn" if platform == "gpu" else "pallas_tpu"
    with pytest.raises(ValueError, match=f"{reason}.*attention='auto' falls back to XLA's"):
        kernels.resolve(platform, first_choice, dtype, head_dim, 0.0)


def test_dropout_on_an_accelerator_keeps_the_kernel_for_evaluation():
    resolved = kernels.resolve("gpu", "auto", jnp.bfloat16, 64, 0.1)
    assert resolved.attention is kernels.Attention.CUDNN and "dropout" in resolved.note


def einsum_reference(query_BTHK, key_BSHK, value_BSHK, bias_BHTS):
    logits_BHTS = jnp.einsum("BTHK,BSHK->BHTS", query_BTHK, key_BSHK,
                             precision=jax.lax.Precision.HIGHEST) + bias_BHTS
    weights_BHTS = jax.nn.softmax(logits_BHTS, axis=-1)
    return jnp.einsum("BHTS,BSHK->BTHK", weights_BHTS, value_BSHK,
                      precision=jax.lax.Precision.HIGHEST)


def segments(length: int, first: int, second: int) -> np.ndarray:
    """Two packed segments of `first` and `second` tokens, then padding (segment 0)."""
    return np.array([1] * first + [2] * second + [0] * (length - first - second), np.int32)


@pytest.mark.parametrize("kind, queries, keys, causal", [
    ("encoder", 40, 40, False), ("decoder", 24, 24, True), ("cross", 24, 40, False),
    ("encoder at a block multiple", 128, 128, False)])
def test_pallas_flash_attention_matches_the_einsums(kind, queries, keys, causal):
    """Outputs and the gradients of query, key, value and bias, packed rows (two segments)
    and padding, float32. Only real queries carry a loss: padding queries attend to nothing
    in the reference (their weights are uniform over masked keys) and to padding keys in the
    flash kernel, and no real token sees either."""
    batch, heads, head_dim = 2, 2, 16
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)),
                                     jnp.float32)
                         for length in (queries, keys, keys))
    query_segments = np.stack([segments(queries, queries // 3, queries // 2),
                               segments(queries, queries // 2, queries // 2)])
    key_segments = np.stack([segments(keys, keys // 3, keys // 2),
                             segments(keys, keys // 2, keys // 2)])
    mask = layers.attention_mask(jnp.asarray(query_segments), jnp.asarray(key_segments), causal)
    position_bias = jnp.asarray(rng.normal(size=(1, heads, queries, keys)), jnp.float32)
    bias = position_bias + layers.mask_to_bias(mask, jnp.float32)
    loss_weights = jnp.asarray(rng.normal(size=(batch, queries, heads, head_dim)), jnp.float32
                               ) * (query_segments > 0)[..., None, None]

    def loss(attention):
        return lambda *arrays: jnp.sum(attention(*arrays) * loss_weights)

    pallas = kernels.ATTENTION_FUNCTIONS[kernels.Attention.PALLAS_TPU]
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(pallas)(query, key, value, bias)
        got_gradients = jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2, 3)))(
            query, key, value, bias)
    want = einsum_reference(query, key, value, bias)
    want_gradients = jax.grad(loss(einsum_reference), argnums=(0, 1, 2, 3))(
        query, key, value, bias)
    real = (query_segments > 0)[..., None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-4,
                               atol=1e-5)
    for name, got_gradient, want_gradient in zip(("query", "key", "value", "bias"),
                                                 got_gradients, want_gradients):
        np.testing.assert_allclose(got_gradient, want_gradient, rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    assert np.abs(np.asarray(got_gradients[3])).max() > 0


def loss_and_gradients(config: models.T5Config, params, batch):
    model = models.EncoderDecoderModel(config)
    return jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch)[0]))(params)


@pytest.mark.parametrize("platform, attention, in_mesh", [
    ("gpu", "xla", False), ("tpu", "pallas_tpu", False), ("tpu", "pallas_tpu", True)])
def test_a_model_on_each_platforms_kernels_equals_the_cpus(platform, attention, in_mesh):
    """The accelerators' tables (autodiff projections and cross-entropy, a plain bias sum,
    the one-hot embedding on TPUs, their attention) give the CPU table's loss and gradients:
    float32, packed rows with padding. In a mesh, Pallas runs per device in a shard_map
    (XLA cannot partition a Mosaic kernel)."""
    batch = {key: jnp.asarray(value) for key, value in packed_batch().items()}
    cpu_config = dataclasses.replace(CONFIG, kernel_platform="cpu")
    params = models.EncoderDecoderModel(cpu_config).init(jax.random.key(0))
    want_loss, want = loss_and_gradients(cpu_config, params, batch)
    config = dataclasses.replace(CONFIG, kernel_platform=platform, attention=attention)
    mesh_config = partitioning.MeshConfig()
    mesh = partitioning.create_mesh(mesh_config)
    with pltpu.force_tpu_interpret_mode(), (
            trainer_lib.mesh_context(mesh, mesh_config.rules) if in_mesh
            else contextlib.nullcontext()):
        got_loss, got = loss_and_gradients(config, params, batch)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for (path, want_leaf), got_leaf in zip(jax.tree_util.tree_leaves_with_path(want),
                                           jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
