"""`input`: packed rows per second from data.pipeline.get_batches, each task in a fresh
process pinned to --cores CPU cores, optionally as a ratio to a preset's train step."""
import argparse
import multiprocessing
import os
import sys
import time

from bench import flags
from bench import presets
from bench import train
from t5x_lite import launch

REQUIRED_INPUT_RATIO = 5.0  # The input pipeline must outpace the train step this many times.
DEFAULT_TASKS = "stdlib_span_corruption,stdlib_ul2,stdlib_prefix_lm,stdlib_bart"


def add_parser(commands) -> None:
    parser = commands.add_parser("input", help="input pipeline examples/s on --cores")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated names")
    flags.add_sizes(parser)
    parser.add_argument("--seconds", type=flags.positive_float, default=15.0,
                        help="length of each task's timed window")
    parser.add_argument("--warmup", type=flags.int_at_least(0), default=10,
                        help="untimed batches first (start-up, shuffle-buffer fill)")
    parser.add_argument("--cores", type=flags.int_at_least(1), default=1,
                        help="CPU cores each pipeline may use")
    parser.add_argument("--train-preset", default=None,
                        help="also time this preset's train step; report the ratio")
    parser.add_argument("--train-steps", type=flags.int_at_least(1), default=train.TRAIN_STEPS,
                        help="timed train steps for --train-preset")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise launch.UsageError("--tasks is empty: pass comma-separated task names")
    cpus = cores_to_use(args.cores)
    if args.train_preset:
        presets.check_preset(args.train_preset)
    check_tasks(names)
    rows = [measure_input(name, args, cpus) for name in names]
    if args.train_preset:
        (train_row,) = train.measure_train(args.train_preset, args.batch, args.inputs,
                                           args.targets, args.train_steps,
                                           train.TRAIN_WARMUP_STEPS)
        for row in rows:
            row["ratio_to_train"] = row["examples_per_second"] / train_row["examples_per_second"]
            row["at_least_5x"] = row["ratio_to_train"] >= REQUIRED_INPUT_RATIO
        rows.append(train_row)
    return rows


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


def measure_input(task: str, args: argparse.Namespace, cpus: list[int]) -> dict:
    lengths = {"inputs": args.inputs, "targets": args.targets}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_input_in_child,
                          (task, lengths, args.batch, args.seconds, args.warmup, cpus))


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
    count, elapsed, cpu_seconds = time_batches(batches, seconds)
    return {"what": "input", "task": task, "cores": len(os.sched_getaffinity(0)),
            "batch": batch, "inputs": lengths["inputs"], "targets": lengths["targets"],
            "batches": count, "examples": count * batch, "seconds": elapsed,
            "cpu_seconds": cpu_seconds, "examples_per_second": count * batch / elapsed}


def time_batches(batches, seconds: float) -> tuple[int, float, float]:
    """(batches read, wall-clock seconds, CPU seconds of all this process's threads): reads
    batches until at least `seconds` have passed."""
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        next(batches)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count, elapsed, time.process_time() - cpu_start
