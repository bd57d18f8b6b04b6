"""Pretraining entry point: python -m t5x_lite.train --gin_file=gin/quickstart.gin
--gin.MODEL_DIR="'/tmp/run'" [--gin.TRAIN_STEPS=1000 ...]. Rerunning the same command resumes
from the newest checkpoint in MODEL_DIR; a finished run says so and exits 0. Multi-host: every
process runs the same command (scripts/launch_*.sh); process 0 alone prints and writes metrics,
all of them save checkpoints together."""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "before the first step, nothing was saved; rerun the same command to "
              "start (or resume)")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Iterator, Sequence  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from t5x_lite import checkpoints  # noqa: E402
from t5x_lite import evaluation  # noqa: E402
from t5x_lite import faults  # noqa: E402
from t5x_lite import flops  # noqa: E402
from t5x_lite import gin_checks  # noqa: E402
from t5x_lite import hf  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import layers  # noqa: E402
from t5x_lite import metrics_io  # noqa: E402
from t5x_lite import models  # noqa: E402
from t5x_lite import moe  # noqa: E402
from t5x_lite import optimizers  # noqa: E402
from t5x_lite import partitioning  # noqa: E402
from t5x_lite import trainer as trainer_lib  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402
from t5x_lite.data import tasks  # noqa: E402


# A DataConfig setting left None (gin/defaults.gin) in a training run: T5's.
TRAINING_DEFAULTS = {"task_feature_lengths": {"inputs": 512, "targets": 114},
                     "batch_size": 128, "num_input_shards": 1}
# The settings a run records in MODEL_DIR/data.json, by the macro that sets each.
RUN_SETTINGS = {"mixture_or_task_name": "MIXTURE_OR_TASK_NAME",
                "task_feature_lengths": "TASK_FEATURE_LENGTHS", "batch_size": "BATCH_SIZE",
                "num_input_shards": "NUM_INPUT_SHARDS"}
RUN_DATA_FILE = "data.json"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which seqio task or mixture feeds the model, at which lengths and global batch size,
    read as `num_input_shards` input shards (pipeline.py): the global batches are the same for
    any number of hosts whose devices hold whole shards' rows (for data parallelism, a process
    count that divides it). `resume_without_input_position` lets a run resume a checkpoint
    whose saved input positions are for another shard count: parameters and optimizer state
    as saved, the input stream started anew (seeded by the step).

    A RUN_SETTINGS field left None is filled before use: `for_training` takes T5's defaults,
    `as_trained` (evaluation, inference) the ones MODEL_DIR's run trained with."""

    mixture_or_task_name: str | None = None
    task_feature_lengths: dict | None = None
    batch_size: int | None = None
    pack: bool = True
    num_input_shards: int | None = None
    resume_without_input_position: bool = False

    def __post_init__(self):
        if self.task_feature_lengths is not None:
            pipeline.check_lengths(self.task_feature_lengths)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"BATCH_SIZE must be >= 1, got {self.batch_size}")
        if self.num_input_shards is not None and self.num_input_shards < 1:
            raise ValueError(f"NUM_INPUT_SHARDS must be >= 1, got {self.num_input_shards}")
        if self.batch_size and self.num_input_shards and self.batch_size % self.num_input_shards:
            raise ValueError(f"BATCH_SIZE {self.batch_size} does not split over "
                             f"NUM_INPUT_SHARDS = {self.num_input_shards} input shards: use a "
                             f"multiple of {self.num_input_shards}")

    def unset(self) -> list[str]:
        return [name for name in RUN_SETTINGS if getattr(self, name) is None]

    def filled(self, settings: dict) -> "DataConfig":
        """This config with each setting left None taken from `settings`."""
        return dataclasses.replace(self, **{name: settings[name] for name in self.unset()
                                            if name in settings})

    def for_training(self) -> "DataConfig":
        if self.mixture_or_task_name is None:
            raise ValueError("MIXTURE_OR_TASK_NAME is not set: pass "
                             "--gin.MIXTURE_OR_TASK_NAME=\"'stdlib_span_corruption'\" (or your "
                             "own task, README: Your own corpus)")
        return self.filled(TRAINING_DEFAULTS)

    def as_trained(self, model_dir: str) -> "DataConfig":
        """This config with each setting left None taken from MODEL_DIR/data.json (written by
        the run that trained it), else T5's defaults; says which it used."""
        if not self.unset():
            return self
        path = os.path.join(model_dir, RUN_DATA_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                trained, source = json.load(f), f"the training run ({path})"
        else:
            trained, source = TRAINING_DEFAULTS, f"T5's defaults ({path} does not exist)"
        if self.mixture_or_task_name is None and "mixture_or_task_name" not in trained:
            raise ValueError(f"MIXTURE_OR_TASK_NAME is not set and {path} does not exist: "
                             "pass --gin.MIXTURE_OR_TASK_NAME=\"'the_task'\"")
        completed = self.filled(trained)
        used = ", ".join(f"{RUN_SETTINGS[name]} = {getattr(completed, name)!r}"
                         for name in self.unset())
        say(f"Using {used} from {source}; bind them to use others.")
        return completed

    def run_settings(self) -> dict:
        return {name: getattr(self, name) for name in RUN_SETTINGS}

    def host_batch_size(self) -> int:
        if self.batch_size % jax.process_count():
            raise ValueError(f"BATCH_SIZE {self.batch_size} must divide evenly over "
                             f"{jax.process_count()} processes")
        return self.batch_size // jax.process_count()

    def host_shards(self, mesh) -> range:
        """The input shards whose rows this process's devices hold; ValueError naming the
        process counts that work when the rows do not fall on whole shards."""
        rows = partitioning.process_rows(mesh, self.batch_size)
        shard_rows = self.batch_size // self.num_input_shards
        if rows.start % shard_rows or len(rows) % shard_rows:
            groups = self.batch_size // len(rows)
            divisors = [n for n in range(1, self.num_input_shards + 1)
                        if self.num_input_shards % n == 0]
            raise ValueError(
                f"NUM_INPUT_SHARDS = {self.num_input_shards} does not divide over "
                f"the {groups} processes that hold distinct rows of each batch: run on a "
                f"process count that divides it ({', '.join(map(str, divisors))}), or bind "
                f"NUM_INPUT_SHARDS to a multiple of {groups} (another input stream: a run with "
                "checkpoints then resumes only with RESUME_WITHOUT_INPUT_POSITION = True)")
        return range(rows.start // shard_rows, rows.stop // shard_rows)

    def host_shard_names(self, mesh) -> list[str]:
        return [pipeline.shard_name(index, self.num_input_shards)
                for index in self.host_shards(mesh)]

    def batches(self, split: str, mesh, *, shuffle: bool, seed: int | None, repeat: bool,
                pack: bool | None = None) -> pipeline.ShardedBatches:
        """This host's rows of each global batch; endless with `repeat` (training, with a
        position that checkpoints save), else one pass with zero rows past a shard's end."""
        return pipeline.get_shard_batches(
            self.mixture_or_task_name, split, dict(self.task_feature_lengths),
            self.batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
            pack=self.pack if pack is None else pack, num_shards=self.num_input_shards,
            shard_indices=self.host_shards(mesh))

    def has_split(self, split: str) -> bool:
        return split in tasks.get_task_or_mixture(self.mixture_or_task_name).splits


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length of the run and how often it logs, evaluates and checkpoints (in steps)."""

    model_dir: str
    train_steps: int
    checkpoint_period: int = 1000
    keep_checkpoints: int = 3
    eval_period: int = 1000
    eval_steps: int | None = None  # None: the whole validation split.
    log_period: int = 100
    seed: int = 0
    # Decode the validation split and score the task's metrics (BLEU, ROUGE, ...) every
    # metrics_period steps, at step 0 and at the end; 0 never does.
    metrics_period: int = 0
    metrics_examples: int | None = None  # None: the whole validation split.
    # A step whose loss or gradient norm is not finite: "stop" (before any checkpoint holds
    # its result), "skip" (no update; counted as skipped_steps; more than
    # max_consecutive_skips in a row stop the run) or "rollback" (back to the newest
    # checkpoint, then on with the next batches; at most max_rollbacks times in a row).
    nan_policy: str = "stop"
    max_consecutive_skips: int = 10
    max_rollbacks: int = 3

    def __post_init__(self):
        for name in ("train_steps", "checkpoint_period", "eval_period", "log_period",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nan_policy not in faults.NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {', '.join(faults.NAN_POLICIES)}, got "
                             f"{self.nan_policy!r}")
        if self.metrics_period < 0:
            raise ValueError(f"metrics_period must be >= 0 (0: off), got {self.metrics_period}")
        if self.metrics_examples is not None and self.metrics_examples < 1:
            raise ValueError(f"metrics_examples must be >= 1 or None, got "
                             f"{self.metrics_examples}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {self.eval_steps}")


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


def say(line: str) -> None:
    """Prints a console line from process 0 only, so a multi-host run logs once."""
    if jax.process_index() == 0:
        print(line, flush=True)


def check_vocabulary(model_config: models.T5Config, data: DataConfig) -> None:
    task = tasks.get_task_or_mixture(data.mixture_or_task_name)
    vocab_size = task.output_features["targets"].vocabulary.vocab_size
    if model_config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the "
                         f"task vocabulary ({vocab_size}): set T5Config.vocab_size >= "
                         f"{vocab_size}")


def evaluate(eval_step: Callable, params, data: DataConfig, mesh, eval_steps: int | None
             ) -> dict[str, float]:
    """Token-weighted loss and accuracy over the validation split (or its first batches)."""
    batches, sums = data.batches("validation", mesh, shuffle=False, seed=0, repeat=False), []
    while eval_steps is None or len(sums) < eval_steps:
        local = next(batches, None)
        if not partitioning.any_process(local is not None):
            break
        if local is None:
            # Hosts' shards of the split differ in length, and every host must join each
            # step: one that has run out feeds all-zero rows, which carry zero loss weight.
            local = zero_batch(data.task_feature_lengths, data.host_batch_size())
        sums.append(eval_step(params, partitioning.global_batch(local, mesh)))
    if not sums:
        raise ValueError(f"task {data.mixture_or_task_name!r} has an empty validation split")
    return trainer_lib.summarize_eval(jax.device_get(sums))


def zero_batch(task_feature_lengths: dict, batch_size: int) -> dict[str, np.ndarray]:
    lengths = {"encoder": task_feature_lengths["inputs"],
               "decoder": task_feature_lengths["targets"]}
    return {key: np.zeros((batch_size, lengths[key.split("_")[0]]), np.int32)
            for key in pipeline.BATCH_KEYS}


def check_batch_divides(data: DataConfig, mesh_config: partitioning.MeshConfig,
                        num_microbatches: int, device_count: int | None = None) -> None:
    """The global batch must split evenly over the batch's devices (of `device_count`, by
    default all of this run's) and the microbatches."""
    batch_devices = mesh_config.batch_divisor(device_count or jax.device_count())
    divisor = batch_devices * num_microbatches
    if data.batch_size % divisor:
        raise ValueError(
            f"BATCH_SIZE {data.batch_size} does not divide over data x fsdp x expert = "
            f"{batch_devices} devices x num_microbatches = {num_microbatches}: use a "
            f"multiple of {divisor}")


def restore_or_init(trainer: trainer_lib.Trainer, manager, seed: int,
                    upcycle_from: str | None = None, init_from: str | None = None,
                    input_shards: Sequence[str] = ()
                    ) -> tuple[trainer_lib.TrainState, dict | None]:
    """The newest checkpoint in MODEL_DIR with the saved positions of `input_shards` (None
    when it lacks any of them); else step 0 from the parameters of `init_from`'s newest
    checkpoint, or upcycled from `upcycle_from`'s; else a fresh initialisation (no input
    position: the pipeline starts at the beginning)."""
    for name in checkpoints.incomplete_checkpoints(manager):
        say(f"Skipping {name} in {manager.directory}: an interrupted save, never complete "
            "(left in place).")
    restored = checkpoints.restore_latest(manager, trainer.sharded_abstract_state(),
                                          input_shards)
    if restored is not None:
        say(f"Resuming from checkpoint at step {int(restored[0].step)}.")
        return restored
    if init_from:
        return pretrained_state(trainer, init_from), None
    if upcycle_from:
        return upcycled_state(trainer, upcycle_from, seed), None
    return trainer.init_state(seed), None


def pretrained_state(trainer: trainer_lib.Trainer, model_dir: str) -> trainer_lib.TrainState:
    """Step 0 with the parameters of the newest checkpoint in `model_dir` (a MODEL_DIR, or a
    Hugging Face T5 directory, of this architecture) and a fresh optimizer state: the start
    of a fine-tuning run."""
    if os.path.isfile(os.path.join(model_dir, hf.CONFIG_FILE)):
        return hf_state(trainer, model_dir)
    manager = checkpoints.create_manager(model_dir, read_only=True)
    try:
        step, params = checkpoints.restore_params(manager,
                                                  trainer.sharded_abstract_state().params)
    except FileNotFoundError:
        raise FileNotFoundError(f"INIT_FROM {model_dir!r} holds no checkpoint: point it at the "
                                "MODEL_DIR of the pretraining run") from None
    say(f"Initialised from the checkpoint at step {step} in {model_dir}: parameters only, "
        "fresh optimizer state, step 0.")
    return trainer.state_from_params(params)


# T5Config fields that change what the parameters compute; the rest (dropout, dtype, remat,
# z-loss) are the fine-tuning run's own choice.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                       "num_encoder_layers", "num_decoder_layers", "activation", "gated_mlp",
                       "tie_embeddings", "relative_attention_num_buckets",
                       "relative_attention_max_distance", "layer_norm_epsilon")


def hf_state(trainer: trainer_lib.Trainer, hf_dir: str) -> trainer_lib.TrainState:
    """Step 0 with the parameters of a Hugging Face T5 directory, sharded like the trainer's."""
    hf_model, params = hf.load_t5(hf_dir)
    ours = trainer.model.config
    for field in ARCHITECTURE_FIELDS:
        theirs, mine = getattr(hf_model.config, field), getattr(ours, field)
        if field == "activation":
            theirs, mine = hf.activation_name(theirs), hf.activation_name(mine)
        if theirs != mine:
            raise ValueError(f"INIT_FROM {hf_dir!r} has {field} = {theirs}, the gin model "
                             f"{mine}: bind models.T5Config.{field} = {theirs} (or use the "
                             f"matching gin/models/ preset)")
    if ours.scan_layers or ours.moe is not None:
        raise ValueError("a Hugging Face T5 has separate dense layers: fine-tune it with "
                         "models.T5Config.scan_layers = False and moe = None")
    params = jax.device_put(params, trainer.state_shardings.params)
    say(f"Initialised from the Hugging Face T5 in {hf_dir}: parameters only, fresh optimizer "
        "state, step 0.")
    return trainer.state_from_params(params)


def check_upcycling(model_config: models.T5Config, upcycle_from: str | None) -> None:
    if not upcycle_from:
        return
    if model_config.moe is None:
        raise ValueError("upcycle_from needs an MoE model: bind models.T5Config.moe (e.g. "
                         "include gin/models/switch_tiny.gin)")
    if model_config.moe.extra_dense_mlp:
        raise ValueError("upcycling copies each dense MLP into the experts, but "
                         "moe.MoeConfig.extra_dense_mlp adds MLPs the dense model lacks: set "
                         "it to False")
    try:
        checkpoints.latest_step(checkpoints.create_manager(upcycle_from, read_only=True))
    except FileNotFoundError:
        raise FileNotFoundError(f"UPCYCLE_FROM {upcycle_from!r} holds no checkpoint: point it "
                                "at the MODEL_DIR of a dense run that has saved one") from None


def upcycled_state(trainer: trainer_lib.Trainer, dense_model_dir: str, seed: int
                   ) -> trainer_lib.TrainState:
    """Step 0 of an MoE run whose parameters are the dense run's newest checkpoint, every
    expert a copy of its layer's dense MLP and routers freshly initialised (moe.upcycle),
    with a fresh optimizer state. The dense parameters are restored into shards."""
    manager = checkpoints.create_manager(dense_model_dir, read_only=True)
    step, metadata = checkpoints.params_metadata(manager)
    param_shardings = trainer.state_shardings.params
    shardings = moe.dense_shardings(param_shardings)
    abstract = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=shardings.get(
                jax.tree_util.keystr(path), partitioning.replicated(trainer.mesh))), metadata)
    _, dense_params = checkpoints.restore_params(manager, abstract)
    with trainer_lib.mesh_context(trainer.mesh, trainer.rules):
        # The same router initialisation as a fresh MoE run with this seed.
        fresh_params = jax.jit(trainer.model.init, out_shardings=param_shardings)(
            jax.random.key(seed))
        params = jax.jit(moe.upcycle, out_shardings=param_shardings)(fresh_params, dense_params)
    say(f"Upcycled from the dense checkpoint at step {step} in {dense_model_dir}: every "
        "expert starts as its layer's dense MLP, routers fresh.")
    return trainer.state_from_params(params)


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


def run(model_config: models.T5Config = gin.REQUIRED, data: DataConfig = gin.REQUIRED,
        loop: LoopConfig = gin.REQUIRED,
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
    if require_init_from and not init_from:
        raise ValueError("INIT_FROM is not set: fine-tuning starts from a trained MODEL_DIR or "
                         "Hugging Face directory, pass --gin.INIT_FROM=\"'runs/quickstart'\"")
    data = data.for_training()
    if upcycle_from and init_from:
        raise ValueError("set INIT_FROM (same architecture) or UPCYCLE_FROM (dense into MoE), "
                         "not both")
    check_batch_divides(data, mesh_config, num_microbatches)
    check_upcycling(model_config, upcycle_from)
    trainer = trainer_lib.build_trainer(
        model_config, learning_rate, optimizer, mesh_config, loop.seed, num_microbatches,
        loop.max_consecutive_skips if loop.nan_policy == "skip" else None)
    input_shards = data.host_shard_names(trainer.mesh)
    model_dir = prepare_model_dir(loop.model_dir)
    check_vocabulary(model_config, data)
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
        state, input_position = restore_or_init(trainer, manager, loop.seed, upcycle_from,
                                                init_from, input_shards)
        start_step = int(state.step)
        if start_step >= loop.train_steps:
            say(f"Training already finished: checkpoint at step {start_step} >= TRAIN_STEPS "
                f"{loop.train_steps} in {model_dir}.")
            return
        batches = train_batches(data, trainer.mesh, loop.seed, start_step, input_position,
                                manager)
        try:
            train_loop(trainer, state, manager, data, loop, model_dir, batches)
        finally:
            # Whatever stops the run, a checkpoint being written in the background completes.
            manager.wait_until_finished()


def write_run_files(model_dir: str, data: DataConfig) -> None:
    """MODEL_DIR/config.gin (every setting of the run, for eval, infer and convert_hf) and
    data.json (the data settings that evaluation and inference default to), each written
    whole or not at all."""
    if jax.process_index() != 0:
        return
    for name, text in (("config.gin", gin_checks.config_text()),
                       (RUN_DATA_FILE, json.dumps(data.run_settings(), indent=1) + "\n")):
        path = os.path.join(model_dir, name)
        with open(path + ".partial", "w") as f:
            f.write(text)
        os.replace(path + ".partial", path)


@contextlib.contextmanager
def out_of_memory_explained(data: DataConfig, num_microbatches: int,
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
            f"models.T5Config.remat_policy (now {model_config.remat_policy!r}; "
            f"{'/'.join(repr(p) for p in layers.REMAT_POLICIES if p != 'none')}){fsdp}"
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


def train_batches(data: DataConfig, mesh, seed: int, start_step: int,
                  input_position: dict | None, manager) -> pipeline.ShardedBatches:
    """The training batches, from the saved position when the checkpoint has one for every
    input shard this process reads, so a resumed run reads exactly what an uninterrupted one
    would. A checkpoint saved for another shard count is an error naming the fix, unless
    data.resume_without_input_position starts the stream anew."""
    if input_position is not None or start_step == 0:
        batches = data.batches("train", mesh, shuffle=True, seed=seed, repeat=True)
        if input_position is not None:
            batches.restore(input_position)
        return batches
    saved = checkpoints.saved_input_shards(manager, start_step)
    if not saved:
        # A checkpoint from before input positions were saved: fresh examples, not a replay.
        say(f"The checkpoint at step {start_step} holds no input position: reading batches "
            f"shuffled with seed {seed} + {start_step} instead.")
    elif not data.resume_without_input_position:
        saved_count = saved_shard_count(saved)
        anew = ("RESUME_WITHOUT_INPUT_POSITION = True to resume its parameters and optimizer "
                "state on a new input stream")
        fix = (f"{plural(saved_count, 'input shard')}, this run reads NUM_INPUT_SHARDS = "
               f"{data.num_input_shards}: bind NUM_INPUT_SHARDS = {saved_count} to resume "
               f"exactly, or bind {anew}" if saved_count else
               f"each process, as an earlier t5x_lite saved them ({', '.join(saved)}): "
               f"bind {anew}")
        raise ValueError(f"checkpoint {manager.directory}/{start_step} holds input positions "
                         f"for {fix}")
    else:
        shards, saved_shards = (plural(count, "input shard")
                                for count in (data.num_input_shards, len(saved)))
        say(f"WARNING: resuming step {start_step}'s parameters and optimizer state on a NEW "
            f"input stream (seed {seed} + {start_step}, {shards}), not the saved positions of "
            f"{saved_shards}: the batches from here on differ from an uninterrupted run's "
            "(RESUME_WITHOUT_INPUT_POSITION = True).")
    return data.batches("train", mesh, shuffle=True, seed=seed + start_step, repeat=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def saved_shard_count(names: Sequence[str]) -> int | None:
    """The shard count in saved position names (pipeline.shard_name); None for positions an
    earlier t5x_lite saved per process."""
    if all(name.startswith("shard_") for name in names):
        return int(names[0].rpartition("-of-")[2])
    return None


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


def rolled_back(trainer: trainer_lib.Trainer, manager, error: faults.NonFiniteLoss,
                rollbacks: int, loop: LoopConfig) -> trainer_lib.TrainState:
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


def train_loop(trainer: trainer_lib.Trainer, state: trainer_lib.TrainState, manager,
               data: DataConfig, loop: LoopConfig, model_dir: str,
               batches: pipeline.ShardedBatches) -> None:
    writer = metrics_io.MetricsWriter(model_dir)
    train_step, eval_step = trainer.compile_train_step(), trainer.compile_eval_step()
    step = int(state.step)
    lengths = data.task_feature_lengths
    devices = trainer.mesh.devices.size
    peak = flops.peak_bf16_flops(trainer.mesh.devices.flat[0].device_kind)
    period = metrics_io.LogPeriod(
        step, data.batch_size * (lengths["inputs"] + lengths["targets"]),
        flops.model_flops_per_step(trainer.model.config, data.batch_size, lengths["inputs"],
                                   lengths["targets"]),
        devices, peak and peak * devices)
    report_metrics = task_metrics_reporter(trainer, data, loop, writer)
    if step == 0:
        report_eval(writer, eval_step, state, data, trainer.mesh, loop, say)
        report_metrics(state, say)
    progress, rollbacks, metrics = Progress(step, loop.train_steps), 0, None
    run_files_written = False
    with faults.StopRequest() as stop:
        while step < loop.train_steps:
            step += 1
            wait_start = time.perf_counter()
            local_batch = next(batches)
            period.add_data_wait(time.perf_counter() - wait_start, metrics)
            state, metrics = train_step(state, partitioning.global_batch(local_batch,
                                                                         trainer.mesh))
            if not run_files_written:
                # Once a step has run: a run that never trained leaves no config behind.
                jax.block_until_ready(metrics)
                write_run_files(model_dir, data)
                run_files_written = True
            period.add(step, metrics)
            progress.advance()
            saving = step % loop.checkpoint_period == 0 or step == loop.train_steps
            if step % loop.log_period == 0 or saving:
                try:
                    faults.check_finite(period.fetch(), step, loop.nan_policy,
                                        loop.max_consecutive_skips, manager.latest_step)
                except faults.NonFiniteLoss as error:
                    if loop.nan_policy != "rollback":
                        raise
                    rollbacks += 1
                    state = rolled_back(trainer, manager, error, rollbacks, loop)
                    step, period.rows = int(state.step), []
                    continue
                rollbacks = 0
            if step % loop.log_period == 0:
                row, seconds_left = period.take_row(step, loop.train_steps)
                writer.write(step, row, "train")
                progress.print(metrics_io.format_train_line(step, loop.train_steps, row,
                                                            seconds_left))
                for line in metrics_io.format_moe_lines(row):
                    progress.print(line)
            pause_start = time.perf_counter()
            if step % loop.eval_period == 0 or step == loop.train_steps:
                report_eval(writer, eval_step, state, data, trainer.mesh, loop, progress.print)
            if loop.metrics_period and (step % loop.metrics_period == 0
                                        or step == loop.train_steps):
                report_metrics(state, progress.print)
            if saving:
                checkpoints.save(manager, state, batches.state())
            period.paused += time.perf_counter() - pause_start
            if stop.requested() and step < loop.train_steps:
                progress.close()
                stop_after_saving(manager, state, batches, stop.signal_number, model_dir)
    progress.close()
    manager.wait_until_finished()
    say(f"Finished at step {loop.train_steps}; checkpoints in "
        f"{checkpoints.checkpoint_dir(model_dir)}")


def report_eval(writer: metrics_io.MetricsWriter, eval_step: Callable,
                state: trainer_lib.TrainState, data: DataConfig, mesh, loop: LoopConfig,
                print_line: Callable[[str], None]) -> None:
    if not data.has_split("validation"):
        return
    scores = evaluate(eval_step, state.params, data, mesh, loop.eval_steps)
    step = int(state.step)
    writer.write(step, scores, "validation")
    print_line(f"step {step:>6d}  validation loss {scores['loss']:.4f}  "
               f"accuracy {scores['accuracy']:.4f}")


def task_metrics_reporter(trainer: trainer_lib.Trainer, data: DataConfig, loop: LoopConfig,
                          writer: metrics_io.MetricsWriter) -> Callable:
    """report(state, print_line): decodes the validation split greedily and writes and
    prints the task's metrics; does nothing when metrics_period is 0 or the task has no
    metric functions. The examples are read once, here."""
    if not loop.metrics_period:
        return lambda state, print_line: None
    if not evaluation.has_metrics(data.mixture_or_task_name):
        say(f"METRICS_PERIOD is {loop.metrics_period}, but {data.mixture_or_task_name!r} has no "
            "metric functions: only the validation loss is reported.")
        return lambda state, print_line: None
    task_metrics = evaluation.TaskMetrics(
        data.mixture_or_task_name, "validation", dict(data.task_feature_lengths),
        data.batch_size, loop.metrics_examples)
    vocabulary = tasks.get_task_or_mixture(
        data.mixture_or_task_name).output_features["targets"].vocabulary
    predict = evaluation.predictor(trainer.model, trainer.mesh, trainer.rules,
                                   task_metrics.decode_length, vocabulary.eos_id)

    def report(state: trainer_lib.TrainState, print_line: Callable[[str], None]) -> None:
        step = int(state.step)
        values = task_metrics(predict, state.params, step)
        writer.write(step, values, "validation")
        print_line(f"step {step:>6d}  validation {metrics_io.format_task_metrics(values)}")

    return report


if __name__ == "__main__":
    launch.main("t5x_lite.train.run", description=__doc__)
