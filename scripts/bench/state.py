"""`state`: what one device holds of the parameters and optimizer state under each rule
table of gin/partitioning/, worked out from the shardings (nothing is allocated)."""
import argparse
import os

from bench import flags
from bench import presets
from t5x_lite import launch

TABLE_FILES = ("data", "fsdp", "fsdp_tensor")  # The first is what the others are compared with.


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "state", help="per-device parameter + optimizer bytes under each rule table")
    flags.add_preset(parser)
    flags.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    presets.check_preset(args.preset)
    config = presets.model_config_of(args.preset)
    rows = [state_row(args.preset, config, table) for table in TABLE_FILES]
    for row in rows:
        row["ratio_to_data"] = row["total_mib"] / rows[0]["total_mib"]
    return rows


def state_row(preset: str, config, table: str) -> dict:
    """Per-device bytes of the parameters and Adafactor's state under gin/partitioning/
    `table`.gin on all devices."""
    import jax
    from t5x_lite import optimizers
    from t5x_lite import partitioning
    from t5x_lite import trainer as trainer_lib

    mesh_config = presets.bound_by_file(
        os.path.join(launch.GIN_DIR, "partitioning", f"{table}.gin"), partitioning.MeshConfig)
    trainer = trainer_lib.build_trainer(config, optimizers.rsqrt_schedule(),
                                        optimizers.adafactor, mesh_config, seed=0)
    state = trainer.sharded_abstract_state()
    parameters = partitioning.per_device_bytes(state.params)
    optimizer = partitioning.per_device_bytes(state.opt_state)
    return {"what": "state", "preset": preset, "rules": table,
            "devices": jax.device_count(), "mesh": dict(trainer.mesh.shape),
            "parameter_bytes": parameters, "optimizer_bytes": optimizer,
            "total_mib": (parameters + optimizer) / 2**20}
