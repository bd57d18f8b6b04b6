"""Memory options of the layer stacks: scan == loop, remat == no remat, bfloat16 with each,
and the logical axes of stacked parameters."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from t5x_lite import models
from t5x_lite import partitioning

CONFIG = models.T5Config(vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=64,
                         num_encoder_layers=3, num_decoder_layers=2,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16)
STACKS = {"encoder": CONFIG.num_encoder_layers, "decoder": CONFIG.num_decoder_layers}
# The default rule table with the stacked-layers axis replicated, whatever its rule there.
RULES = partitioning.MeshConfig(rule_overrides={"layers": None}).rules


def packed_batch() -> models.Batch:
    """Batch 2, encoder length 8, decoder length 6; row 0 packs two examples."""
    enc_tokens = np.array([[5, 6, 1, 9, 10, 11, 1, 0], [7, 8, 9, 10, 1, 0, 0, 0]], np.int32)
    enc_segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    targets = np.array([[20, 1, 30, 31, 1, 0], [40, 41, 42, 1, 0, 0]], np.int32)
    dec_inputs = np.array([[0, 20, 0, 30, 31, 0], [0, 40, 41, 42, 0, 0]], np.int32)
    dec_segments = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
    batch = {"encoder_input_tokens": enc_tokens, "encoder_segment_ids": enc_segments,
             "decoder_input_tokens": dec_inputs, "decoder_target_tokens": targets,
             "decoder_segment_ids": dec_segments,
             "decoder_loss_weights": (targets > 0).astype(np.int32)}
    return {name: jnp.asarray(array) for name, array in batch.items()}


def stack_layers(params):
    """Loop parameters (encoder_layer_0, ...) -> scan parameters (encoder_layers, leaves with
    a leading layers dimension)."""
    params = dict(params)
    for stack, num_layers in STACKS.items():
        per_layer = [params.pop(f"{stack}_layer_{i}") for i in range(num_layers)]
        params[f"{stack}_layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                                           *per_layer)
    return params


def unstack_layers(params):
    params = dict(params)
    for stack, num_layers in STACKS.items():
        stacked = params.pop(f"{stack}_layers")
        for i in range(num_layers):
            params[f"{stack}_layer_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
    return params


def loss_and_grads(config: models.T5Config, params, dropout_rng=None):
    model = models.EncoderDecoderModel(config)
    loss_fn = lambda p: model.loss(p, packed_batch(), dropout_rng)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(loss_fn))(params)


def assert_trees_close(got, want, rtol: float):
    """Leaf by leaf; entries near zero are compared against the leaf's largest entry."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol * np.abs(w).max(),
                                   err_msg=jax.tree_util.keystr(path))


@functools.cache
def loop_params():
    return jax.jit(models.EncoderDecoderModel(CONFIG).init)(jax.random.key(0))


def params_for(config: models.T5Config):
    return stack_layers(loop_params()) if config.scan_layers else loop_params()


@functools.cache
def baseline(scan: bool, dropout: bool):
    """Loss and gradients without remat, float32, computed once per test module."""
    config = dataclasses.replace(CONFIG, scan_layers=scan, dropout_rate=0.1 if dropout else 0.0)
    return loss_and_grads(config, params_for(config), DROPOUT_RNG if dropout else None)


DROPOUT_RNG = jax.random.key(3)


def test_scan_equals_loop():
    loss, grads = baseline(scan=False, dropout=False)
    scanned = dataclasses.replace(CONFIG, scan_layers=True)
    scan_params = stack_layers(loop_params())
    # The stacked tree has exactly the shapes that the scanned model initialises.
    abstract = jax.eval_shape(models.EncoderDecoderModel(scanned).init, jax.random.key(0))
    assert jax.tree_util.tree_map(jnp.shape, abstract) == \
        jax.tree_util.tree_map(jnp.shape, scan_params)
    scan_loss, scan_grads = baseline(scan=True, dropout=False)
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-5)
    assert_trees_close(unstack_layers(scan_grads), grads, rtol=1e-5)
    assert float(loss) > 0 and models.count_parameters(scan_params) == \
        models.count_parameters(loop_params())


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_equals_no_remat(policy, scan):
    # With dropout on: a rematerialised layer must redraw exactly the same masks.
    config = dataclasses.replace(CONFIG, scan_layers=scan, dropout_rate=0.1, remat_policy=policy)
    remat_loss, remat_grads = loss_and_grads(config, params_for(config), DROPOUT_RNG)
    loss, grads = baseline(scan, dropout=True)
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    assert_trees_close(remat_grads, grads, rtol=1e-6)
    # Dropout is really on: the deterministic loss differs.
    assert abs(float(baseline(scan, dropout=False)[0]) - float(loss)) > 1e-4


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("policy", ["none", "minimal", "full"])
def test_bfloat16_activations_track_float32(policy, scan):
    # Against float32 without remat: remat itself is exact (test_remat_equals_no_remat).
    loss, _ = baseline(scan, dropout=False)
    config = dataclasses.replace(CONFIG, remat_policy=policy, scan_layers=scan,
                                 activation_dtype=jnp.bfloat16)
    bf16_loss, bf16_grads = loss_and_grads(config, params_for(config))
    assert np.isfinite(float(bf16_loss))
    np.testing.assert_allclose(float(bf16_loss), float(loss), rtol=2e-2)
    # Parameters (so their gradients) stay float32.
    for leaf in jax.tree_util.tree_leaves(bf16_grads):
        assert leaf.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(leaf)))


def test_stacked_parameters_lead_with_the_layers_axis():
    loop_axes = models.EncoderDecoderModel(CONFIG).logical_axes()
    scanned = models.EncoderDecoderModel(dataclasses.replace(CONFIG, scan_layers=True))
    scan_axes = scanned.logical_axes()
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    for stack in STACKS:
        want = jax.tree_util.tree_map(lambda spec: PartitionSpec("layers", *spec),
                                      loop_axes[f"{stack}_layer_0"], is_leaf=is_spec)
        assert scan_axes[f"{stack}_layers"] == want
    shared = {name for name in loop_axes if "_layer_" not in name}
    assert {name: scan_axes[name] for name in shared} == {name: loop_axes[name] for name in shared}
    assert set(scan_axes) == shared | {f"{stack}_layers" for stack in STACKS}

    # Shardings build with the ("layers", None) rule, and the scanned step runs under them
    # (activation constraints inside the scan body included).
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(partitioning.MESH_AXES)),
                partitioning.MESH_AXES)
    shardings = nn.logical_to_mesh_sharding(scan_axes, mesh, RULES)
    for sharding in jax.tree_util.tree_leaves(shardings["encoder_layers"]):
        assert sharding.spec[0] is None
    params = jax.device_put(stack_layers(loop_params()), shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        loss, _ = jax.jit(lambda p: scanned.loss(p, packed_batch()))(params)
    assert np.isfinite(float(loss))


def test_config_rejects_unknown_remat_policy():
    with pytest.raises(ValueError, match=r"remat_policy.*'none', 'minimal', 'full'.*'dots'"):
        models.T5Config(remat_policy="dots")
