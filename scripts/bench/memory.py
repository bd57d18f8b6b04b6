"""`memory`: how a train step's memory grows with the encoder length, under each encoder
attention (T5's full attention, LongT5's local and transient-global), read from XLA's
memory_analysis() of the step compiled for this machine's devices: nothing is allocated or
run, so lengths whose full attention would not fit are measured too."""
import argparse
import dataclasses

from bench import flags
from bench import presets
from bench import rows as rows_lib

ATTENTIONS = ("full", "local", "transient_global")
LENGTHS = (2048, 4096, 8192, 16384)
MIB = 2**20


def add_parser(commands) -> None:
    parser = commands.add_parser("memory", help="compiled train-step memory per encoder "
                                 "length and encoder attention")
    flags.add_preset(parser)
    parser.add_argument("--batch", type=flags.int_at_least(1), default=1, help="rows per batch")
    parser.add_argument("--inputs", type=flags.int_at_least(2), nargs="+", default=LENGTHS,
                        help="encoder lengths L in tokens")
    parser.add_argument("--targets", type=flags.int_at_least(2), default=128,
                        help="decoder length T in tokens")
    parser.add_argument("--attention", choices=ATTENTIONS, nargs="+", default=ATTENTIONS,
                        help="T5Config.encoder_attention values to compile the preset with")
    flags.add_json(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    presets.check_preset(args.preset)
    rows = []
    for attention in args.attention:
        previous = None
        for inputs in sorted(args.inputs):
            row = measure_memory(args.preset, args.batch, inputs, args.targets, attention)
            if previous:
                # 2 per doubling for memory linear in L, 4 for quadratic.
                row["temp_growth"] = row["temp_bytes"] / previous["temp_bytes"]
                row["length_growth"] = inputs / previous["inputs"]
            rows.append(row)
            previous = row
    return rows


def measure_memory(preset: str, batch: int, inputs: int, targets: int,
                   attention: str) -> dict:
    """The compiled train step's memory: `temp_bytes` (activations kept for the backward
    pass and scratch) and `total_bytes` (that plus arguments and outputs, less what they
    share, as t5x_lite.precompile counts a device's total)."""
    import jax
    import jax.numpy as jnp
    from t5x_lite import launch
    from t5x_lite import models
    from t5x_lite import optimizers
    from t5x_lite import partitioning
    from t5x_lite import trainer as trainer_lib

    config = dataclasses.replace(presets.model_config_of(preset), encoder_attention=attention)
    if config.architecture is not models.Architecture.ENCODER_DECODER:
        raise launch.UsageError(f"memory compiles encoder-decoder batches (an encoder of "
                                f"--inputs tokens): {preset} is "
                                f"{config.architecture.value.replace('_', '-')}, pass a "
                                "t5_* or longt5_* preset")
    config.check_encoder_length(inputs)
    trainer = trainer_lib.build_trainer(config, optimizers.rsqrt_schedule(),
                                        optimizers.adafactor, partitioning.MeshConfig(), seed=0)
    sharding = partitioning.batch_sharding(trainer.mesh)
    arrays = presets.packed_shaped_batch(batch, inputs, targets, config.vocab_size)
    abstract_batch = {key: jax.ShapeDtypeStruct(value.shape, jnp.int32, sharding=sharding)
                      for key, value in arrays.items()}
    with trainer_lib.mesh_context(trainer.mesh, trainer.rules):
        compiled = trainer.jitted_train_step().lower(trainer.sharded_abstract_state(),
                                                     abstract_batch).compile()
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return {"what": "memory", "preset": preset, "encoder_attention": attention,
            "device": rows_lib.device_name(), "batch": batch, "inputs": inputs,
            "targets": targets, "temp_bytes": memory.temp_size_in_bytes, "total_bytes": total,
            "temp_mib": memory.temp_size_in_bytes / MIB, "total_mib": total / MIB}
