"""Pretraining entry point: python -m t5x_lite.train --gin_file=gin/quickstart.gin
--gin.MODEL_DIR="'/tmp/run'" [--gin.TRAIN_STEPS=1000 ...]. Rerunning the same command resumes
from the newest checkpoint in MODEL_DIR; a finished run says so and exits 0. Multi-host: every
process runs the same command (scripts/launch_*.sh); process 0 alone prints and writes metrics,
all of them save checkpoints together.

Reading path: run() builds the trainer (trainer.py) from the gin-bound configs
(run_config.py), picks where the state comes from (warm_start.py), then train_loop() runs
steps and does what each step makes due: a log line, an evaluation, a checkpoint."""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "before the first step, nothing was saved; rerun the same command to "
              "start (or resume)")

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

from t5x_lite import checkpoints  # noqa: E402
from t5x_lite import evaluation  # noqa: E402
from t5x_lite import faults  # noqa: E402
from t5x_lite import flops  # noqa: E402
from t5x_lite import gin_checks  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import layers  # noqa: E402
from t5x_lite import metrics_io  # noqa: E402
from t5x_lite import models  # noqa: E402
from t5x_lite import optimizers  # noqa: E402
from t5x_lite import partitioning  # noqa: E402
from t5x_lite import run_config  # noqa: E402
from t5x_lite import trainer as trainer_lib  # noqa: E402
from t5x_lite import warm_start  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402

say = run_config.say
# The remat policies that lower a step's memory, as the out-of-memory line names them.
REMAT_POLICIES = [policy for policy in layers.RematPolicy if policy is not layers.RematPolicy.NONE]
Report = Callable[[trainer_lib.TrainState, Callable[[str], None]], None]


def run(model_config: models.T5Config = gin.REQUIRED,
        data: run_config.DataConfig = gin.REQUIRED, loop: run_config.LoopConfig = gin.REQUIRED,
        learning_rate: optax.ScalarOrSchedule = optimizers.rsqrt_schedule(),
        optimizer: Callable[..., optax.GradientTransformation] = optimizers.adafactor,
        mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
        num_microbatches: int = 1, upcycle_from: str | None = None,
        init_from: str | None = None, require_init_from: bool = False) -> None:
    """Trains until loop.train_steps, evaluating and checkpointing on the way. With
    `num_microbatches` > 1 each step accumulates gradients over that many slices of the
    batch (the same update, a fraction of the activation memory). With `upcycle_from` (the
    MODEL_DIR of a dense run of the same architecture) an MoE run without checkpoints starts
    from that run's newest parameters (sparse upcycling). With `init_from` (a MODEL_DIR of
    this architecture) a run without checkpoints starts from that run's newest parameters
    with a fresh optimizer state at step 0 (fine-tuning); `require_init_from` (finetune.gin)
    makes it an error to leave it unset."""
    data = check_run(data, mesh_config, num_microbatches, init_from, upcycle_from,
                     require_init_from).for_model(model_config)
    warm_start.check_upcycling(model_config, upcycle_from)
    trainer = trainer_lib.build_trainer(
        model_config, learning_rate, optimizer, mesh_config, loop.seed, num_microbatches,
        loop.max_consecutive_skips if loop.nan_policy is faults.NanPolicy.SKIP else None)
    input_shards = data.host_shard_names(trainer.mesh)
    model_dir = prepare_model_dir(loop.model_dir)
    run_config.check_vocabulary(model_config, data)
    if not data.has_split("validation"):
        say(f"Task {data.mixture_or_task_name!r} has no validation split: training without "
            "validation loss (register one, e.g. validation_files for local text).")
    sharded_state = trainer.sharded_abstract_state()
    say(metrics_io.parameter_table(sharded_state.params, trainer.model.logical_axes()))
    say(f"Mesh {dict(trainer.mesh.shape)}. {metrics_io.state_bytes_line(sharded_state)}")
    manager = checkpoints.create_manager(model_dir, loop.keep_checkpoints)
    newest = lambda: max(checkpoints.complete_steps(model_dir), default=None)  # noqa: E731
    with (faults.disk_full_explained(model_dir, newest),
          out_of_memory_explained(data, num_microbatches, model_config, mesh_config)):
        state, input_position = warm_start.restore_or_init(
            trainer, manager, loop.seed, upcycle_from, init_from, input_shards)
        start_step = int(state.step)
        if start_step >= loop.train_steps:
            say(f"Training already finished: checkpoint at step {start_step} >= TRAIN_STEPS "
                f"{loop.train_steps} in {model_dir}.")
            return
        batches = warm_start.train_batches(data, trainer.mesh, loop.seed, start_step,
                                           input_position, manager)
        try:
            train_loop(trainer, state, manager, data, loop, model_dir, batches)
        finally:
            # Whatever stops the run, a checkpoint being written in the background completes.
            manager.wait_until_finished()


def check_run(data: run_config.DataConfig, mesh_config: partitioning.MeshConfig,
              num_microbatches: int, init_from: str | None, upcycle_from: str | None,
              require_init_from: bool) -> run_config.DataConfig:
    """The data settings completed for training, once the run's settings agree."""
    if require_init_from and not init_from:
        raise ValueError("INIT_FROM is not set: fine-tuning starts from a trained MODEL_DIR or "
                         "Hugging Face directory, pass --gin.INIT_FROM=\"'runs/quickstart'\"")
    data = data.for_training()
    if upcycle_from and init_from:
        raise ValueError("set INIT_FROM (same architecture) or UPCYCLE_FROM (dense into MoE), "
                         "not both")
    run_config.check_batch_divides(data, mesh_config, num_microbatches)
    return data


def train_loop(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, manager,
               data: run_config.DataConfig, loop: run_config.LoopConfig, model_dir: str,
               batches: pipeline.ShardedBatches) -> None:
    """Runs steps until loop.train_steps; after each, whatever is due at that step (what
    each of those does was chosen by setup: the reports, the NaN policy)."""
    writer, step = metrics_io.MetricsWriter(model_dir), int(state.step)
    train_step = trainer.compile_train_step()
    period = throughput_period(trainer, data, step)
    reports = periodic_reports(trainer, data, loop, writer)
    check_finite = FiniteCheck(trainer, manager, loop)
    if step == 0:
        for _, report in reports:
            report(state, say)
    progress, metrics, run_files_written = Progress(step, loop.train_steps), None, False
    with faults.StopRequest() as stop:
        while step < loop.train_steps:
            step += 1
            state, metrics = timed_step(train_step, state, batches, trainer.mesh, period,
                                        metrics)
            if not run_files_written:
                # Once a step has run: a run that never trained leaves no config behind.
                jax.block_until_ready(metrics)
                write_run_files(model_dir, data)
                run_files_written = True
            period.add(step, metrics)
            progress.advance()
            last = step == loop.train_steps
            saving = due(step, loop.checkpoint_period, last)
            if due(step, loop.log_period, saving):
                restored = check_finite(period.fetch(), step)
                if restored is not None:
                    state, step, period.rows = restored, int(restored.step), []
                    continue
            if due(step, loop.log_period):
                log_train_row(writer, period, step, loop.train_steps, progress)
            pause_start = time.perf_counter()
            for every, report in reports:
                if due(step, every, last):
                    report(state, progress.print)
            if saving:
                checkpoints.save(manager, state, batches.state())
            period.paused += time.perf_counter() - pause_start
            if stop.requested() and not last:
                progress.close()
                stop_after_saving(manager, state, batches, stop.signal_number, model_dir)
    progress.close()
    manager.wait_until_finished()
    say(f"Finished at step {loop.train_steps}; checkpoints in "
        f"{checkpoints.checkpoint_dir(model_dir)}")


def prepare_model_dir(model_dir: str) -> str:
    """Creates MODEL_DIR and proves it writable before any work starts."""
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    try:
        os.makedirs(model_dir, exist_ok=True)
        # One probe per process: hosts sharing MODEL_DIR must not remove each other's.
        probe = os.path.join(model_dir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise launch.UsageError(f"MODEL_DIR {model_dir!r} cannot be written ({error.strerror}):"
                                " pass --gin.MODEL_DIR=\"'/a/writable/dir'\"") from error
    return model_dir


def write_run_files(model_dir: str, data: run_config.DataConfig) -> None:
    """MODEL_DIR/config.gin (every setting of the run, for eval, infer and convert_hf) and
    data.json (the data settings that evaluation and inference default to), each written
    whole or not at all."""
    if jax.process_index() != 0:
        return
    for name, text in (("config.gin", gin_checks.config_text()),
                       (run_config.RUN_DATA_FILE,
                        json.dumps(data.run_settings(), indent=1) + "\n")):
        path = os.path.join(model_dir, name)
        with open(path + ".partial", "w") as f:
            f.write(text)
        os.replace(path + ".partial", path)


def due(step: int, every: int, also: bool = False) -> bool:
    """Whether something done every `every` steps (0: never) is due at `step`, or `also`."""
    return also or bool(every) and step % every == 0


def timed_step(train_step: Callable, state: trainer_lib.TrainState,
               batches: pipeline.ShardedBatches, mesh, period: metrics_io.LogPeriod,
               last_metrics) -> tuple[trainer_lib.TrainState, dict]:
    """One training step on the next batch, counting the wait for it in `period`."""
    wait_start = time.perf_counter()
    local_batch = next(batches)
    period.add_data_wait(time.perf_counter() - wait_start, last_metrics)
    return train_step(state, partitioning.global_batch(local_batch, mesh))


def throughput_period(trainer: trainer_lib.Trainer, data: run_config.DataConfig, step: int
               ) -> metrics_io.LogPeriod:
    """Throughput bookkeeping from `step` on: tokens and model FLOPs per step, peak FLOPs."""
    (inputs, targets), devices = data.row_lengths(), trainer.mesh.devices.size
    peak = flops.peak_bf16_flops(trainer.mesh.devices.flat[0].device_kind)
    return metrics_io.LogPeriod(
        step, data.batch_size * (inputs + targets),
        flops.model_flops_per_step(trainer.model.config, data.batch_size, inputs, targets),
        devices, peak and peak * devices)


def log_train_row(writer: metrics_io.MetricsWriter, period: metrics_io.LogPeriod, step: int,
                  train_steps: int, progress: "Progress") -> None:
    row, seconds_left = period.take_row(step, train_steps)
    writer.write(step, row, "train")
    progress.print(metrics_io.format_train_line(step, train_steps, row, seconds_left))
    for line in metrics_io.format_moe_lines(row):
        progress.print(line)


class FiniteCheck:
    """check(rows, step): None when the steps up to `step` (their metric `rows`) were all
    finite; else, under NanPolicy.ROLLBACK, the newest checkpoint's state to go on from;
    else raises faults.NonFiniteLoss. Called before anything saves those steps."""

    def __init__(self, trainer: trainer_lib.Trainer, manager, loop: run_config.LoopConfig):
        self._trainer, self._manager, self._loop = trainer, manager, loop
        self._rolls_back = loop.nan_policy is faults.NanPolicy.ROLLBACK
        self._rollbacks = 0  # In a row.

    def __call__(self, rows: list[dict], step: int) -> trainer_lib.TrainState | None:
        try:
            faults.check_finite(rows, step, self._loop.nan_policy,
                                self._loop.max_consecutive_skips, self._manager.latest_step)
        except faults.NonFiniteLoss as error:
            if not self._rolls_back:
                raise
            self._rollbacks += 1
            return rolled_back(self._trainer, self._manager, error, self._rollbacks,
                               self._loop)
        self._rollbacks = 0
        return None


def rolled_back(trainer: trainer_lib.Trainer, manager, error: faults.NonFiniteLoss,
                rollbacks: int, loop: run_config.LoopConfig) -> trainer_lib.TrainState:
    """The newest checkpoint's state, to go on from with the next batches (nan_policy
    "rollback"); re-raises `error` when there is none or after max_rollbacks in a row."""
    manager.wait_until_finished()
    restored = checkpoints.restore_latest(manager, trainer.sharded_abstract_state())
    if restored is None or rollbacks > loop.max_rollbacks:
        raise error
    state = restored[0]
    say(f"Step {error.step} had a non-finite loss or gradient norm: rolled back to the "
        f"checkpoint at step {int(state.step)}, going on with the next batches.")
    return state


def stop_after_saving(manager, state: trainer_lib.TrainState, batches: pipeline.ShardedBatches,
                      signal_number: int | None, model_dir: str) -> None:
    checkpoints.save(manager, state, batches.state())
    manager.wait_until_finished()
    name = signal.Signals(signal_number).name if signal_number else "a signal on another process"
    step = int(state.step)
    say(f"Stopped by {name} after step {step}: checkpoint saved in "
        f"{checkpoints.checkpoint_dir(model_dir)}/{step}; rerun the same command to resume "
        "exactly there.")
    raise faults.Preempted(128 + (signal_number or signal.SIGTERM))


def periodic_reports(trainer: trainer_lib.Trainer, data: run_config.DataConfig,
                     loop: run_config.LoopConfig, writer: metrics_io.MetricsWriter
                     ) -> list[tuple[int, Report]]:
    """(every how many steps, report(state, print_line)) for what the run reports besides
    training metrics, in order: validation loss (if the task has a validation split) and
    the task's metrics (if METRICS_PERIOD is set and the task has metric functions). Each
    also runs at step 0 and at the last step."""
    reports = []
    if data.has_split("validation"):
        reports.append((loop.eval_period, eval_reporter(trainer, data, loop, writer)))
    metrics_report = task_metrics_reporter(trainer, data, loop, writer)
    if metrics_report is not None:
        reports.append((loop.metrics_period, metrics_report))
    return reports


def eval_reporter(trainer: trainer_lib.Trainer, data: run_config.DataConfig,
                  loop: run_config.LoopConfig, writer: metrics_io.MetricsWriter) -> Report:
    eval_step = trainer.compile_eval_step()

    def report(state: trainer_lib.TrainState, print_line: Callable[[str], None]) -> None:
        scores = run_config.validation_scores(eval_step, state.params, data, trainer.mesh,
                                              loop.eval_steps)
        step = int(state.step)
        writer.write(step, scores, "validation")
        print_line(f"step {step:>6d}  validation loss {scores['loss']:.4f}  "
                   f"accuracy {scores['accuracy']:.4f}")

    return report


def task_metrics_reporter(trainer: trainer_lib.Trainer, data: run_config.DataConfig,
                          loop: run_config.LoopConfig, writer: metrics_io.MetricsWriter
                          ) -> Report | None:
    """report(state, print_line): decodes the validation split greedily and writes and
    prints the task's metrics; None when metrics_period is 0 or the task has no metric
    functions. The examples are read once, here."""
    if not loop.metrics_period:
        return None
    if not evaluation.has_metrics(data.mixture_or_task_name):
        say(f"METRICS_PERIOD is {loop.metrics_period}, but {data.mixture_or_task_name!r} has "
            "no metric functions: only the validation loss is reported.")
        return None
    score = evaluation.validation_metrics(
        trainer.model, trainer.mesh, trainer.rules, data.mixture_or_task_name,
        data.task_feature_lengths, data.batch_size, loop.metrics_examples)

    def report(state: trainer_lib.TrainState, print_line: Callable[[str], None]) -> None:
        step = int(state.step)
        values = score(state.params, step)
        writer.write(step, values, "validation")
        print_line(f"step {step:>6d}  validation {metrics_io.format_task_metrics(values)}")

    return report


@contextlib.contextmanager
def out_of_memory_explained(data: run_config.DataConfig, num_microbatches: int,
                            model_config: models.T5Config,
                            mesh_config: partitioning.MeshConfig) -> Iterator[None]:
    """Turns XLA's RESOURCE_EXHAUSTED into one line: the bytes asked, the device's memory,
    and the settings that lower what a step needs."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        asked = re.search(r"allocat\w* (\d+) bytes", str(error))
        asked = f"{int(asked.group(1)) / 2**30:,.1f} GiB" if asked else "more memory"
        fsdp = ("" if mesh_config.fsdp != 1 else
                ", or split parameters and optimizer state over the devices with "
                "--gin_file=gin/partitioning/fsdp.gin")
        raise ValueError(
            f"out of memory: a step asked for {asked}, {device_memory_line()}: lower "
            f"BATCH_SIZE ({data.batch_size}), raise t5x_lite.train.run.num_microbatches "
            f"({num_microbatches}; BATCH_SIZE must divide by it), set "
            f"models.T5Config.remat_policy (now {model_config.remat_policy.value!r}; "
            f"{'/'.join(repr(p.value) for p in REMAT_POLICIES)}){fsdp}"
        ) from error


def device_memory_line() -> str:
    """'the NVIDIA H100 80GB HBM3 holds 79.1 GiB': the first local device's memory limit;
    for CPU devices (which report none) the host's memory or address-space limit."""
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
        return f"the {device.device_kind} holds {limit / 2**30:,.1f} GiB"
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        limit = min(limit, address_space)
    return f"this host's processes may use {limit / 2**30:,.1f} GiB"


class Progress:
    """A tqdm bar when stdout is a terminal; plain lines otherwise; silent off process 0."""

    def __init__(self, start: int, total: int):
        self._bar = None
        self._quiet = jax.process_index() != 0
        if sys.stdout.isatty() and not self._quiet:
            import tqdm
            self._bar = tqdm.tqdm(initial=start, total=total, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        elif not self._quiet:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


if __name__ == "__main__":
    launch.main("t5x_lite.train.run", description=__doc__)
