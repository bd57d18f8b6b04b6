"""`checkpoint`: the train step that starts an asynchronous save, the steps that run while it
writes, plain steps, and a save waited for to the end."""
import argparse
import os
import statistics
import time

from bench import flags
from bench import presets
from bench import rows as rows_lib
from bench import timing
from bench import train

MAX_SAVE_SLOWDOWN = 0.2  # A step that starts an asynchronous save may take 20% longer.


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "checkpoint", help="slowdown of the step that starts an asynchronous save")
    flags.add_preset(parser)
    flags.add_sizes(parser)
    parser.add_argument("--saves", type=flags.int_at_least(1), default=3,
                        help="asynchronous saves to time")
    parser.add_argument("--steps-between", type=flags.int_at_least(1), default=3,
                        help="plain steps timed before each save")
    parser.add_argument("--dir", default=None,
                        help="where to write the checkpoints (a temporary directory inside "
                        "it, removed after; default: $TMPDIR)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> list[dict]:
    import tempfile

    presets.check_preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        return [measure_checkpoint(args.preset, args.batch, args.inputs, args.targets,
                                   args.saves, args.steps_between, directory)]


def measure_checkpoint(preset: str, batch: int, inputs: int, targets: int, saves: int,
                       steps_between: int, directory: str) -> dict:
    """Step times around asynchronous saves, as the training loop makes them (see
    time_saves), and the time of a save waited for to the end."""
    from t5x_lite import checkpoints
    from t5x_lite import partitioning
    from t5x_lite.data import pipeline

    _, state, train_step, device_batch = presets.train_setup(preset, batch, inputs, targets)
    state_mib = partitioning.per_device_bytes((state.params, state.opt_state)) / 2**20
    # A real input position to save with each checkpoint (the byte-level span-corruption
    # task at these lengths), as training saves one.
    batches = pipeline.get_shard_batches(
        "stdlib_span_corruption_bytes", "train", {"inputs": inputs, "targets": targets}, batch,
        shuffle=True, seed=0, repeat=True)
    next(batches)
    manager = checkpoints.create_manager(directory, keep=2)
    for _ in range(1 + train.TRAIN_WARMUP_STEPS):  # Compilation and warm-up.
        state, _ = timing.timed_step(train_step, state, device_batch)
    state, seconds = time_saves(train_step, state, device_batch, manager, batches, saves,
                                steps_between)
    start = time.perf_counter()
    checkpoints.save(manager, state, batches.state())
    manager.wait_until_finished()
    blocking_save_seconds = time.perf_counter() - start
    row = {"what": "checkpoint", "preset": preset, "device": rows_lib.device_name(),
           "batch": batch, "inputs": inputs, "targets": targets, "saves": saves,
           **save_figures(**seconds, saves=saves),
           "blocking_save_seconds": blocking_save_seconds,
           "checkpoint_mib": directory_bytes(os.path.join(
               checkpoints.checkpoint_dir(directory), str(int(state.step)))) / 2**20,
           "state_mib": state_mib}
    row["below_20_percent"] = row["save_step_slowdown"] < MAX_SAVE_SLOWDOWN
    return row


def time_saves(train_step, state, device_batch, manager, batches, saves: int,
               steps_between: int) -> tuple[object, dict[str, list[float]]]:
    """(the last state, step seconds by kind) over `saves` rounds of `steps_between` plain
    steps, the step that starts a save as the training loop does it (train step, the input
    position's state(), the save call, which copies the state to host memory, then waiting
    for the step), and the steps run while the save still writes in the background."""
    from t5x_lite import checkpoints

    seconds = {"plain": [], "saving": [], "during": []}

    def step(kind: str, after=None) -> None:
        nonlocal state
        state, took = timing.timed_step(train_step, state, device_batch, after)
        seconds[kind].append(took)

    for _ in range(saves):
        for _ in range(steps_between):
            step("plain")
        step("saving", lambda new: checkpoints.save(manager, new, batches.state()))
        while manager.is_saving_in_progress():
            step("during")
        manager.wait_until_finished()
    return state, seconds


def save_figures(plain: list[float], saving: list[float], during: list[float],
                 saves: int) -> dict:
    """The median plain step, the median step that starts a save and its slowdown, and the
    steps run during each save with their median slowdown."""
    step_seconds = statistics.median(plain)
    return {"step_seconds": step_seconds, "save_step_seconds": statistics.median(saving),
            "save_step_slowdown": statistics.median(saving) / step_seconds - 1,
            "steps_during_save": len(during) / saves,
            "during_save_slowdown": (statistics.median(during) / step_seconds - 1
                                     if during else 0.0)}


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)
