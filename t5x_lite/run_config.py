"""The run's configuration that the entry points share: which data at which lengths and batch
size (DataConfig), how long and how often (LoopConfig, with the NaN policy), and the checks,
console lines and validation loss every entry point needs. Gin binds these classes
(gin/runs/*.gin); train.py, eval.py, infer.py and precompile.py build them, so that no entry
point imports another."""
import dataclasses
import json
import os
from typing import Callable

import jax

from t5x_lite import choices
from t5x_lite import faults
from t5x_lite import models
from t5x_lite import partitioning
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline
from t5x_lite.data import tasks


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
    # The batch layout of the model family (pipeline.py); set from the model by for_model.
    decoder_only: bool = False
    encoder_only: bool = False

    def __post_init__(self):
        # Which lengths a run needs depends on the model family: for_model checks them (an
        # encoder-only model ignores a 'targets' length).
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

    def for_model(self, model_config: models.T5Config) -> "DataConfig":
        """This config with the batch layout of model_config's family, once its inputs fit
        the model (LongT5's blocks: T5Config.check_encoder_length)."""
        if self.task_feature_lengths and "inputs" in self.task_feature_lengths:
            model_config.check_encoder_length(self.task_feature_lengths["inputs"])
        # The lengths and the task fit the model's family (pipeline.py's layouts).
        if self.task_feature_lengths is not None:
            if model_config.encoder_only:
                pipeline.encoder_only_lengths(self.task_feature_lengths)
            else:
                pipeline.check_lengths(self.task_feature_lengths, ("targets",))
        if self.mixture_or_task_name is not None:
            check_task_fits(model_config, self.mixture_or_task_name)
        return dataclasses.replace(self, decoder_only=model_config.decoder_only,
                                   encoder_only=model_config.encoder_only)

    def row_lengths(self) -> tuple[int, int]:
        """(inputs, targets) tokens of a row: 0 inputs for a task of targets only (a causal
        LM, whose 'inputs' length is ignored) or where none is given; 0 targets for an
        encoder-only model (its rows are the 'inputs' length)."""
        if self.encoder_only:
            return self.task_feature_lengths["inputs"], 0
        targets = self.task_feature_lengths["targets"]
        if self.decoder_only and self.mixture_or_task_name and not tasks.has_inputs(
                self.mixture_or_task_name):
            return 0, targets
        return self.task_feature_lengths.get("inputs", 0), targets

    def prompt_length(self) -> int:
        """Tokens of the inputs a row holds, EOS included: the 'inputs' length, or for a
        causal-LM run (which has none) its 'targets' length."""
        lengths = self.task_feature_lengths
        return lengths.get("inputs", lengths["targets"])

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
            shard_indices=self.host_shards(mesh), decoder_only=self.decoder_only,
            encoder_only=self.encoder_only)

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
    # What a step whose loss or gradient norm is not finite does (faults.NanPolicy; gin
    # binds 'stop', 'skip' or 'rollback').
    nan_policy: faults.NanPolicy = faults.NanPolicy.STOP
    max_consecutive_skips: int = 10
    max_rollbacks: int = 3

    def __post_init__(self):
        for name in ("train_steps", "checkpoint_period", "eval_period", "log_period",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        choices.set_parsed(self, "nan_policy", faults.NanPolicy, "LoopConfig.nan_policy")
        if self.metrics_period < 0:
            raise ValueError(f"metrics_period must be >= 0 (0: off), got {self.metrics_period}")
        if self.metrics_examples is not None and self.metrics_examples < 1:
            raise ValueError(f"metrics_examples must be >= 1 or None, got "
                             f"{self.metrics_examples}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {self.eval_steps}")


def say(line: str) -> None:
    """Prints a console line from process 0 only, so a multi-host run logs once."""
    if jax.process_index() == 0:
        print(line, flush=True)


def check_task_fits(model_config: models.T5Config, task_name: str) -> None:
    """An encoder-only model trains on masked-LM tasks (num_classes = 0) or classification
    tasks of its head's classes; the other families on neither."""
    classes, masked_lm = tasks.num_classes(task_name), tasks.is_masked_lm(task_name)
    if not model_config.encoder_only:
        if classes or masked_lm:
            kind = "a masked-LM" if masked_lm else "a classification"
            raise ValueError(f"task {task_name!r} is {kind} task, for encoder_only models: use "
                             "an encoder-only preset (gin/models/encoder_only_*.gin)")
        return
    if model_config.num_classes and classes != model_config.num_classes:
        what = (f"has {classes} classes (labels 0 to {classes - 1})" if classes else
                "is not a classification task")
        beyond = (f"label {classes - 1} is" if classes == model_config.num_classes + 1 else
                  f"labels {model_config.num_classes} to {classes - 1} are")
        outside = f": {beyond} outside the head" if classes > model_config.num_classes else ""
        raise ValueError(f"task {task_name!r} {what}, but the model's head has "
                         f"models.T5Config.num_classes = {model_config.num_classes}{outside}; "
                         + (f"bind models.T5Config.num_classes = {classes}" if classes else
                            "train a classifier on a classification task"))
    if not model_config.num_classes and not masked_lm:
        fix = (f"bind models.T5Config.num_classes = {classes} to fine-tune a classifier"
               if classes else "train it on a masked-LM task (gin/objectives/bert_mlm.gin) or "
               "a classification task, or use an encoder_decoder or decoder_only model")
        raise ValueError(f"task {task_name!r} has "
                         f"{'labels' if classes else 'targets to generate'}, which an "
                         f"encoder_only masked LM cannot train on: {fix}")


def check_vocabulary(model_config: models.T5Config, data: DataConfig) -> None:
    vocab_size = tasks.text_vocabulary(data.mixture_or_task_name).vocab_size
    if model_config.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the "
                         f"task vocabulary ({vocab_size}): set T5Config.vocab_size >= "
                         f"{vocab_size}")


def validation_scores(eval_step: Callable, params, data: DataConfig, mesh,
                      eval_steps: int | None) -> dict[str, float]:
    """Token-weighted loss and accuracy over the validation split (or its first batches)."""
    batches, sums = data.batches("validation", mesh, shuffle=False, seed=0, repeat=False), []
    while eval_steps is None or len(sums) < eval_steps:
        local = next(batches, None)
        if not partitioning.any_process(local is not None):
            break
        if local is None:
            # Hosts' shards of the split differ in length, and every host must join each
            # step: one that has run out feeds all-zero rows, which carry zero loss weight.
            local = batches.zeros()
        sums.append(eval_step(params, partitioning.global_batch(local, mesh)))
    if not sums:
        raise ValueError(f"task {data.mixture_or_task_name!r} has an empty validation split")
    return trainer_lib.summarize_eval(jax.device_get(sums))


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
