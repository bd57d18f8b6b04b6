"""`train`: the median train-step time of a preset and the figures that follow from it
(tokens/s, examples/s, model FLOPs, the matmul peak, MFU), optionally beside transformers'."""
import argparse
import statistics
from typing import Callable

from bench import flags
from bench import hf_compare
from bench import peak
from bench import presets
from bench import rows as rows_lib
from bench import timing
from t5x_lite import launch

TRAIN_STEPS, TRAIN_WARMUP_STEPS = 10, 2  # Defaults: timed and untimed steps after compiling.


def add_step_counts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=flags.int_at_least(1), default=TRAIN_STEPS,
                        help="timed steps")
    parser.add_argument("--warmup", type=flags.int_at_least(0), default=TRAIN_WARMUP_STEPS,
                        help="untimed steps after compilation")


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="median train-step time and throughput")
    flags.add_preset(parser)
    flags.add_sizes(parser)
    add_step_counts(parser)
    parser.add_argument("--optimizer", choices=presets.OPTIMIZERS, default=None,
                        help="default adafactor (adamw with --compare-hf)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="activation dtype (parameters stay float32); the peak matmul is "
                        "measured in it too")
    parser.add_argument("--attention", default="auto",
                        choices=("auto", "einsum", "xla", "cudnn", "pallas_tpu"),
                        help="T5Config.attention (t5x_lite/kernels.py): auto is the backend's "
                        "choice (CPU einsum, GPU cudnn, TPU pallas_tpu)")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also train transformers' T5 on the same shapes (AdamW, float32), "
                        "timed in turn with ours")
    parser.add_argument("--peak-size", type=flags.int_at_least(0),
                        default=peak.PEAK_MATMUL_SIZE,
                        help="N of the N x N matmul that measures the peak FLOP/s for MFU "
                        "(0: no FLOPs, peak or MFU)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    presets.check_preset(args.preset)
    optimizer = args.optimizer or ("adamw" if args.compare_hf else "adafactor")
    if args.compare_hf:
        hf_compare.check_transformers()
        if args.dtype != "float32" or optimizer != "adamw":
            raise launch.UsageError("--compare-hf trains both in float32 with AdamW: drop "
                                    "--dtype and --optimizer")
    overrides = {"attention": args.attention} if args.attention != "auto" else {}
    return measure_train(args.preset, args.batch, args.inputs, args.targets, args.steps,
                         args.warmup, optimizer, args.compare_hf, args.peak_size, args.dtype,
                         **overrides)


def step_timer(preset: str, batch: int, inputs: int, targets: int, optimizer: str,
               **overrides) -> Callable[[], float]:
    """A function running one train step of the preset on a packed-shaped batch, waited
    for; returns its seconds. The first call compiles."""
    _, state, train_step, device_batch = presets.train_setup(preset, batch, inputs, targets,
                                                             optimizer, **overrides)

    def step() -> float:
        nonlocal state
        state, seconds = timing.timed_step(train_step, state, device_batch)
        return seconds

    return step


def measure_train(preset: str, batch: int, inputs: int, targets: int, steps: int,
                  warmup: int, optimizer: str = "adafactor", compare_hf: bool = False,
                  peak_size: int = 0, dtype: str = "float32", **overrides) -> list[dict]:
    """One row per implementation: the median of `steps` train steps after compiling and
    `warmup` steps. With `compare_hf` transformers' T5 trains on the same shapes (AdamW,
    float32, no dropout) in turn with ours (A B A B ...). With `peak_size` > 0 the rows also
    give model FLOPs, the matmul peak and MFU, the peak matmul timed in the same turns
    (A B P A B P ...) so that both rates see the machine in the same state."""
    import jax.numpy as jnp
    from t5x_lite import models

    model_overrides = {"activation_dtype": jnp.dtype(dtype), **overrides}
    config = presets.model_config_of(preset, **model_overrides)
    if compare_hf and config.architecture is not models.Architecture.ENCODER_DECODER:
        raise launch.UsageError(f"--compare-hf times transformers' T5, an encoder-decoder: "
                                f"{preset} is {config.architecture.value.replace('_', '-')}, "
                                "drop --compare-hf")
    timers = {"t5x_lite": step_timer(preset, batch, inputs, targets, optimizer,
                                     **model_overrides)}
    if compare_hf:
        timers["transformers"] = hf_compare.hf_train_timer(
            config, presets.packed_shaped_batch(batch, inputs, targets, config.vocab_size))
    if peak_size:
        timers["peak"] = peak.peak_matmul_timer(config.activation_dtype, peak_size)
    # Compilation, warm-up, then timed steps.
    seconds = timing.time_in_turn(timers, 1 + warmup + steps)
    rows = [train_row(preset, who, batch, inputs, targets, steps, seconds[who], optimizer,
                      {"dtype": dtype, **overrides}) for who in timers if who != "peak"]
    if peak_size:
        add_mfu(rows, config, peak.peak_flops(peak_size,
                                              statistics.median(seconds["peak"][-steps:])))
    if compare_hf:
        rows[0]["ratio_to_transformers"] = rows[1]["step_seconds"] / rows[0]["step_seconds"]
    return rows


def train_row(preset: str, who: str, batch: int, inputs: int, targets: int, steps: int,
              seconds: list[float], optimizer: str, overrides: dict) -> dict:
    """The figures of one implementation from its `seconds` per call (the first compiling)."""
    step_seconds = statistics.median(seconds[-steps:])
    return {"what": "train", "preset": preset, "implementation": who,
            "device": rows_lib.device_name(),
            "optimizer": "adamw" if who == "transformers" else optimizer, "batch": batch,
            "inputs": inputs, "targets": targets, "steps": steps,
            "step_seconds": step_seconds,
            "tokens_per_second": batch * (inputs + targets) / step_seconds,
            "examples_per_second": batch / step_seconds, "compile_seconds": seconds[0],
            **overrides}


def add_mfu(rows: list[dict], config, peak_flops: float) -> None:
    """Adds model FLOPs per step (t5x_lite/flops.py's formula, as the training loop's MFU),
    the peak FLOP/s and MFU to each train row."""
    from t5x_lite import flops as flops_lib

    for row in rows:
        model_flops = flops_lib.model_flops_per_step(config, row["batch"], row["inputs"],
                                                     row["targets"])
        row.update(model_flops_per_step=model_flops, peak_flops=peak_flops,
                   mfu=model_flops / row["step_seconds"] / peak_flops)
