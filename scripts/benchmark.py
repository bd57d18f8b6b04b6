"""Benchmarks of the train step and the input pipeline, measured on this machine in this run.

  python scripts/benchmark.py train --preset t5_1_1_small --batch 8 --inputs 512 --targets 114 \\
      [--compare-hf]
  python scripts/benchmark.py --quick     # seconds: the train figures of a tiny model
  python scripts/benchmark.py input --tasks stdlib_span_corruption --cores 1 \\
      --train-preset t5_1_1_small --batch 8 --inputs 512 --targets 114
  python scripts/benchmark.py remat --preset t5_1_1_small --scan
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python scripts/benchmark.py state --preset t5_1_1_small   # 8 CPU devices stand in
  python scripts/benchmark.py moe --preset switch_tiny --batch 8 --inputs 512 --targets 114
  python scripts/benchmark.py decode --preset t5_1_1_small --batch 8 --inputs 512 --targets 114 \\
      [--compare-hf]
  python scripts/benchmark.py checkpoint --preset t5_1_1_small --batch 8 --inputs 512 --targets 114

Figures (each measured in the run that prints it; add --json for one JSON object per line):
  train  step_seconds         median wall-clock seconds of one train step (forward, backward,
                              Adafactor update; float32) on a device-resident packed-shaped
                              batch, each step waited for; compilation and --warmup steps excluded
         tokens_per_second    batch * (inputs + targets) / step_seconds: token slots per second
         examples_per_second  batch / step_seconds: packed rows consumed per second
         compile_seconds      wall-clock seconds of the first call (compilation plus one step)
         model_flops_per_step matmul FLOPs of one step (forward + backward; formula in
                              t5x_lite/flops.py, as the training loop's MFU)
         peak_flops           FLOP/s of --peak-size square matmuls in --dtype, one on every
                              device at once: the median of calls timed between the train
                              steps
         mfu                  model_flops_per_step / step_seconds / peak_flops
         ratio_to_transformers   with --compare-hf: transformers' step_seconds / ours (both
                              AdamW, float32, no dropout, same shapes, timed A B A B ...)
  input  examples_per_second  packed rows per second from data.pipeline.get_batches on --cores
                              CPU cores: examples / seconds over the timed window, after
                              --warmup batches (start-up and shuffle-buffer fill) are excluded
         cpu_seconds          CPU time (all threads) the pipeline's process spent in that
                              window: at most cores * seconds when the pinning holds
         ratio_to_train       input examples_per_second / train examples_per_second; the
                              project requires >= 5 (at_least_5x)
  remat  time_ratio_to_none   train step_seconds under each remat policy / under "none"
  state  parameter_bytes, optimizer_bytes   what one device holds under each rule table of
                              gin/partitioning/ (from the shardings; nothing is allocated)
         ratio_to_data        that total / the data-parallel total
  decode tokens_per_second    batch * targets / decode_seconds for greedy and beam search
                              (a beam's W hypotheses count once), with a random-weight model
                              forced to decode all `targets` tokens; decode_seconds is the
                              median of --repeats jitted predict_batch calls after compiling
         ratio_to_transformers   with --compare-hf: t5x_lite tokens/s / transformers' (same
                              weights, inputs and lengths; generate forced to `targets` new
                              tokens; the two timed in turn, A B A B ...)
  checkpoint  step_seconds      median plain train step (as train), between saves
         save_step_seconds    median step that starts an asynchronous save, as the training
                              loop does it: train step, the input position's state(), the
                              save call (it copies the state to host memory), then waiting
         save_step_slowdown   save_step_seconds / step_seconds - 1; required < 0.2
         steps_during_save, during_save_slowdown   steps run while the save still wrote in
                              the background (per save), and their median slowdown
         blocking_save_seconds   one save waited for to the end; checkpoint_mib its size
                              on disk, state_mib the parameters and optimizer state's
  moe    the train figures of an MoE preset and of its dense counterpart (same widths), plus
         parameters, active_parameters   all parameters, and those one token passes through
                              (each sparse MLP counted as its K chosen experts and its router)
         dispatch_overhead    MoE step_seconds / dense step_seconds: with top-1 routing the
                              two do equal work per token, so this is the cost of routing,
                              dispatch and combine (and of the tokens dropped for capacity);
                              the einsum dispatch grows with group_size (--group-size)
"""
import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time
from typing import Callable

# Before TensorFlow or JAX is imported (here, in the measuring children, or by gin).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from t5x_lite import host_memory  # noqa: E402

# Before JAX creates its CPU client, as the entry points do (host_memory.py says why).
host_memory.reuse_freed_memory_on_cpu()

# TensorFlow and JAX are imported inside the functions that use them: spawn re-imports this
# module in each input child, which must pin its cores before TensorFlow loads.
from t5x_lite import launch  # noqa: E402  (gin, absl and jax; no TensorFlow yet)

REQUIRED_INPUT_RATIO = 5.0  # The input pipeline must outpace the train step this many times.
MAX_SAVE_SLOWDOWN = 0.2  # A step that starts an asynchronous save may take 20% longer.
PEAK_MATMUL_SIZE = 4096  # 137 GFLOP per matmul: long enough to reach the peak on CPUs.
QUICK_ARGS = ["train", "--preset", "t5_1_1_tiny", "--batch", "2", "--inputs", "64",
              "--targets", "16", "--steps", "2", "--warmup", "1", "--peak-size", "1024",
              "--json"]
DEFAULT_TASKS = "stdlib_span_corruption,stdlib_ul2,stdlib_prefix_lm,stdlib_bart"
PRESET_DIR = os.path.join(launch.GIN_DIR, "models")
TRAIN_STEPS, TRAIN_WARMUP_STEPS = 10, 2  # Defaults: timed and untimed steps after compiling.


class ArgumentParser(argparse.ArgumentParser):
    """Reports bad flags as one `error:` line (via launch's handling) instead of usage text."""

    def error(self, message):
        raise launch.UsageError(f"{message} (see: python {self.prog} --help)")


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


# ----------------------------------------------------------------------------- output


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def print_rows(rows: list[dict], as_json: bool) -> None:
    """One JSON object per row, or one aligned table per kind of measurement ("what")."""
    if as_json:
        for row in rows:
            print(json.dumps(row), flush=True)
        return
    for what in dict.fromkeys(row["what"] for row in rows):
        group = [row for row in rows if row["what"] == what]
        keys = list(dict.fromkeys(key for row in group for key in row))
        cells = [keys] + [[format_value(row.get(key, "")) for key in keys] for row in group]
        widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
        for line in cells:
            print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        print(flush=True)


# ----------------------------------------------------------------------------- train


def available_presets() -> list[str]:
    return sorted(name[:-len(".gin")] for name in os.listdir(PRESET_DIR) if name.endswith(".gin"))


def check_preset(preset: str) -> None:
    if preset not in available_presets():
        raise launch.UsageError(f"unknown preset {preset!r}: choose one of "
                                f"{', '.join(available_presets())} (files in {PRESET_DIR})")


def model_config_of(preset: str, **overrides):
    """The preset's models.T5Config as its gin file binds it (dropout included), in float32,
    with `overrides` of its fields."""
    import gin
    import jax.numpy as jnp
    from t5x_lite import models

    check_preset(preset)
    # The preset alone, without launch.parse_gin's imports of the data pipeline: the train
    # step's benchmark then runs where TensorFlow and seqio are not installed (GPU hosts).
    gin.clear_config()
    gin.parse_config_file(os.path.join(PRESET_DIR, f"{preset}.gin"))
    try:
        config = gin.get_configurable(models.T5Config)()
    finally:
        gin.clear_config()
    return dataclasses.replace(config, **{"activation_dtype": jnp.float32, **overrides})


def packed_shaped_batch(batch: int, inputs: int, targets: int, vocab_size: int) -> dict:
    """Random tokens in [1, vocab_size) in every key of pipeline.BATCH_KEYS, one segment per
    row: what a fully packed batch looks like to the train step."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, length in (("encoder", inputs), ("decoder", targets)):
        arrays[f"{prefix}_segment_ids"] = np.ones((batch, length), np.int32)
        arrays[f"{prefix}_positions"] = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
    arrays["encoder_input_tokens"] = rng.integers(1, vocab_size, (batch, inputs), np.int32)
    arrays["decoder_target_tokens"] = rng.integers(1, vocab_size, (batch, targets), np.int32)
    arrays["decoder_input_tokens"] = np.pad(arrays["decoder_target_tokens"][:, :-1],
                                            ((0, 0), (1, 0)))
    arrays["decoder_loss_weights"] = np.ones((batch, targets), np.int32)
    return arrays


OPTIMIZERS = ("adafactor", "adamw")


def train_setup(preset: str, batch: int, inputs: int, targets: int,
                optimizer: str = "adafactor", **overrides):
    """(trainer, initial state, compiled train step, device-resident packed-shaped batch)
    for the preset, trained as gin/runs/pretrain.gin trains it: Adafactor with T5's rsqrt
    schedule (the rate's value does not change the step's cost), or AdamW (as
    transformers is trained with --compare-hf), data parallel over all devices."""
    import jax
    from t5x_lite import optimizers
    from t5x_lite import partitioning
    from t5x_lite import trainer as trainer_lib

    if batch % jax.device_count():
        raise launch.UsageError(f"--batch {batch} must divide evenly over the "
                                f"{jax.device_count()} devices: pass a multiple of it")
    config = model_config_of(preset, **overrides)
    transform = optimizers.adamw if optimizer == "adamw" else optimizers.adafactor
    trainer = trainer_lib.build_trainer(config, optimizers.rsqrt_schedule(), transform,
                                  partitioning.MeshConfig(), seed=0)
    arrays = packed_shaped_batch(batch, inputs, targets, config.vocab_size)
    device_batch = partitioning.global_batch(arrays, trainer.mesh)
    return trainer, trainer.init_state(seed=0), trainer.compile_train_step(), device_batch


def timed_step(train_step: Callable, state, device_batch, after: Callable | None = None):
    """(new state, wall-clock seconds) of one train step, waited for; `after(new state)` runs
    once the step is dispatched, as the training loop saves a checkpoint there."""
    import jax

    start = time.perf_counter()
    state, metrics = train_step(state, device_batch)
    if after is not None:
        after(state)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def measure_train(preset: str, batch: int, inputs: int, targets: int, steps: int,
                  warmup: int, optimizer: str = "adafactor", compare_hf: bool = False,
                  peak_size: int = 0, dtype: str = "float32", **overrides) -> list[dict]:
    """One row per implementation: the median of `steps` train steps after compiling and
    `warmup` steps. With `compare_hf` transformers' T5 trains on the same shapes (AdamW,
    float32, no dropout) in turn with ours (A B A B ...). With `peak_size` > 0 the rows also
    give model FLOPs, the matmul peak and MFU, the peak matmul timed in the same turns
    (A B P A B P ...) so that both rates see the machine in the same state."""
    import jax.numpy as jnp

    from t5x_lite import flops as flops_lib

    _, state, train_step, device_batch = train_setup(
        preset, batch, inputs, targets, optimizer, activation_dtype=jnp.dtype(dtype),
        **overrides)

    def ours() -> float:
        nonlocal state
        state, seconds = timed_step(train_step, state, device_batch)
        return seconds

    runs = {"t5x_lite": ours}
    config = model_config_of(preset, activation_dtype=jnp.dtype(dtype), **overrides)
    if compare_hf:
        runs["transformers"] = hf_train_timer(
            config, packed_shaped_batch(batch, inputs, targets, config.vocab_size))
    if peak_size:
        runs["peak"] = peak_matmul_timer(config.activation_dtype, peak_size)
    seconds = {who: [] for who in runs}
    for _ in range(1 + warmup + steps):  # Compilation, warm-up, then timed steps.
        for who, run in runs.items():
            seconds[who].append(run())
    rows = [train_row(preset, who, batch, inputs, targets, steps, seconds[who], optimizer,
                      {"dtype": dtype, **overrides}) for who in runs if who != "peak"]
    if peak_size:
        flops = flops_lib.model_flops_per_step(config, batch, inputs, targets)
        peak = peak_flops(peak_size, statistics.median(seconds["peak"][-steps:]))
        for row in rows:
            row.update(model_flops_per_step=flops, peak_flops=peak,
                       mfu=flops / row["step_seconds"] / peak)
    if compare_hf:
        rows[0]["ratio_to_transformers"] = rows[1]["step_seconds"] / rows[0]["step_seconds"]
    return rows


def train_row(preset: str, who: str, batch: int, inputs: int, targets: int, steps: int,
              seconds: list[float], optimizer: str, overrides: dict) -> dict:
    step_seconds = statistics.median(seconds[-steps:])
    return {"what": "train", "preset": preset, "implementation": who, "device": device_name(),
            "optimizer": "adamw" if who == "transformers" else optimizer, "batch": batch,
            "inputs": inputs, "targets": targets, "steps": steps,
            "step_seconds": step_seconds,
            "tokens_per_second": batch * (inputs + targets) / step_seconds,
            "examples_per_second": batch / step_seconds, "compile_seconds": seconds[0],
            **overrides}


def peak_matmul_operands(dtype, size: int) -> list:
    """Two random [devices, size, size] arrays in `dtype`, split so that each device holds
    one `size` x `size` matrix of each."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    per_device = NamedSharding(Mesh(devices, ("devices",)), PartitionSpec("devices"))
    shape = (len(devices), size, size)
    random = jax.jit(lambda key: jax.random.normal(key, shape, dtype), out_shardings=per_device)
    return [random(jax.random.key(i)) for i in range(2)]


def peak_matmul_timer(dtype, size: int) -> Callable[[], float]:
    """A function running one jitted `size` x `size` by `size` x `size` matmul in `dtype` on
    every device at once, waited for; returns its seconds (see peak_flops). All devices run
    together so that devices sharing hardware (CPU devices forced onto the same cores) are
    not each credited with all of it."""
    import jax
    import jax.numpy as jnp

    matrices = peak_matmul_operands(dtype, size)
    matmul = jax.jit(jnp.matmul)
    return lambda: timed(lambda: jax.block_until_ready(matmul(*matrices)))


def peak_flops(size: int, seconds: float) -> float:
    """FLOP/s of the devices' `size`-cubed matmuls running together in `seconds`: the rate
    MFU divides by."""
    import jax

    return 2 * size**3 / seconds * jax.device_count()


def hf_train_timer(config, arrays: dict) -> Callable[[], float]:
    """A function running one transformers T5ForConditionalGeneration train step (forward,
    backward, torch AdamW; float32, no dropout) on the batch's tokens; returns its seconds."""
    import dataclasses as dc
    import torch
    import transformers
    from t5x_lite import hf

    hf_config = hf.config_to_hf(dc.replace(config, dropout_rate=0.0))
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8,
                                  weight_decay=0.01)
    tokens = {name: torch.from_numpy(arrays[key]).long() for name, key in (
        ("input_ids", "encoder_input_tokens"), ("decoder_input_ids", "decoder_input_tokens"),
        ("labels", "decoder_target_tokens"))}

    def step() -> float:
        start = time.perf_counter()
        model(**tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # As optimizers.adamw does.
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def device_name() -> str:
    import jax
    return f"{jax.device_count()}x {jax.devices()[0].device_kind}"


def run_train(args: argparse.Namespace) -> list[dict]:
    check_preset(args.preset)
    optimizer = args.optimizer or ("adamw" if args.compare_hf else "adafactor")
    if args.compare_hf:
        check_transformers()
        if args.dtype != "float32" or optimizer != "adamw":
            raise launch.UsageError("--compare-hf trains both in float32 with AdamW: drop "
                                    "--dtype and --optimizer")
    overrides = {"attention": args.attention} if args.attention != "auto" else {}
    return measure_train(args.preset, args.batch, args.inputs, args.targets, args.steps,
                         args.warmup, optimizer, args.compare_hf, args.peak_size, args.dtype,
                         **overrides)


def run_remat(args: argparse.Namespace) -> list[dict]:
    """The train step under each remat policy (layers scanned or not), as ratios to none."""
    check_preset(args.preset)
    rows = [measure_train(args.preset, args.batch, args.inputs, args.targets, args.steps,
                          args.warmup, remat_policy=policy, scan_layers=args.scan)[0]
            for policy in ("none", "minimal", "full")]
    for row in rows:
        row["time_ratio_to_none"] = row["step_seconds"] / rows[0]["step_seconds"]
    return rows


# Each MoE preset's dense model: the same widths and layers, dense MLPs everywhere.
DENSE_COUNTERPARTS = {"switch_tiny": "t5_1_1_tiny", "st_moe_tiny": "t5_1_1_tiny",
                      "switch_base": "t5_1_0_base", "st_moe_base": "t5_1_1_base"}


def parameter_counts(config) -> tuple[int, int]:
    """(all parameters, parameters one token passes through): an expert kernel counts
    num_selected / num_experts of itself (tokens choose; experts choose: capacity decides)."""
    import jax
    import numpy as np
    from t5x_lite import models

    shapes = jax.eval_shape(models.EncoderDecoderModel(config).init, jax.random.key(0))
    total = active = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        count = int(np.prod(leaf.shape))
        total += count
        if any(getattr(key, "key", None) == "experts" for key in path):
            count = count * config.moe.num_selected // config.moe.num_experts
        active += count
    return total, active


def run_moe(args: argparse.Namespace) -> list[dict]:
    """An MoE preset's train step next to its dense counterpart's, measured in this run."""
    if args.preset not in DENSE_COUNTERPARTS:
        raise launch.UsageError(f"--preset {args.preset!r} is not an MoE preset: choose one of "
                                f"{', '.join(DENSE_COUNTERPARTS)}")
    rows = []
    for preset in (DENSE_COUNTERPARTS[args.preset], args.preset):
        config, overrides = model_config_of(preset), {}
        if config.moe and args.group_size:
            overrides["moe"] = dataclasses.replace(config.moe, group_size=args.group_size)
        (row,) = measure_train(preset, args.batch, args.inputs, args.targets, args.steps,
                               args.warmup, **overrides)
        row.pop("moe", None)
        row["what"] = "moe"
        row["group_size"] = (overrides.get("moe") or config.moe).group_size if config.moe else ""
        row["parameters"], row["active_parameters"] = parameter_counts(config)
        rows.append(row)
    for row in rows:
        row["dispatch_overhead"] = row["step_seconds"] / rows[0]["step_seconds"]
    return rows


def decode_timer(preset: str, batch: int, inputs: int, targets: int, method: str,
                 options: dict) -> tuple[Callable[[], None], dict]:
    """(run once and wait, the model's parameters): one jitted predict_batch call on random
    encoder inputs, decoding exactly `targets` tokens per row (EOS is an id no row emits,
    so no row stops early)."""
    import jax
    import numpy as np
    from t5x_lite import models

    config = model_config_of(preset)
    model = models.EncoderDecoderModel(config)
    params = jax.jit(model.init)(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(2, config.vocab_size, (batch, inputs), np.int32)
    predict = jax.jit(lambda p, t: model.predict_batch(
        p, {"encoder_input_tokens": t}, max_decode_length=targets, method=method,
        eos_id=config.vocab_size, **options))
    return lambda: jax.block_until_ready(predict(params, tokens)), params


def hf_decode_timer(preset: str, params, batch: int, inputs: int, targets: int, method: str,
                    options: dict) -> Callable[[], None]:
    """transformers' generate on the same weights and inputs (float32, CPU): greedy or beam
    search with num_beams = beam_size, forced to `targets` new tokens."""
    import numpy as np
    import torch
    import transformers
    from t5x_lite import hf

    config = model_config_of(preset)
    hf_config = hf.config_to_hf(config)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config)).eval()
    tensors = {name: torch.from_numpy(np.array(value))
               for name, value in hf.tensors_from_params(params, config).items()}
    model.load_state_dict(tensors, strict=False)
    if not config.tie_embeddings:  # transformers 5 ties the head whatever the config says
        model.lm_head.weight = torch.nn.Parameter(tensors["lm_head.weight"])
    tokens = torch.from_numpy(
        np.random.default_rng(0).integers(2, config.vocab_size, (batch, inputs)))
    search = ({"num_beams": options.get("beam_size", 4), "length_penalty": options.get(
        "alpha", 0.6)} if method == "beam" else {"num_beams": 1})

    def run() -> None:
        with torch.inference_mode():
            model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                           max_new_tokens=targets, min_new_tokens=targets, do_sample=False,
                           **search)

    return run


def decode_row(preset: str, who: str, method: str, options: dict, batch: int, inputs: int,
               targets: int, seconds: list[float]) -> dict:
    decode_seconds = statistics.median(seconds[1:])
    return {"what": "decode", "preset": preset, "implementation": who, "device": device_name(),
            "method": method, **options, "batch": batch, "inputs": inputs, "targets": targets,
            "decode_seconds": decode_seconds,
            "tokens_per_second": batch * targets / decode_seconds,
            "first_call_seconds": seconds[0]}


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_decode(preset: str, batch: int, inputs: int, targets: int, method: str,
                   options: dict, repeats: int, compare_hf: bool = False) -> list[dict]:
    """Median seconds of `repeats` decoding calls after a first (compiling) one; with
    `compare_hf` transformers' generate on the same weights, timed in turn with ours
    (A B A B ...), and the ratio of tokens/s ours / theirs."""
    ours, params = decode_timer(preset, batch, inputs, targets, method, options)
    runs = {"t5x_lite": ours}
    if compare_hf:
        runs["transformers"] = hf_decode_timer(preset, params, batch, inputs, targets, method,
                                               options)
    seconds = {who: [] for who in runs}
    for _ in range(1 + repeats):
        for who, run in runs.items():
            seconds[who].append(timed(run))
    rows = [decode_row(preset, who, method, options, batch, inputs, targets, seconds[who])
            for who in runs]
    if compare_hf:
        rows[0]["ratio_to_transformers"] = (rows[0]["tokens_per_second"]
                                            / rows[1]["tokens_per_second"])
    return rows


def check_transformers() -> None:
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise launch.UsageError(f"--compare-hf needs {' and '.join(missing)}: pip install -e "
                                f"'.[test]' installs them")


def run_decode(args: argparse.Namespace) -> list[dict]:
    """Greedy and beam-search decoding throughput of a preset, measured in this run."""
    check_preset(args.preset)
    if args.compare_hf:
        check_transformers()
    rows = []
    for method, options in (("greedy", {}), ("beam", {"beam_size": args.beam_size})):
        rows += measure_decode(args.preset, args.batch, args.inputs, args.targets, method,
                               options, args.repeats, args.compare_hf)
    return rows


RULE_TABLES = ("data", "fsdp", "fsdp_tensor")


def run_state(args: argparse.Namespace) -> list[dict]:
    """Per-device bytes of parameters and optimizer state under each gin/partitioning/ table,
    worked out from the shardings (nothing is allocated)."""
    import gin
    import jax
    from t5x_lite import optimizers
    from t5x_lite import partitioning
    from t5x_lite import trainer as trainer_lib

    check_preset(args.preset)
    config, rows = model_config_of(args.preset), []
    for table in RULE_TABLES:
        launch.parse_gin([os.path.join(launch.GIN_DIR, "partitioning", f"{table}.gin")], [])
        try:
            mesh_config = gin.get_configurable(partitioning.MeshConfig)()
        finally:
            gin.clear_config()
        trainer = trainer_lib.build_trainer(config, optimizers.rsqrt_schedule(),
                                            optimizers.adafactor, mesh_config, seed=0)
        state = trainer.sharded_abstract_state()
        parameters = partitioning.per_device_bytes(state.params)
        optimizer = partitioning.per_device_bytes(state.opt_state)
        rows.append({"what": "state", "preset": args.preset, "rules": table,
                     "devices": jax.device_count(), "mesh": dict(trainer.mesh.shape),
                     "parameter_bytes": parameters, "optimizer_bytes": optimizer,
                     "total_mib": (parameters + optimizer) / 2**20})
    for row in rows:
        row["ratio_to_data"] = row["total_mib"] / rows[0]["total_mib"]
    return rows


# ----------------------------------------------------------------------------- checkpoint


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


def measure_checkpoint(preset: str, batch: int, inputs: int, targets: int, saves: int,
                       steps_between: int, directory: str) -> dict:
    """Step times around asynchronous saves, as the training loop makes them: the step that
    starts a save (train step, the input position's state(), the save call, then waiting for
    the step), the steps that run while it writes in the background, and plain steps; plus
    the time of a save waited for to the end."""
    from t5x_lite import checkpoints
    from t5x_lite import partitioning
    from t5x_lite.data import pipeline

    _, state, train_step, device_batch = train_setup(preset, batch, inputs, targets)
    state_mib = partitioning.per_device_bytes((state.params, state.opt_state)) / 2**20
    # A real input position to save with each checkpoint (the byte-level span-corruption
    # task at these lengths), as training saves one.
    batches = pipeline.get_shard_batches(
        "stdlib_span_corruption_bytes", "train", {"inputs": inputs, "targets": targets}, batch,
        shuffle=True, seed=0, repeat=True)
    next(batches)
    manager = checkpoints.create_manager(directory, keep=2)
    plain, saving, during = [], [], []
    for _ in range(1 + TRAIN_WARMUP_STEPS):  # Compilation and warm-up.
        state, _ = timed_step(train_step, state, device_batch)
    for _ in range(saves):
        for _ in range(steps_between):
            state, seconds = timed_step(train_step, state, device_batch)
            plain.append(seconds)
        state, seconds = timed_step(train_step, state, device_batch, lambda new: checkpoints.save(
            manager, new, batches.state()))
        saving.append(seconds)
        while manager.is_saving_in_progress():
            state, seconds = timed_step(train_step, state, device_batch)
            during.append(seconds)
        manager.wait_until_finished()
    start = time.perf_counter()
    checkpoints.save(manager, state, batches.state())
    manager.wait_until_finished()
    blocking_save_seconds = time.perf_counter() - start
    step_seconds = statistics.median(plain)
    row = {"what": "checkpoint", "preset": preset, "device": device_name(), "batch": batch,
           "inputs": inputs, "targets": targets, "saves": saves, "step_seconds": step_seconds,
           "save_step_seconds": statistics.median(saving),
           "save_step_slowdown": statistics.median(saving) / step_seconds - 1,
           "steps_during_save": len(during) / saves,
           "during_save_slowdown": (statistics.median(during) / step_seconds - 1
                                    if during else 0.0),
           "blocking_save_seconds": blocking_save_seconds,
           "checkpoint_mib": directory_bytes(os.path.join(
               checkpoints.checkpoint_dir(directory), str(int(state.step)))) / 2**20,
           "state_mib": state_mib}
    row["below_20_percent"] = row["save_step_slowdown"] < MAX_SAVE_SLOWDOWN
    return row


def run_checkpoint(args: argparse.Namespace) -> list[dict]:
    import tempfile

    check_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        return [measure_checkpoint(args.preset, args.batch, args.inputs, args.targets,
                                   args.saves, args.steps_between, directory)]


# ----------------------------------------------------------------------------- input


def check_tasks(names: list[str]) -> None:
    from t5x_lite.data import tasks

    for name in names:
        tasks.get_task_or_mixture(name)  # ValueError naming the registered tasks.


def cores_to_use(cores: int) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    if cores > len(available):
        raise launch.UsageError(f"--cores {cores} exceeds the {len(available)} CPU cores this "
                                f"process may use: pass --cores <= {len(available)}")
    return available[:cores]


def measure_input_in_child(task: str, lengths: dict, batch: int, seconds: float, warmup: int,
                           cpus: list[int]) -> dict:
    """Runs in a fresh process: pins it to `cpus` and caps TensorFlow's thread pools before
    any TensorFlow runtime exists, then times the pipeline."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # The parent's stdout carries results.
    os.sched_setaffinity(0, cpus)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(cpus))
    tf.config.threading.set_inter_op_parallelism_threads(len(cpus))
    tf.config.set_visible_devices([], "GPU")  # The pipeline runs on the host.
    from t5x_lite.data import pipeline

    launch.quiet_library_logs()
    batches = pipeline.get_batches(task, "train", lengths, batch, shuffle=True, seed=0,
                                   repeat=True, pack=True)
    for _ in range(warmup):
        next(batches)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        next(batches)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return {"what": "input", "task": task, "cores": len(os.sched_getaffinity(0)),
            "batch": batch, "inputs": lengths["inputs"], "targets": lengths["targets"],
            "batches": count, "examples": count * batch, "seconds": elapsed,
            "cpu_seconds": time.process_time() - cpu_start,
            "examples_per_second": count * batch / elapsed}


def measure_input(task: str, args: argparse.Namespace, cpus: list[int]) -> dict:
    lengths = {"inputs": args.inputs, "targets": args.targets}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_input_in_child,
                          (task, lengths, args.batch, args.seconds, args.warmup, cpus))


def run_input(args: argparse.Namespace) -> list[dict]:
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise launch.UsageError("--tasks is empty: pass comma-separated task names")
    cpus = cores_to_use(args.cores)
    if args.train_preset:
        check_preset(args.train_preset)
    check_tasks(names)
    rows = [measure_input(name, args, cpus) for name in names]
    if args.train_preset:
        (train_row,) = measure_train(args.train_preset, args.batch, args.inputs, args.targets,
                                     args.train_steps, TRAIN_WARMUP_STEPS)
        for row in rows:
            row["ratio_to_train"] = row["examples_per_second"] / train_row["examples_per_second"]
            row["at_least_5x"] = row["ratio_to_train"] >= REQUIRED_INPUT_RATIO
        rows.append(train_row)
    return rows


# ----------------------------------------------------------------------------- command line


def add_sizes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=8, help="rows per batch")
    parser.add_argument("--inputs", type=int_at_least(2), default=512,
                        help="encoder length L in tokens")
    parser.add_argument("--targets", type=int_at_least(2), default=114,
                        help="decoder length T in tokens")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per measurement, nothing else, on stdout")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scripts/benchmark.py", description=__doc__.splitlines()[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(launch.VERBOSE_FLAG, action="store_true", help=launch.VERBOSE_HELP)
    # A subcommand is a parser here plus run=fn(args) -> rows, one dict per measurement.
    parser.add_argument("--quick", action="store_true",
                        help="a check of the harness in seconds: " + " ".join(QUICK_ARGS))
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    train_parser = commands.add_parser("train", help="median train-step time and throughput")
    train_parser.add_argument("--preset", required=True,
                              help="a model in gin/models/, e.g. t5_1_1_small")
    add_sizes(train_parser)
    train_parser.add_argument("--steps", type=int_at_least(1), default=TRAIN_STEPS,
                              help="timed steps")
    train_parser.add_argument("--warmup", type=int_at_least(0), default=TRAIN_WARMUP_STEPS,
                              help="untimed steps after compilation")
    train_parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                              help="default adafactor (adamw with --compare-hf)")
    train_parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                              help="activation dtype (parameters stay float32); the peak "
                              "matmul is measured in it too")
    train_parser.add_argument("--attention", default="auto",
                              choices=("auto", "einsum", "xla", "cudnn", "pallas_tpu"),
                              help="T5Config.attention (t5x_lite/kernels.py): auto is the "
                              "backend's choice (CPU einsum, GPU cudnn, TPU pallas_tpu)")
    train_parser.add_argument("--compare-hf", action="store_true",
                              help="also train transformers' T5 on the same shapes (AdamW, "
                              "float32), timed in turn with ours")
    train_parser.add_argument("--peak-size", type=int_at_least(0), default=PEAK_MATMUL_SIZE,
                              help="N of the N x N matmul that measures the peak FLOP/s for "
                              "MFU (0: no FLOPs, peak or MFU)")
    train_parser.set_defaults(run=run_train)

    remat_parser = commands.add_parser("remat", help="train step time per remat policy")
    remat_parser.add_argument("--preset", required=True)
    add_sizes(remat_parser)
    remat_parser.add_argument("--scan", action="store_true", help="scan over layers too")
    remat_parser.add_argument("--steps", type=int_at_least(1), default=TRAIN_STEPS)
    remat_parser.add_argument("--warmup", type=int_at_least(0), default=TRAIN_WARMUP_STEPS)
    remat_parser.set_defaults(run=run_remat)

    moe_parser = commands.add_parser(
        "moe", help="an MoE preset's train step next to its dense counterpart's")
    moe_parser.add_argument("--preset", default="switch_tiny",
                            help=f"one of {', '.join(DENSE_COUNTERPARTS)}")
    add_sizes(moe_parser)
    moe_parser.add_argument("--group-size", type=int_at_least(1), default=None,
                            help="tokens per routing group (default: the preset's)")
    moe_parser.add_argument("--steps", type=int_at_least(1), default=TRAIN_STEPS)
    moe_parser.add_argument("--warmup", type=int_at_least(0), default=TRAIN_WARMUP_STEPS)
    moe_parser.set_defaults(run=run_moe)

    decode_parser = commands.add_parser("decode", help="greedy and beam decoding tokens/s")
    decode_parser.add_argument("--preset", required=True)
    add_sizes(decode_parser)
    decode_parser.add_argument("--beam-size", type=int_at_least(1), default=4)
    decode_parser.add_argument("--compare-hf", action="store_true",
                               help="also time transformers' generate on the same weights")
    decode_parser.add_argument("--repeats", type=int_at_least(1), default=3,
                               help="timed calls after compilation")
    decode_parser.set_defaults(run=run_decode)

    state_parser = commands.add_parser(
        "state", help="per-device parameter + optimizer bytes under each rule table")
    state_parser.add_argument("--preset", required=True)
    state_parser.add_argument("--json", action="store_true")
    state_parser.set_defaults(run=run_state)

    checkpoint_parser = commands.add_parser(
        "checkpoint", help="slowdown of the step that starts an asynchronous save")
    checkpoint_parser.add_argument("--preset", required=True,
                                   help="a model in gin/models/, e.g. t5_1_1_small")
    add_sizes(checkpoint_parser)
    checkpoint_parser.add_argument("--saves", type=int_at_least(1), default=3,
                                   help="asynchronous saves to time")
    checkpoint_parser.add_argument("--steps-between", type=int_at_least(1), default=3,
                                   help="plain steps timed before each save")
    checkpoint_parser.add_argument("--dir", default=None,
                                   help="where to write the checkpoints (a temporary "
                                   "directory inside it, removed after; default: $TMPDIR)")
    checkpoint_parser.set_defaults(run=run_checkpoint)
    input_parser = commands.add_parser("input", help="input pipeline examples/s on --cores")
    input_parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated names")
    add_sizes(input_parser)
    input_parser.add_argument("--seconds", type=positive_float, default=15.0,
                              help="length of each task's timed window")
    input_parser.add_argument("--warmup", type=int_at_least(0), default=10,
                              help="untimed batches first (start-up, shuffle-buffer fill)")
    input_parser.add_argument("--cores", type=int_at_least(1), default=1,
                              help="CPU cores each pipeline may use")
    input_parser.add_argument("--train-preset", default=None,
                              help="also time this preset's train step; report the ratio")
    input_parser.add_argument("--train-steps", type=int_at_least(1), default=TRAIN_STEPS,
                              help="timed train steps for --train-preset")
    input_parser.set_defaults(run=run_input)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Bad input ends with one `error:` line and status 2; --verbose shows the traceback."""
    launch.quiet_library_logs()
    with launch.bad_input_exits(argv) as argv:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.quick:
            args = parser.parse_args(QUICK_ARGS)
        elif args.command is None:
            raise launch.UsageError("no subcommand: pass one of train, remat, moe, decode, "
                                    "state, checkpoint, input (or --quick)")
        rows = args.run(args)
    print_rows(rows, args.json)


if __name__ == "__main__":
    main()
