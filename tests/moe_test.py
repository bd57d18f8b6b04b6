"""Mixture of Experts: routing and dispatch against a plain loop over experts in float64,
capacity and padding, the auxiliary losses' closed forms, presets' parameter counts,
upcycling, expert parallelism on 8 CPU devices against one, and a Switch model pretraining
through the command line."""
import json
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_lite import checkpoints
from t5x_lite import launch
from t5x_lite import layers
from t5x_lite import models
from t5x_lite import moe
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import train
from t5x_lite import trainer as trainer_lib
from t5x_lite import warm_start
from tests import partitioning_test
from tests import trainer_test

REPO = os.path.dirname(launch.GIN_DIR)
LAYER = layers.LayerConfig(d_model=8, num_heads=1, head_dim=4, d_ff=16, activation=jax.nn.gelu,
                           gated_mlp=True, dropout_rate=0.0, dtype=jnp.float32)


def random_inputs(batch: int = 4, length: int = 6, seed: int = 0):
    """x [B, T, D] and a valid mask with the last two tokens of row 1 and all of row 3 after
    position 3 being padding."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, LAYER.d_model)).astype(np.float32)
    valid = np.ones((batch, length), np.int32)
    valid[1, -2:] = 0
    valid[3, 3:] = 0
    return x, valid


def apply_sparse(config: moe.MoeConfig, x, valid, params=None, seed: int = 0):
    """(params, output [B, T, D], sown metrics) of a SparseMlp in evaluation mode."""
    module = moe.SparseMlp(LAYER, config)
    if params is None:
        params = nn.unbox(module.init(jax.random.key(seed), jnp.asarray(x), True,
                                      valid)["params"])
    output, state = module.apply({"params": params}, jnp.asarray(x), True, valid,
                                 mutable=["intermediates"])
    return params, np.asarray(output), state["intermediates"]["moe_metrics"][0]


def gelu_tanh64(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def expert64(params, expert: int, token: np.ndarray) -> np.ndarray:
    kernels = {name: np.asarray(params["experts"][name]["kernel"][expert], np.float64)
               for name in ("wi_0", "wi_1", "wo")}
    hidden = gelu_tanh64(token @ kernels["wi_0"]) * (token @ kernels["wi_1"])
    return hidden @ kernels["wo"]


def loop_reference(params, x, valid, config: moe.MoeConfig) -> np.ndarray:
    """The sparse MLP computed token by token in float64, with every routing rule written as
    a loop: choices in rank order, tokens in sequence (or router-confidence) order, an expert
    refusing tokens once it holds its capacity."""
    batch, length, width = x.shape
    rows = moe.rows_per_group(batch, length, config.group_size)
    groups, tokens = batch // rows, rows * length
    x64 = x.reshape(groups, tokens, width).astype(np.float64)
    valid = valid.reshape(groups, tokens) > 0
    logits = x64 @ np.asarray(params["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    capacity = config.expert_capacity(tokens, deterministic=True)
    out = np.zeros_like(x64)
    for g in range(groups):
        if config.router is moe.Router.EXPERTS_CHOOSE:
            for e in range(config.num_experts):
                ranked = [s for s in np.argsort(-probs[g, :, e], kind="stable") if valid[g, s]]
                for s in ranked[:min(capacity, tokens)]:
                    out[g, s] += probs[g, s, e] * expert64(params, e, x64[g, s])
            continue
        choices = np.argsort(-probs[g], axis=-1, kind="stable")[:, :config.num_selected]
        gates = np.take_along_axis(probs[g], choices, axis=-1)
        if config.renormalize_weights:
            gates /= gates.sum(-1, keepdims=True)
        order = range(tokens)
        if config.batch_prioritized_routing:
            order = np.argsort(-gates[:, 0], kind="stable")
        held = np.zeros(config.num_experts, int)
        for k in range(config.num_selected):
            for s in order:
                e = choices[s, k]
                if valid[g, s] and held[e] < capacity:
                    held[e] += 1
                    out[g, s] += gates[s, k] * expert64(params, e, x64[g, s])
    return out.reshape(batch, length, width)


ROUTINGS = {
    "top-1": dict(num_selected=1),
    "top-2 renormalised": dict(num_selected=2, renormalize_weights=True),
    "top-2 batch-prioritised": dict(num_selected=2, batch_prioritized_routing=True),
    "experts choose": dict(router="experts_choose"),
}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_dispatch_and_combine_equal_a_loop_over_experts(routing):
    # Groups of two sequences (12 tokens), 4 experts of capacity 2: tokens are dropped.
    config = moe.MoeConfig(num_experts=4, group_size=12, capacity_factor_eval=0.75,
                           min_expert_capacity=1, **ROUTINGS[routing])
    x, valid = random_inputs()
    params, output, metrics = apply_sparse(config, x, valid)
    assert config.expert_capacity(12, True) == 2 and float(metrics["dropped_fraction"]) > 0.2
    np.testing.assert_allclose(output, loop_reference(params, x, valid, config),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_selected, renormalize", [(1, True), (2, False), (1, False)])
def test_experts_equal_to_one_mlp_give_that_mlp_times_the_routing_weight(num_selected,
                                                                        renormalize):
    config = moe.MoeConfig(num_experts=4, num_selected=num_selected, capacity_factor_eval=4.0,
                           renormalize_weights=renormalize)
    x, valid = random_inputs()
    dense = layers.Mlp(LAYER)
    dense_params = nn.unbox(dense.init(jax.random.key(1), jnp.asarray(x), True)["params"])
    dense_out = np.asarray(dense.apply({"params": dense_params}, jnp.asarray(x), True))
    params, _, _ = apply_sparse(config, x, valid)
    params = warm_start.upcycle(params, dense_params)
    _, output, metrics = apply_sparse(config, x, valid, params)
    assert float(metrics["dropped_fraction"]) == 0.0
    logits = x.astype(np.float64) @ np.asarray(params["router"]["kernel"], np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    weight_sum = np.sort(probs, axis=-1)[..., ::-1][..., :num_selected].sum(-1)
    if renormalize:
        weight_sum = np.ones_like(weight_sum)
    expected = dense_out * (weight_sum * valid)[..., None]  # Padding is never routed.
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-6)
    if renormalize and num_selected == 1:
        np.testing.assert_allclose(output[valid > 0], dense_out[valid > 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_no_expert_exceeds_capacity_and_padding_is_never_routed(routing):
    rng = np.random.default_rng(3)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 20, 4)) * 3, jnp.float32))
    valid = jnp.asarray(rng.random((3, 20)) > 0.2)
    config = moe.MoeConfig(num_experts=4, **ROUTINGS[routing])
    if config.router is moe.Router.TOKENS_CHOOSE:
        dispatch, combine = moe.tokens_choose(probs, valid, config.num_selected, 3,
                                              config.batch_prioritized_routing)
    else:
        dispatch, combine = moe.experts_choose(probs, valid, 3)
    dispatch, combine = np.asarray(dispatch), np.asarray(combine)
    assert set(np.unique(dispatch)) <= {0.0, 1.0}
    assert dispatch.sum(axis=1).max() <= 1  # One token per slot of each expert...
    assert dispatch.sum(axis=(1, 3)).max() <= 3  # ... so at most `capacity` per expert.
    assert dispatch[~np.asarray(valid)].sum() == 0
    assert dispatch.sum(axis=3).max() <= 1  # A token takes at most one slot per expert.
    # Combine weights are the router probabilities of the slots taken.
    np.testing.assert_allclose(combine, dispatch * np.asarray(probs)[..., None], rtol=1e-6)
    # Capacity binds: every expert that was claimed more than 3 times holds exactly 3.
    assert dispatch.sum(axis=(1, 3)).max() == 3


class FeedForward(nn.Module):
    """A layer's MLP sublayer (norm, sparse MLP, residual) alone."""

    config: moe.MoeConfig

    @nn.compact
    def __call__(self, x, valid):
        block = lambda cfg, name: moe.SparseMlp(cfg, self.config, name=name)  # noqa: E731
        return layers.feed_forward(x, valid, True, LAYER, block, False)


def test_dropped_tokens_pass_through_the_residual_unchanged():
    config = moe.MoeConfig(num_experts=2, group_size=24, capacity_factor_eval=0.25,
                           min_expert_capacity=1)
    x, valid = random_inputs()
    module = FeedForward(config)
    params = nn.unbox(module.init(jax.random.key(0), jnp.asarray(x), valid)["params"])
    out = np.asarray(module.apply({"params": params}, jnp.asarray(x), valid))
    _, sparse_out, _ = apply_sparse(config, x, valid, params["mlp"])
    dropped = np.all(sparse_out == 0.0, axis=-1)
    # Capacity 3 of 24 tokens per expert: most tokens are dropped, and padding always is.
    assert dropped.sum() > 10 and dropped[valid == 0].all()
    np.testing.assert_array_equal(out[dropped], x[dropped])
    assert not np.allclose(out[~dropped], x[~dropped])


def test_load_balancing_and_z_losses_equal_their_closed_forms():
    probs = jnp.asarray([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]]])
    valid = jnp.asarray([[True, True, True, True, False]])
    # Top-1 choices of the 4 valid tokens: expert 0 three times, expert 1 once.
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15.
    np.testing.assert_allclose(moe.load_balancing_loss(probs, valid, 1), 1.15, rtol=1e-6)
    # Top-2: every valid token names both experts, f = (1/2, 1/2): 2 * 0.5 * (0.65 + 0.35).
    np.testing.assert_allclose(moe.load_balancing_loss(probs, valid, 2), 1.0, rtol=1e-6)
    logits = jnp.asarray([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [9.0, 9.0]]])
    valid = jnp.asarray([[True, True, True, False]])
    expected = np.mean([math.log(math.exp(1) + math.exp(2)) ** 2, math.log(2) ** 2,
                        math.log(math.exp(3) + math.exp(-1)) ** 2])
    np.testing.assert_allclose(moe.router_z_loss(logits, valid), expected, rtol=1e-6)


def test_losses_enter_the_training_loss_with_their_weights():
    config = models.T5Config(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32,
                             num_encoder_layers=2, num_decoder_layers=2,
                             moe=moe.MoeConfig(num_experts=4, load_balancing_loss_weight=0.5,
                                               router_z_loss_weight=0.25))
    model = models.EncoderDecoderModel(config)
    params = model.init(jax.random.key(0))
    batch = trainer_test.random_batch(0)
    sums, logits = jax.jit(lambda p, b: (model.loss_sums(p, b), model.logits(p, b)))(params,
                                                                                      batch)
    plain = models.cross_entropy_sums(logits, batch["decoder_target_tokens"],
                                      batch["decoder_loss_weights"], config.z_loss)
    layers_seen = {key.split("/")[1] for key in sums if key.startswith("moe/")}
    assert layers_seen == {"encoder_layer_1", "decoder_layer_1"}
    balance = sum(float(sums[f"moe/{name}/load_balancing_loss"]) for name in layers_seen)
    z_loss = sum(float(sums[f"moe/{name}/router_z_loss"]) for name in layers_seen)
    np.testing.assert_allclose(float(sums["moe_load_balancing_loss"]), balance, rtol=1e-6)
    np.testing.assert_allclose(float(sums["loss"]),
                               float(plain["loss"]) + 0.5 * balance + 0.25 * z_loss, rtol=1e-6)
    fractions = np.asarray(sums["moe/encoder_layer_1/expert_fraction"]) / float(sums["weight"])
    np.testing.assert_allclose(fractions.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("preset, dense, extra", [("switch_tiny", "t5_1_1_tiny", False),
                                                  ("st_moe_tiny", "t5_1_1_tiny", True),
                                                  ("switch_base", "t5_1_0_base", False),
                                                  ("st_moe_base", "t5_1_1_base", True)])
def test_preset_parameter_counts_equal_the_closed_form(preset, dense, extra):
    def config_of(name):
        launch.parse_gin([f"models/{name}.gin"], [])
        try:
            return gin.get_configurable(models.T5Config)()
        finally:
            gin.clear_config()

    def count(config):
        model = models.EncoderDecoderModel(config)
        return models.count_parameters(jax.eval_shape(model.init, jax.random.key(0)))

    config, dense_config = config_of(preset), config_of(dense)
    experts, width, hidden = config.moe.num_experts, config.d_model, config.d_ff
    mlp = (3 if config.gated_mlp else 2) * width * hidden
    sparse_layers = sum(config.moe.is_sparse(i) for i in range(config.num_encoder_layers))
    sparse_layers += sum(config.moe.is_sparse(i) for i in range(config.num_decoder_layers))
    per_layer = (experts - 1) * mlp + width * experts + (mlp + width if extra else 0)
    assert count(config) == count(dense_config) + sparse_layers * per_layer
    if preset == "switch_base":  # 128 experts in 6 + 6 layers: Switch-Base's 7.4B.
        assert count(config) == 7_415_217_408


def moe_trainer(config: models.T5Config, mesh_config=partitioning.MeshConfig(), devices=None
                ) -> trainer_lib.Trainer:
    schedule = optimizers.rsqrt_schedule(warmup_steps=10)
    mesh = partitioning.create_mesh(mesh_config, devices or jax.devices()[:1])
    moe.check_expert_axis(config.moe, mesh.shape["expert"])
    return trainer_lib.Trainer(models.EncoderDecoderModel(config),
                               optimizers.adafactor(schedule), schedule, mesh,
                               rules=mesh_config.rules)


# Routing groups of one sequence, so 8 rows make 8 groups that split over 8 devices.
SWITCH = models.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                         num_encoder_layers=2, num_decoder_layers=2,
                         moe=moe.MoeConfig(num_experts=8, group_size=10, min_expert_capacity=1,
                                           router_z_loss_weight=1e-3))


def test_upcycled_model_starts_with_the_dense_model_loss(tmp_path):
    dense_config = trainer_test.CONFIG
    dense = moe_trainer(dense_config)
    dense_state, _ = partitioning_test.train(dense, 2)  # Trained weights, not the init.
    manager = checkpoints.create_manager(str(tmp_path))
    checkpoints.save(manager, dense_state)
    manager.wait_until_finished()
    # Top-1 with weights renormalised to 1, capacity for every token, no auxiliary losses.
    config = models.T5Config(**{
        **{field: getattr(dense_config, field) for field in dense_config.__dataclass_fields__},
        "moe": moe.MoeConfig(num_experts=4, renormalize_weights=True, capacity_factor_train=4,
                             capacity_factor_eval=4, load_balancing_loss_weight=0.0,
                             router_z_loss_weight=0.0)})
    sparse = moe_trainer(config)
    state = warm_start.upcycled_state(sparse, str(tmp_path), seed=1)
    assert int(state.step) == 0
    kernel = state.params["encoder_layer_1"]["mlp"]["experts"]["wo"]["kernel"]
    dense_kernel = dense_state.params["encoder_layer_1"]["mlp"]["wo"]["kernel"]
    for expert in range(4):
        np.testing.assert_array_equal(kernel[expert], dense_kernel)
    batch = partitioning.global_batch(trainer_test.random_batch(7), sparse.mesh)
    _, sparse_metrics = sparse.compile_train_step()(state, batch)
    _, dense_metrics = dense.compile_train_step()(dense_state, batch)
    assert float(sparse_metrics["moe/encoder_layer_1/dropped_fraction"]) == 0.0
    np.testing.assert_allclose(float(sparse_metrics["loss"]), float(dense_metrics["loss"]),
                               rtol=1e-6)


def test_bad_moe_settings_are_one_line_naming_the_binding():
    with pytest.raises(ValueError, match=r"moe.MoeConfig.num_selected \(top-k\) must be <= "
                                         r"num_experts = 4, got 5"):
        moe.MoeConfig(num_experts=4, num_selected=5)
    with pytest.raises(ValueError, match="moe.MoeConfig.capacity_factor_train must be > 0, "
                                         "got 0"):
        moe.MoeConfig(capacity_factor_train=0)
    with pytest.raises(ValueError, match="moe.MoeConfig.capacity_factor_eval must be > 0"):
        moe.MoeConfig(capacity_factor_eval=-1.0)
    with pytest.raises(ValueError, match="moe.MoeConfig.num_experts = 6 does not divide over "
                                         "the mesh's expert axis of 4"):
        moe.check_expert_axis(moe.MoeConfig(num_experts=6), 4)
    with pytest.raises(ValueError, match="T5Config.scan_layers needs identical layers"):
        models.T5Config(moe=moe.MoeConfig(), scan_layers=True)


EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    import jax
    from t5x_lite import partitioning
    from tests import moe_test as t
    from tests import partitioning_test as p
    assert len(jax.devices()) == 8
    one, one_losses = p.train(t.moe_trainer(t.SWITCH), 3)
    expert = p.mesh_config("expert")
    trainer = t.moe_trainer(t.SWITCH, expert, jax.devices())
    state, losses = p.train(trainer, 3)
    kernel = state.params["encoder_layer_1"]["mlp"]["experts"]["wi_0"]["kernel"]
    results = {"mesh": dict(trainer.mesh.shape), "difference": p.relative_difference(
                   state.params, one.params),
               "losses": [losses, one_losses], "expert kernel spec": list(kernel.sharding.spec),
               "expert kernel shard": list(kernel.sharding.shard_shape(kernel.shape))}
    # The command line names the binding when the experts do not split over the axis.
    command = [sys.executable, "-m", "t5x_lite.train", "--gin_file=models/switch_tiny.gin",
               "--gin_file=runs/pretrain.gin", "--gin_file=partitioning/expert.gin",
               "--gin.MODEL_DIR='" + sys.argv[1] + "'", "--gin.TRAIN_STEPS=1",
               "--gin.MIXTURE_OR_TASK_NAME='stdlib_span_corruption_bytes'",
               "--gin.moe.MoeConfig.num_experts=6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    results["cli"] = [done.returncode, done.stderr.strip().splitlines()[-1]]
    print("RESULTS", json.dumps(results))
""")


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    model_dir = str(tmp_path_factory.mktemp("bad_expert_axis"))
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT, model_dir],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_expert_parallel_training_equals_one_device(eight_device_results):
    assert eight_device_results["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
    assert eight_device_results["expert kernel spec"][0] == "expert"
    assert eight_device_results["expert kernel shard"] == [2, 32, 64]  # 8 experts / 4.
    losses, one_losses = eight_device_results["losses"]
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    assert eight_device_results["difference"] <= 1e-5


def test_experts_that_do_not_split_over_the_axis_stop_the_command(eight_device_results):
    status, line = eight_device_results["cli"]
    assert status == 2
    assert line == ("error: moe.MoeConfig.num_experts = 6 does not divide over the mesh's "
                    "expert axis of 4: set num_experts to a multiple of it or "
                    "partitioning.MeshConfig.expert to a divisor")


def test_switch_tiny_pretrains_saves_and_resumes(tmp_path, capsys):
    def pretrain(steps: int) -> None:
        launch.parse_gin(["models/switch_tiny.gin", "runs/pretrain.gin"], [
            f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = 'stdlib_span_corruption_bytes'",
            f"TRAIN_STEPS = {steps}", 'TASK_FEATURE_LENGTHS = {"inputs": 64, "targets": 16}',
            "BATCH_SIZE = 8", "CHECKPOINT_PERIOD = 10", "EVAL_PERIOD = 10", "EVAL_STEPS = 2",
            "LOG_PERIOD = 5", "models.T5Config.vocab_size = 384",
            "optimizers.rsqrt_schedule.warmup_steps = 100"])
        try:
            gin.get_configurable(train.run)()
        finally:
            gin.clear_config()

    pretrain(10)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    pretrain(20)
    out = capsys.readouterr().out
    assert "Resuming from checkpoint at step 10." in out
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train_rows = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train_rows] == [5, 10, 15, 20]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    validation = [row["loss"] for row in rows if row["split"] == "validation"]
    assert validation[0] > validation[1] > validation[2]
    for row in train_rows + [rows[-1]]:
        for layer in ("encoder_layer_1", "decoder_layer_1"):
            fractions = row[f"moe/{layer}/expert_fraction"]
            assert len(fractions) == 8 and abs(sum(fractions) - 1) < 1e-5
            assert 0 <= row[f"moe/{layer}/dropped_fraction"] < 1
            assert 0.5 < row[f"moe/{layer}/load_balancing_loss"] < 8  # 1 when even, E at most.
    assert out.count("    encoder_layer_1   balance ") == 4  # One line per logged step.
    assert "    decoder_layer_1   balance " in out and "  experts 0." in out


def pretrain_with_gin(model_file: str, model_dir, steps: int, *extra: str) -> None:
    launch.parse_gin([f"models/{model_file}.gin", "runs/pretrain.gin"], [
        f"MODEL_DIR = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'stdlib_span_corruption_bytes'",
        f"TRAIN_STEPS = {steps}", 'TASK_FEATURE_LENGTHS = {"inputs": 32, "targets": 8}',
        "BATCH_SIZE = 4", "EVAL_STEPS = 1", "models.T5Config.vocab_size = 384", *extra])
    try:
        gin.get_configurable(train.run)()
    finally:
        gin.clear_config()


def test_upcycling_is_bound_in_gin_and_checks_its_input(tmp_path, capsys):
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    with pytest.raises(FileNotFoundError, match="UPCYCLE_FROM '.*dense' holds no checkpoint"):
        pretrain_with_gin("switch_tiny", sparse_dir, 1, f"UPCYCLE_FROM = '{dense_dir}'")
    assert not sparse_dir.exists()  # Nothing written before the check.
    pretrain_with_gin("t5_1_1_tiny", dense_dir, 2)
    with pytest.raises(ValueError, match="upcycle_from needs an MoE model"):
        pretrain_with_gin("t5_1_1_tiny", sparse_dir, 1, f"UPCYCLE_FROM = '{dense_dir}'")
    with pytest.raises(ValueError, match="extra_dense_mlp adds MLPs the dense model lacks"):
        pretrain_with_gin("st_moe_tiny", sparse_dir, 1, f"UPCYCLE_FROM = '{dense_dir}'")
    capsys.readouterr()
    pretrain_with_gin("switch_tiny", sparse_dir, 1, f"UPCYCLE_FROM = '{dense_dir}'")
    assert f"Upcycled from the dense checkpoint at step 2 in {dense_dir}" in (
        capsys.readouterr().out)
