"""Golden sharding maps: for each gin/partitioning/ rule table, the mesh axes of every parameter
and optimizer-state leaf of a scanned dense T5 and a Switch MoE, compared line by line with
tests/golden/shardings_<table>.txt. A change to a rule, a logical axis or a parameter shows up
here as a diff to review. Regenerate after an intended change with
    T5X_LITE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/sharding_golden_test.py
"""
import difflib
import os

import gin
import pytest
from jax.sharding import AbstractMesh

from t5x_lite import metrics_io
from t5x_lite import models
from t5x_lite import moe
from t5x_lite import optimizers
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, "gin", "partitioning")
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
UPDATE_ENV_VAR = "T5X_LITE_UPDATE_GOLDEN"
REGENERATE = f"{UPDATE_ENV_VAR}=1 .venv/bin/python -m pytest -q tests/sharding_golden_test.py"

# Mesh sizes bound over each gin file's, for 8 (abstract) devices: every axis the table splits
# parameters or batches over is > 1 where 8 devices allow it, so the byte counts below show
# each split.
MESH_SIZES = {
    "data": dict(data=2, expert=4),
    "fsdp": dict(data=2, fsdp=4),
    "fsdp_tensor": dict(data=1, fsdp=2, tensor=2, expert=2),
    "expert": dict(data=2, expert=4),
}
NUM_DEVICES = 8
# Widths of 128 and more, so Adafactor factors the second moments of the matrices (its
# min_dim_size_to_factor) and the row and column statistics appear.
DENSE = models.T5Config(vocab_size=256, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                        num_encoder_layers=2, num_decoder_layers=2, scan_layers=True)
SWITCH = models.T5Config(vocab_size=256, d_model=128, num_heads=4, head_dim=32, d_ff=256,
                         num_encoder_layers=2, num_decoder_layers=2,
                         moe=moe.MoeConfig(num_experts=8, sparse_every=2))
MODELS = {"dense T5 v1.1, scan_layers": DENSE, "Switch MoE, 8 experts": SWITCH}


def gin_mesh_config(table: str) -> partitioning.MeshConfig:
    """The MeshConfig that gin/partitioning/<table>.gin binds, with MESH_SIZES[table]."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(GIN_DIR, f"{table}.gin")], None,
            finalize_config=False)
        gin.parse_config(["from __gin__ import dynamic_registration",
                          "from t5x_lite import partitioning",
                          *(f"partitioning.MeshConfig.{axis} = {size}"
                            for axis, size in MESH_SIZES[table].items())])
        return gin.get_configurable(partitioning.MeshConfig)()
    finally:
        gin.clear_config()


def sharding_map(table: str) -> str:
    """The golden text for one rule table: its rules, then per model the parameter and the
    optimizer-state tables (metrics_io.parameter_table) and the bytes one device holds."""
    config = gin_mesh_config(table)
    shape = config.shape(NUM_DEVICES)
    mesh = AbstractMesh(shape, partitioning.MESH_AXES)
    lines = [f"# gin/partitioning/{table}.gin on an abstract mesh of {NUM_DEVICES} devices: "
             + ", ".join(f"{axis}={size}" for axis, size in zip(partitioning.MESH_AXES, shape)),
             f"# Regenerate: {REGENERATE}", "", "rules"]
    lines += [f"  {logical}: {mesh_axes!r}" for logical, mesh_axes in config.rules]
    schedule = optimizers.rsqrt_schedule(warmup_steps=10)
    for name, model_config in MODELS.items():
        moe.check_expert_axis(model_config.moe, mesh.shape["expert"])
        trainer = trainer_lib.Trainer(
            model=models.EncoderDecoderModel(model_config),
            optimizer=optimizers.adafactor(schedule), learning_rate=schedule, mesh=mesh,
            rules=config.rules)
        state = trainer.sharded_abstract_state()
        lines += ["", f"{name}: parameters",
                  metrics_io.parameter_table(state.params, trainer.model.logical_axes()),
                  "", f"{name}: Adafactor state",
                  metrics_io.parameter_table(state.opt_state),
                  "", f"{name}: bytes per device: parameters "
                  f"{partitioning.per_device_bytes(state.params):,d}, optimizer state "
                  f"{partitioning.per_device_bytes(state.opt_state):,d}"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("table", sorted(MESH_SIZES))
def test_shardings_match_the_golden_file(table):
    path = os.path.join(GOLDEN_DIR, f"shardings_{table}.txt")
    actual = sharding_map(table)
    if os.environ.get(UPDATE_ENV_VAR) == "1":
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as file:
            file.write(actual)
    if not os.path.exists(path):
        pytest.fail(f"{path} does not exist: create it with {REGENERATE}")
    with open(path) as file:
        expected = file.read()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True),
                                            actual.splitlines(keepends=True),
                                            f"golden/shardings_{table}.txt", "now"))
        pytest.fail(f"shardings under the {table!r} rule table changed (- golden, + now); if "
                    f"intended, regenerate with {REGENERATE}\n{diff}", pytrace=False)


def test_each_rule_table_has_its_gin_file_and_golden_file():
    gin_files = {name.removesuffix(".gin") for name in os.listdir(GIN_DIR)
                 if name.endswith(".gin")}
    assert gin_files == set(MESH_SIZES) == {table.value for table in partitioning.RuleTable}
    for table in partitioning.RuleTable:
        assert gin_mesh_config(table.value).rule_table is table
