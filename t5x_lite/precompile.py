"""Compiles a run's train and eval steps for an accelerator topology on a machine without it,
and says whether the run fits: per-device memory, the attention kernel, collectives, hazards
left in the step (scatters, sorts), and on TPUs XLA's FLOPs and bytes and the roofline MFU.

  python -m t5x_lite.precompile --gin_file=gin/models/t5_1_1_base.gin \\
      --gin_file=gin/runs/pretrain.gin --gin.BATCH_SIZE=128 --topology=v5e:2x4 [--json]

Topologies: TPUs in libtpu's names (v5e:2x4, v4:2x2x2), GPUs as h100:8 or a100:8 (one host)
and h100:4x8 (hosts x GPUs per host).

The same gin files and bindings as t5x_lite.train; no data and no MODEL_DIR are read. TPU
and GPU topologies need the aot extra (pip install -e '.[aot]': libtpu, the CUDA plugin and
cuDNN). Exit 0 when the run fits, 2 (with one line naming what would) when it does not.
"""
import os

from t5x_lite import startup

# Compiling for a GPU that is not there: no autotuning (it runs kernels on the device), and
# cuBLAS GEMMs instead of Triton's, whose choice needs autotuning. Set before XLA reads its
# flags; they do not touch CPU or TPU programs.
GPU_COMPILE_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *GPU_COMPILE_FLAGS]).strip()
# Nothing runs on a device here. With the CPU as the only backend, the CUDA plugin skips its
# check of the CUDA libraries (a GPU's driver) and registers its compiler.
os.environ["JAX_PLATFORMS"] = "cpu"

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "nothing was compiled; rerun the same command")

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5x_lite import accelerators  # noqa: E402
from t5x_lite import flops  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import partitioning  # noqa: E402
from t5x_lite import run_config  # noqa: E402
from t5x_lite import trainer as trainer_lib  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402

# Macros a training run must set that compiling never reads; the command line overrides them.
# The training run whose steps precompile compiles, as the run files register it with gin.
TRAIN_RUN = "t5x_lite.train.run"
UNUSED_RUN_MACROS = ["MODEL_DIR = '/precompile/reads/no/model_dir'", "TRAIN_STEPS = 1"]
# libtpu looks for the TPU it runs on unless told there is none to find.
LIBTPU_ENVIRONMENT = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                      # Compiling needs no chip: other processes may load libtpu too.
                      "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# The CUDA plugin, and cuDNN, which jax asks for its version when it builds cuDNN attention.
GPU_COMPILER_MODULES = ("jax_plugins.xla_cuda12", "nvidia.cudnn")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
HAZARDS = ("scatter", "sort")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", required=True,
                        help="CHIP:GRID, e.g. v5e:2x4 or h100:8 (chips: "
                             f"{', '.join(accelerators.CHIPS)})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def topology_devices(topology: accelerators.Topology) -> list:
    """The devices of `topology`, described by its platform's compiler, not present."""
    if topology.chip.platform == "gpu":
        modules, compiler = GPU_COMPILER_MODULES, "GPUs needs the CUDA plugin and cuDNN"
        options = {"platform": "cuda", "topology": topology.compiler_name,
                   "target_config": accelerators.gpu_target_config(topology.chip)}
    else:
        modules, compiler = ("libtpu",), "TPUs needs libtpu"
        options = {"platform": "tpu", "topology_name": topology.compiler_name}
        for name, value in LIBTPU_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    if not all(map(importlib.util.find_spec, modules)):
        raise launch.UsageError(f"compiling for {compiler}: pip install -e '.[aot]'")
    from jax.experimental import topologies

    with startup.stderr_shown_only_on_failure():
        description = topologies.get_topology_desc(**options)
    return list(description.devices)


def run_settings() -> dict:
    """t5x_lite.train.run's arguments as the parsed gin files bind them (defaults filled).
    Looked up in gin's registry, which the run files' `import t5x_lite.train` filled: one
    entry point does not import another."""
    try:
        train_run = gin.get_configurable(TRAIN_RUN)
    except ValueError:
        raise launch.UsageError(f"no gin file registers {TRAIN_RUN}: pass the training run's "
                                "files, e.g. --gin_file=gin/runs/pretrain.gin") from None
    settings = {name: parameter.default for name, parameter
                in inspect.signature(train_run).parameters.items()}
    settings.update(gin.get_bindings(TRAIN_RUN))
    return settings


def abstract_batch(batch_size: int, row_lengths: tuple[int, int], mesh,
                   decoder_only: bool = False, encoder_only: bool = False,
                   classification: bool = False) -> dict:
    """The train step's batch of `row_lengths` (inputs, targets) in the family's layout (an
    encoder-only model's: a masked LM's, or with `classification` a classifier's)."""
    sharding = partitioning.batch_sharding(mesh)
    inputs, targets = row_lengths
    if encoder_only and classification:
        length_of = {key: inputs if key.startswith("encoder") else 1
                     for key in pipeline.CLASSIFICATION_KEYS}
    elif encoder_only:
        length_of = {key: inputs for key in pipeline.ENCODER_ONLY_KEYS}
    elif decoder_only:
        length_of = {key: inputs + targets for key in pipeline.DECODER_ONLY_KEYS}
    else:
        length_of = {key: inputs if key.startswith("encoder") else targets
                     for key in pipeline.BATCH_KEYS}
    return {key: jax.ShapeDtypeStruct((batch_size, length), jnp.int32, sharding=sharding)
            for key, length in length_of.items()}


def compiled_steps(trainer: trainer_lib.Trainer, batch: dict) -> dict:
    """The train and eval steps compiled for the trainer's mesh, with compile seconds."""
    state = trainer.sharded_abstract_state()
    started = time.perf_counter()
    with trainer_lib.mesh_context(trainer.mesh, trainer.rules):
        train_step = trainer.jitted_train_step().lower(state, batch).compile()
        train_seconds = time.perf_counter() - started
        eval_step = trainer.jitted_eval_step().lower(state.params, batch).compile()
    return {"train": train_step, "eval": eval_step, "train_compile_seconds": train_seconds}


def _opcode_pattern(opcodes) -> re.Pattern:
    """An HLO instruction `%name = TYPE OPCODE(` (an async op counted at its start); TYPE
    may be a tuple with spaces. OPCODE is whole: "scatter" does not match reduce-scatter."""
    return re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?)[ ]?(?<![\w-])(" + "|".join(opcodes)
                      + r")(?:-start)?\(")


def instruction_counts(hlo_text: str, opcodes) -> dict[str, int]:
    pattern = _opcode_pattern(opcodes)
    counts = collections.Counter(match.group(2) for match in map(pattern.match,
                                                                 hlo_text.splitlines())
                                 if match)
    return dict(sorted(counts.items()))


def hazards(hlo_text: str) -> list[dict]:
    """Each scatter or sort left in the program: its kind, result type and op name."""
    pattern, found = _opcode_pattern(HAZARDS), []
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if match:
            op_name = re.search(r'op_name="([^"]*)"', line)
            # The first array type of the result (a variadic scatter's is a tuple).
            array_type = re.search(r"\w+\[[\d,]*\]", match.group(1))
            found.append({"op": match.group(2),
                          "type": array_type.group(0) if array_type else match.group(1),
                          "op_name": op_name.group(1) if op_name else ""})
    return found


def custom_call_counts(hlo_text: str) -> dict[str, int]:
    """Library kernels the step calls (cuDNN attention, cuBLAS GEMMs, Mosaic kernels)."""
    return dict(sorted(collections.Counter(
        re.findall(r'custom_call_target="([^"]+)"', hlo_text)).items()))


def roofline(compiled, hlo_text: str, chip: accelerators.Chip,
             model_flops_per_device: float) -> dict:
    """XLA's FLOPs and bytes per device and the step time and MFU they bound (the slower of
    compute at the bf16 peak and traffic at the memory bandwidth), with `roofline_note` ""
    when they hold. None where the compiler gives no cost analysis (XLA:GPU's programs) or
    the step loops (scan_layers: XLA counts a loop's body once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    note = ("" if cost else "XLA's GPU compiler gives no cost analysis")
    if cost and instruction_counts(hlo_text, ("while",)):
        note = "the step loops (scan_layers) and XLA counts a loop's body once"
    if note:
        return {**dict.fromkeys(("xla_flops", "xla_bytes_accessed", "roofline_step_seconds",
                                 "roofline_bound", "roofline_mfu")), "roofline_note": note}
    xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    compute_seconds = xla_flops / chip.peak_bf16_flops
    traffic_seconds = xla_bytes / chip.memory_bandwidth
    seconds = max(compute_seconds, traffic_seconds)
    return {"xla_flops": xla_flops, "xla_bytes_accessed": xla_bytes,
            "roofline_step_seconds": seconds,
            "roofline_bound": "FLOPs" if compute_seconds >= traffic_seconds else "memory traffic",
            "roofline_mfu": (model_flops_per_device / chip.peak_bf16_flops / seconds
                             if seconds else 0.0), "roofline_note": ""}


def memory_per_device(compiled, state) -> dict[str, int]:
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return {"parameters": partitioning.per_device_bytes(state.params),
            "optimizer_state": partitioning.per_device_bytes(state.opt_state),
            "temporaries": memory.temp_size_in_bytes, "total": total}


def report(topology: accelerators.Topology, trainer: trainer_lib.Trainer, steps: dict,
           data: run_config.DataConfig) -> dict:
    chip, compiled = topology.chip, steps["train"]
    usable = accelerators.usable_memory_bytes(chip, os.environ)
    state = trainer.sharded_abstract_state()
    hlo_text = compiled.as_text()
    per_device = memory_per_device(compiled, state)
    model_flops = flops.model_flops_per_step(trainer.model.config, data.batch_size,
                                             *data.row_lengths())
    return {
        "topology": topology.name, "platform": chip.platform, "device_kind": chip.device_kind,
        "devices": topology.devices,
        "hosts": len({device.process_index for device in trainer.mesh.devices.flat}),
        "mesh": dict(trainer.mesh.shape),
        "attention_kernel": trainer.model.config.kernels().attention.value,
        "per_device_bytes": per_device, "device_memory_bytes": chip.memory_bytes,
        "usable_memory_bytes": usable,
        "fits": per_device["total"] <= usable,
        "model_flops_per_step": model_flops,
        "collectives": instruction_counts(hlo_text, COLLECTIVES),
        "hazards": hazards(hlo_text),
        "eval_step_hazards": hazards(steps["eval"].as_text()),
        "custom_calls": custom_call_counts(hlo_text),
        **roofline(compiled, hlo_text, chip, model_flops / topology.devices),
        "compile_seconds": steps["train_compile_seconds"],
    }


def what_would_fit(result: dict, settings: dict) -> str:
    """One line: the run does not fit, and the changes that cut what dominates."""
    per_device, gib = result["per_device_bytes"], accelerators.GIB
    state_bytes = per_device["parameters"] + per_device["optimizer_state"]
    return (f"does not fit: {per_device['total'] / gib:.1f} GiB per device on "
            f"{result['topology']} ({result['usable_memory_bytes'] / gib:.1f} GiB usable each; "
            f"parameters + optimizer state {state_bytes / gib:.1f} GiB, temporaries "
            f"{per_device['temporaries'] / gib:.1f} GiB): "
            + advice(result["mesh"], settings, per_device["temporaries"] > state_bytes))


def advice(mesh_shape: dict, settings: dict, temporaries_dominate: bool) -> str:
    """The changes that would cut a step's memory, those for what dominates first."""
    changes = []
    if mesh_shape.get("fsdp", 1) == 1:
        changes.append("shard parameters and optimizer state (--gin_file=gin/partitioning/"
                       "fsdp.gin)")
    activations = (f"set models.T5Config.remat_policy (now "
                   f"{settings['model_config'].remat_policy.value!r}) or raise "
                   f"t5x_lite.train.run.num_microbatches (now {settings['num_microbatches']})")
    changes.insert(0 if temporaries_dominate else len(changes), activations)
    return ", or ".join([*changes, "use a topology with more chips"])


def format_table(result: dict) -> str:
    mib = 2**20
    per_device = result["per_device_bytes"]
    rows = [("topology", f"{result['topology']} ({result['devices']} x {result['device_kind']}"
                         f" on {result['hosts']} host(s), mesh {result['mesh']})"),
            ("attention kernel", result["attention_kernel"]),
            ("per device", "  ".join(f"{name} {value / mib:,.0f} MiB"
                                     for name, value in per_device.items())),
            ("fits", f"{result['fits']} (usable {result['usable_memory_bytes'] / mib:,.0f} "
                     f"MiB of {result['device_memory_bytes'] / mib:,.0f} MiB)"),
            ("model FLOPs per step", f"{result['model_flops_per_step']:.4g}"),
            *_roofline_rows(result),
            ("library kernels", json.dumps(result["custom_calls"])),
            ("collectives", json.dumps(result["collectives"])),
            ("hazards", json.dumps(result["hazards"]) if result["hazards"] else "none"),
            ("compile", f"{result['compile_seconds']:.1f} s")]
    return "\n".join(f"{name:<22}{value}" for name, value in rows)


def _roofline_rows(result: dict) -> list[tuple[str, str]]:
    if result["xla_flops"] is None:
        return [("roofline", f"none: {result['roofline_note']}")]
    return [("XLA per device", f"{result['xla_flops']:.4g} FLOPs, "
                               f"{result['xla_bytes_accessed']:.4g} bytes"),
            ("roofline", f"{result['roofline_step_seconds'] * 1e3:.1f} ms a step, bound by "
                         f"{result['roofline_bound']}, MFU {result['roofline_mfu']:.1%}")]


def precompile(topology_name: str) -> dict:
    """Compiles the parsed gin configuration's run for `topology_name`; its report."""
    topology = accelerators.parse_topology(topology_name)
    settings = run_settings()
    data = settings["data"].filled(run_config.TRAINING_DEFAULTS).for_model(
        settings["model_config"])
    devices = topology_devices(topology)
    run_config.check_batch_divides(data, settings["mesh_config"], settings["num_microbatches"],
                                   len(devices))
    model_config = dataclasses.replace(settings["model_config"],
                                       kernel_platform=topology.chip.platform)
    trainer = trainer_lib.build_trainer(
        model_config, settings["learning_rate"], settings["optimizer"],
        settings["mesh_config"], seed=0, num_microbatches=settings["num_microbatches"],
        devices=devices)
    state = trainer.sharded_abstract_state()
    # A step holds the parameters, their gradients (same shapes and shardings) and the
    # optimizer state at once, before any activation.
    floor_bytes = (2 * partitioning.per_device_bytes(state.params)
                   + partitioning.per_device_bytes(state.opt_state))
    if floor_bytes > accelerators.usable_memory_bytes(topology.chip, os.environ):
        raise launch.UsageError(state_does_not_fit(topology, trainer, floor_bytes))
    batch = abstract_batch(data.batch_size, data.row_lengths(), trainer.mesh,
                           data.decoder_only, data.encoder_only, bool(model_config.num_classes))
    try:
        steps = compiled_steps(trainer, batch)
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a step whose temporaries exceed the chip's memory.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise launch.UsageError(
            f"does not fit on {topology.name}: {launch.first_line(error).rstrip('.')}: "
            + advice(dict(trainer.mesh.shape), settings, True)) from error
    result = report(topology, trainer, steps, data)
    result["advice"] = "" if result["fits"] else what_would_fit(result, settings)
    return result


def state_does_not_fit(topology: accelerators.Topology, trainer: trainer_lib.Trainer,
                       floor_bytes: int) -> str:
    """The line for parameters, gradients and optimizer state that alone exceed a device
    (nothing is compiled then), naming the chip count at which fsdp would hold them."""
    gib = accelerators.GIB
    usable = accelerators.usable_memory_bytes(topology.chip, os.environ)
    parameter_bytes = sum(leaf.size * leaf.dtype.itemsize
                          for leaf in jax.tree_util.tree_leaves(trainer.abstract_state.params))
    state_bytes = sum(leaf.size * leaf.dtype.itemsize
                      for leaf in jax.tree_util.tree_leaves(trainer.abstract_state))
    chips = -(-(parameter_bytes + state_bytes) // usable)
    fsdp = ("" if trainer.mesh.shape["fsdp"] > 1
            else "shard them with --gin_file=gin/partitioning/fsdp.gin and ")
    return (f"does not fit: parameters, gradients and optimizer state alone take "
            f"{floor_bytes / gib:.1f} GiB per device on {topology.name} ({usable / gib:.1f} "
            f"GiB usable each): {fsdp}use a topology of more than {chips} chips (activations "
            "need room too)")


def main(argv: list[str] | None = None) -> None:
    launch.quiet_library_logs()
    with launch.bad_input_exits(argv) as argv:
        args = launch.parse_flags(argv, __doc__, _parser())
        launch.import_modules(args.module_import)
        launch.parse_gin(args.gin_file, UNUSED_RUN_MACROS + args.gin_bindings)
        launch.initialize_backends()
        result = precompile(args.topology)
        print(json.dumps(result) if args.json else format_table(result), flush=True)
        if not result["fits"]:
            raise launch.UsageError(result["advice"])


if __name__ == "__main__":
    main()
