"""Sharding invariants on 8 CPU devices: every rule table in gin/partitioning/ trains to the
parameters of one device (a decoder-only and an encoder-only model too), FSDP holds 1/8 of the
state per device, a checkpoint restores onto another mesh and trains on identically;
microbatching equals the full batch; bad meshes and rules are one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import gin
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from t5x_lite import launch
from t5x_lite import models
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib
from tests import trainer_test

REPO = os.path.dirname(launch.GIN_DIR)


def mesh_config(rule_file: str, **sizes) -> partitioning.MeshConfig:
    """The MeshConfig of gin/partitioning/<rule_file>.gin with some axis sizes overridden."""
    launch.parse_gin([f"partitioning/{rule_file}.gin"],
                     [f"partitioning.MeshConfig.{axis} = {size}" for axis, size in sizes.items()])
    try:
        return gin.get_configurable(partitioning.MeshConfig)()
    finally:
        gin.clear_config()


def make_trainer(config: partitioning.MeshConfig, devices, num_microbatches: int = 1,
                 model_config: models.T5Config = trainer_test.CONFIG) -> trainer_lib.Trainer:
    schedule = optimizers.rsqrt_schedule(warmup_steps=10)
    return trainer_lib.Trainer(models.model_for(model_config),
                               optimizers.adafactor(schedule), schedule,
                               partitioning.create_mesh(config, devices), rules=config.rules,
                               num_microbatches=num_microbatches)


def train(trainer: trainer_lib.Trainer, steps: int, state=None, first_batch: int = 0):
    """(state, losses) after `steps` steps on trainer_test's random batches (for a
    decoder-only model, prefix-LM rows whose first 2 positions attend bidirectionally; for an
    encoder-only one, masked-LM rows of the encoder inputs, every third position weighed, or
    for a classifier a label per row)."""
    state = trainer.init_state(seed=0) if state is None else state
    step, losses = trainer.compile_train_step(), []
    for index in range(first_batch, first_batch + steps):
        rows = trainer_test.random_batch(index)
        if trainer.model.config.encoder_only:
            rows = encoder_only_rows(rows, trainer.model.config.num_classes)
        if trainer.model.config.decoder_only:
            prefix = np.arange(rows["decoder_target_tokens"].shape[1]) < 2
            rows["decoder_causal_attention"] = np.tile(
                prefix, (len(rows["decoder_target_tokens"]), 1)).astype(np.int32)
        batch = partitioning.global_batch(rows, trainer.mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def relative_difference(tree_a, tree_b) -> float:
    """The largest ||a - b|| / ||b|| over the leaves of two parameter trees."""
    return max(float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))
               for a, b in zip(jax.tree_util.tree_leaves(tree_a),
                               jax.tree_util.tree_leaves(tree_b)))


DECODER_ONLY_CONFIG = dataclasses.replace(trainer_test.CONFIG, architecture="decoder_only",
                                          num_encoder_layers=0)
ENCODER_ONLY_CONFIG = dataclasses.replace(trainer_test.CONFIG, architecture="encoder_only",
                                          num_decoder_layers=0)
CLASSIFIER_CONFIG = dataclasses.replace(ENCODER_ONLY_CONFIG, num_classes=3)


def encoder_only_rows(rows: dict, num_classes: int) -> dict:
    tokens = rows["encoder_input_tokens"]
    encoder = {"encoder_input_tokens": tokens,
               "encoder_segment_ids": rows["encoder_segment_ids"]}
    if num_classes:
        return {**encoder, "classification_labels": tokens[:, :1] % num_classes,
                "classification_weights": np.ones((len(tokens), 1), np.int32)}
    weights = (np.arange(tokens.shape[1]) % 3 == 0).astype(np.int32)
    return {**encoder, "encoder_target_tokens": np.roll(tokens, 1, axis=1),
            "encoder_loss_weights": np.tile(weights, (len(tokens), 1))}

EIGHT_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax, numpy as np
    from t5x_lite import checkpoints, partitioning
    from tests import partitioning_test as t
    assert len(jax.devices()) == 8
    results = {}
    one, _ = t.train(t.make_trainer(partitioning.MeshConfig(), jax.devices()[:1]), 3)
    meshes = {"data=8": t.mesh_config("data"),
              "data=2 fsdp=4": t.mesh_config("fsdp", data=2),
              "data=2 fsdp=2 tensor=2": t.mesh_config("fsdp_tensor", data=2, fsdp=2)}
    for name, config in meshes.items():
        trainer = t.make_trainer(config, jax.devices())
        state, _ = t.train(trainer, 3)
        results[name] = t.relative_difference(state.params, one.params)
        results[name + " mesh"] = dict(trainer.mesh.shape)

    # The other families shard alike: the decoder-only one (prefix-LM rows, the prefix mask
    # included), the encoder-only masked LM and classifier (whose "classes" axis is never
    # split).
    for family, model_config in (("decoder-only", t.DECODER_ONLY_CONFIG),
                                 ("encoder-only", t.ENCODER_ONLY_CONFIG),
                                 ("classifier", t.CLASSIFIER_CONFIG)):
        one, _ = t.train(t.make_trainer(partitioning.MeshConfig(), jax.devices()[:1],
                                        model_config=model_config), 3)
        state, _ = t.train(t.make_trainer(meshes["data=2 fsdp=2 tensor=2"], jax.devices(),
                                          model_config=model_config), 3)
        results[f"{family} data=2 fsdp=2 tensor=2"] = t.relative_difference(state.params,
                                                                            one.params)

    one_device = t.make_trainer(partitioning.MeshConfig(), jax.devices()[:1])
    fsdp = t.make_trainer(t.mesh_config("fsdp"), jax.devices())
    results["fsdp=8 bytes ratio"] = (
        partitioning.per_device_bytes(fsdp.sharded_abstract_state())
        / partitioning.per_device_bytes(one_device.sharded_abstract_state()))

    # Save on data=8, restore on fsdp=4 x tensor=2, continue: same losses as staying put.
    data_trainer = t.make_trainer(meshes["data=8"], jax.devices())
    state, _ = t.train(data_trainer, 2)
    manager = checkpoints.create_manager(tempfile.mkdtemp(), keep=1)
    checkpoints.save(manager, state)
    manager.wait_until_finished()
    _, stayed = t.train(data_trainer, 2, state, first_batch=2)
    other = t.make_trainer(t.mesh_config("fsdp_tensor", fsdp=4), jax.devices())
    restored, _ = checkpoints.restore_latest(manager, other.sharded_abstract_state())
    results["restored sharding"] = list(
        restored.params["decoder_layer_0"]["mlp"]["wi_0"]["kernel"].sharding.spec)
    _, moved = t.train(other, 2, restored, first_batch=2)
    results["losses after restore"] = [stayed, moved]
    print("RESULTS", json.dumps(results))
""")


@pytest.fixture(scope="module")
def eight_device_results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT], capture_output=True,
                            text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("mesh, shape", [
    ("data=8", {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}),
    ("data=2 fsdp=4", {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}),
    ("data=2 fsdp=2 tensor=2", {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1})])
def test_every_rule_table_trains_to_the_one_device_parameters(eight_device_results, mesh,
                                                              shape):
    assert eight_device_results[mesh + " mesh"] == shape
    assert eight_device_results[mesh] <= 1e-5


def test_the_decoder_only_family_trains_to_the_one_device_parameters(eight_device_results):
    assert eight_device_results["decoder-only data=2 fsdp=2 tensor=2"] <= 1e-5


def test_the_encoder_only_family_trains_to_the_one_device_parameters(eight_device_results):
    assert eight_device_results["encoder-only data=2 fsdp=2 tensor=2"] <= 1e-5
    assert eight_device_results["classifier data=2 fsdp=2 tensor=2"] <= 1e-5


def test_fsdp_holds_an_eighth_of_the_state_per_device(eight_device_results):
    # Relative-position tables and step counters stay whole: a little over 1/8.
    assert 0.125 <= eight_device_results["fsdp=8 bytes ratio"] < 0.135


def test_checkpoint_restores_onto_another_mesh_and_trains_the_same(eight_device_results):
    assert eight_device_results["restored sharding"] == ["fsdp", "tensor"]
    stayed, moved = eight_device_results["losses after restore"]
    np.testing.assert_allclose(moved, stayed, rtol=1e-5)


def test_microbatched_step_equals_the_full_batch_step():
    devices = jax.devices()[:1]
    full, full_losses = train(make_trainer(partitioning.MeshConfig(), devices), 2)
    micro, micro_losses = train(make_trainer(partitioning.MeshConfig(), devices, 4), 2)
    np.testing.assert_allclose(micro_losses, full_losses, rtol=1e-6)
    assert relative_difference(micro.params, full.params) <= 1e-5


def test_adafactor_factored_moments_follow_their_parameter():
    config = models.T5Config(vocab_size=256, d_model=128, num_heads=2, head_dim=64, d_ff=256,
                             num_encoder_layers=1, num_decoder_layers=1)
    trainer = make_trainer(mesh_config("fsdp_tensor", fsdp=1, tensor=1), jax.devices()[:1],
                           model_config=config)
    factored = trainer.state_shardings.opt_state[0]
    kernel = ("decoder_layer_0", "mlp", "wi_0", "kernel")  # [embed, mlp] = [128, 256]
    param, row, col = trainer.state_shardings.params, factored.v_row, factored.v_col
    for key in kernel:
        param, row, col = param[key], row[key], col[key]
    assert param.spec == PartitionSpec("fsdp", "tensor")
    assert row.spec == PartitionSpec("fsdp") and col.spec == PartitionSpec("tensor")


@pytest.mark.parametrize("config, message", [
    (dict(data=3), "mesh \\(data=3, fsdp=1, tensor=1, expert=1\\) needs 3 devices, but 1 are "
                   "available"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
    (dict(rule_overrides={"batch": "pipeline"}), "names unknown mesh axis 'pipeline'"),
    (dict(rule_table="zero3"), "^partitioning.MeshConfig.rule_table must be one of 'data', "
                               "'fsdp', 'fsdp_tensor', 'expert', got 'zero3'$"),
    (dict(rule_overrides={"vocabs": None}), "logical axis 'vocabs' has no rule to override; "
                                            "logical axes are batch, length, embed, "),
    (dict(dcn_data=2), "1 devices do not split into dcn_data = 2 slices"),
])
def test_bad_mesh_is_one_line(config, message):
    with pytest.raises(ValueError, match=message):
        partitioning.create_mesh(partitioning.MeshConfig(**config), jax.devices()[:1])


def test_dcn_slices_must_match_the_processes():
    # One process of 8 devices forms a single slice; two processes are tested in
    # multihost_test (dcn_data = 2 there).
    if len(jax.devices()) < 2:
        devices = jax.devices() * 2  # The check reads process indices only.
    else:
        devices = jax.devices()[:2]
    with pytest.raises(ValueError, match="dcn_data = 2, but the devices form 1 slice\\(s\\) "
                                         "in 1 process\\(es\\): set dcn_data to one"):
        partitioning.create_mesh(partitioning.MeshConfig(dcn_data=2), devices)


def test_logical_axis_without_a_rule_is_named():
    rules = tuple(rule for rule in partitioning.MeshConfig().rules if rule[0] != "mlp")
    mesh = partitioning.create_mesh(partitioning.MeshConfig(), jax.devices()[:1])
    with pytest.raises(ValueError, match="logical axis 'mlp' has no partitioning rule"):
        trainer_lib.param_shardings(models.EncoderDecoderModel(trainer_test.CONFIG), mesh, rules)


def test_rule_overrides_replace_single_rules_of_the_selected_table():
    config = partitioning.MeshConfig(rule_table="fsdp",
                                     rule_overrides={"vocab": "tensor", "batch": ["data"]})
    assert config.rule_table is partitioning.RuleTable.FSDP
    table = dict(partitioning.RULE_TABLES[partitioning.RuleTable.FSDP])
    assert dict(config.rules) == {**table, "vocab": "tensor", "batch": ("data",)}
    assert [logical for logical, _ in config.rules] == list(table)


def test_runs_without_a_partitioning_file_get_the_fsdp_tensor_table():
    assert partitioning.MeshConfig().rules == mesh_config("fsdp_tensor").rules


def test_parameter_table_shows_logical_and_mesh_axes_and_bytes_per_device():
    from t5x_lite import metrics_io
    trainer = make_trainer(mesh_config("fsdp_tensor", fsdp=1, tensor=1), jax.devices()[:1])
    state = trainer.sharded_abstract_state()
    table = metrics_io.parameter_table(state.params, trainer.model.logical_axes()).splitlines()
    row = next(line for line in table if line.startswith("decoder_layer_0/mlp/wo/kernel "))
    assert row.split()[1:] == ["64x32", "2,048", "(mlp,", "embed)", "(tensor,", "fsdp)"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(state.params))
    assert table[-1].split() == ["total", f"{count:,d}"]
    line = metrics_io.state_bytes_line(state)
    params_mib = count * 4 / 2**20
    assert line.startswith(f"Per device: parameters {params_mib:,.1f} MiB + optimizer state ")

