"""Which model family learns most from the same corpus and compute? Pretrains four models on
the embedded corpus side by side, at matched parameter count (printed) and matched training
FLOPs (each run's steps = the budget / its model FLOPs a step), then fine-tunes each for the
same number of steps and evaluates all four on the same held-out tasks:

  encoder-decoder  t5_1_1_tiny        span corruption
  decoder-only     decoder_only_tiny  causal LM
  decoder-only     decoder_only_tiny  prefix-LM (UL2's mixture of denoisers)
  encoder-only     encoder_only_tiny  masked LM (BERT's 15%, 80/10/10)

  stdlib_docstrings        a function -> its docstring's first line: BLEU and ROUGE-L of
                           greedy decodes (the three families that generate);
  stdlib_docstring_choice  which of four docstrings is the function's: rank classification
                           by score; the encoder-only model answers through a 4-way pooled
                           classification head (stdlib_docstring_choice_classification).

Both tasks hold out the files of the corpus's validation split, which no pretraining row saw.
Writes OUT/comparison.md (the table), OUT/comparison.json (its numbers), OUT/loss_vs_flops.png
and each run's MODEL_DIR under OUT; shows each run's progress; stopped (Ctrl-C), it resumes
when rerun with the same arguments.

  python scripts/compare_architectures.py [--out runs/compare] [--budget-tflops 12]
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The models' embedded-corpus vocabulary (8,000 pieces + 100 sentinels), rounded up to a
# multiple of 128 as the quickstart does.
VOCAB_SIZE = 8192
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run's exit statuses when stopped by SIGINT / SIGTERM, after saving a checkpoint.
STOPPED = (130, 143)


@dataclasses.dataclass(frozen=True)
class Contender:
    """One model family and pretraining objective."""

    key: str  # its directory under OUT
    family: str
    objective: str
    model_gin: str
    objective_gin: str
    # Bindings of every run of this contender (pretraining and fine-tuning).
    bindings: tuple[str, ...] = ()
    generates: bool = True
    # Pretraining rows of one sequence (a causal LM's, a masked LM's): inputs + targets tokens
    # each, the tokens an encoder-decoder's row holds in two.
    one_sequence: bool = False


CONTENDERS = (
    Contender("encoder_decoder", "encoder-decoder", "span corruption",
              "gin/models/t5_1_1_tiny.gin", "gin/objectives/span_corruption.gin"),
    # Untied logits, as t5_1_1_tiny's: the parameter counts then agree within 5%.
    Contender("decoder_only_causal", "decoder-only", "causal LM",
              "gin/models/decoder_only_tiny.gin", "gin/objectives/causal_lm.gin",
              ("models.T5Config.tie_embeddings=False",
               "models.T5Config.bidirectional_inputs=False"), one_sequence=True),
    Contender("decoder_only_prefix", "decoder-only", "prefix-LM (UL2)",
              "gin/models/decoder_only_tiny.gin", "gin/objectives/ul2.gin",
              ("models.T5Config.tie_embeddings=False",)),
    Contender("encoder_only", "encoder-only", "masked LM",
              "gin/models/encoder_only_tiny.gin", "gin/objectives/bert_mlm.gin",
              ("models.T5Config.tie_embeddings=False",), generates=False, one_sequence=True),
)

DOCSTRINGS_TASK = "stdlib_docstrings"
CHOICE_TASK = "stdlib_docstring_choice"
CLASSIFICATION_TASK = "stdlib_docstring_choice_classification"
# Docstrings a question of the choice tasks offers (corpora.stdlib_multiple_choice_source).
CHOICES = 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare", help="output directory")
    parser.add_argument("--budget-tflops", type=float, default=12.0,
                        help="pretraining model TFLOPs of each run (default 12)")
    parser.add_argument("--finetune-steps", type=int, default=150,
                        help="fine-tuning steps of each model on each task (default 150)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lengths", default="128,32",
                        help="pretraining inputs,targets tokens (a causal LM's or masked "
                             "LM's rows: their sum)")
    parser.add_argument("--task-lengths", default="256,32",
                        help="fine-tuning inputs,targets tokens")
    parser.add_argument("--eval-steps", type=int, default=20,
                        help="validation batches of each pretraining run's loss")
    parser.add_argument("--metrics-examples", type=int, default=None,
                        help="held-out functions (questions) each task metric is computed "
                             "on (default: all of the validation split's)")
    args = parser.parse_args(argv)
    for name in ("lengths", "task_lengths"):
        try:
            inputs, targets = (int(n) for n in getattr(args, name).split(","))
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} takes two integers, e.g. 128,32")
        setattr(args, name, (inputs, targets))
    if min(args.budget_tflops, args.finetune_steps, args.batch_size, args.eval_steps,
           args.metrics_examples or 1, *args.lengths, *args.task_lengths) <= 0:
        parser.error("every size must be positive")
    return args


def pretraining_lengths(contender: Contender, lengths: tuple[int, int]) -> dict[str, int]:
    """The same tokens a row for every family: an encoder-decoder's inputs + targets are a
    decoder-only or encoder-only model's one row."""
    inputs, targets = lengths
    if contender.one_sequence:
        return {"inputs": inputs + targets, "targets": inputs + targets}
    return {"inputs": inputs, "targets": targets}


def common_bindings(contender: Contender, args: argparse.Namespace) -> list[str]:
    return [f"models.T5Config.vocab_size={VOCAB_SIZE}", f"BATCH_SIZE={args.batch_size}",
            *contender.bindings]


def pretraining_command(contender: Contender, args: argparse.Namespace, steps: int
                        ) -> list[str]:
    """Flags of t5x_lite.train for the contender's pretraining run of `steps` steps, at
    the quickstart's learning rate; its validation loss at the start and the end."""
    bindings = [
        *common_bindings(contender, args),
        f"TASK_FEATURE_LENGTHS={pretraining_lengths(contender, args.lengths)}",
        f"MODEL_DIR='{run_dir(args, contender, 'pretrain')}'", f"TRAIN_STEPS={steps}",
        f"EVAL_PERIOD={steps}", f"EVAL_STEPS={args.eval_steps}",
        f"CHECKPOINT_PERIOD={max(1, steps // 4)}", f"LOG_PERIOD={max(1, steps // 20)}",
        "optimizers.rsqrt_schedule.base_learning_rate=1.0",
        "optimizers.rsqrt_schedule.warmup_steps=1000"]
    files = [contender.model_gin, "gin/runs/pretrain.gin", contender.objective_gin]
    return gin_flags(files, bindings)


def finetuning_command(contender: Contender, args: argparse.Namespace, task: str
                       ) -> list[str]:
    """Flags of t5x_lite.train fine-tuning the contender's pretrained model on `task` for
    args.finetune_steps steps (gin/runs/finetune.gin's Adafactor at 1e-3), its task metrics
    computed on args.metrics_examples held-out functions (all: None) at the start and the
    end; rank classification scores each question's CHOICES as CHOICES examples."""
    inputs, targets = args.task_lengths
    lengths = {"inputs": inputs, "targets": targets}
    bindings = common_bindings(contender, args)
    if task == CLASSIFICATION_TASK:
        # The question and its four choices in one input.
        lengths = {"inputs": inputs + 4 * targets, "targets": 1}
        bindings.append("models.T5Config.num_classes=4")
    steps = args.finetune_steps
    bindings += [
        f"MIXTURE_OR_TASK_NAME='{task}'", f"TASK_FEATURE_LENGTHS={lengths}",
        f"INIT_FROM='{run_dir(args, contender, 'pretrain')}'",
        f"MODEL_DIR='{run_dir(args, contender, task)}'", f"TRAIN_STEPS={steps}",
        f"EVAL_PERIOD={steps}", "EVAL_STEPS=1", f"CHECKPOINT_PERIOD={max(1, steps // 2)}",
        f"LOG_PERIOD={max(1, steps // 10)}", f"METRICS_PERIOD={steps}",
        f"METRICS_EXAMPLES={metrics_examples(args.metrics_examples, task)}"]
    return gin_flags([contender.model_gin, "gin/runs/finetune.gin"], bindings)


def metrics_examples(functions: int | None, task: str) -> int | None:
    """METRICS_EXAMPLES for `functions` held-out functions of `task`: rank classification
    scores a question's every choice as an example of its own."""
    if functions is None or task != CHOICE_TASK:
        return functions
    return functions * CHOICES


def gin_flags(files: list[str], bindings: list[str]) -> list[str]:
    return ([f"--gin_file={os.path.join(REPO, path)}" for path in files]
            + [f"--gin.{binding}" for binding in bindings])


def run_dir(args: argparse.Namespace, contender: Contender, stage: str) -> str:
    return os.path.abspath(os.path.join(args.out, contender.key, stage))


@dataclasses.dataclass(frozen=True)
class Size:
    """What a contender costs: parameters and model FLOPs of one pretraining step."""

    parameters: int
    step_flops: float


def measure(contender: Contender, args: argparse.Namespace) -> Size:
    """The contender's parameter count (abstractly, no weights made) and FLOPs a step, from
    the gin files its pretraining run parses."""
    import gin
    import jax

    from t5x_lite import flops, launch, models, run_config

    launch.parse_gin(*split_flags(pretraining_command(contender, args, steps=1)))
    try:
        config = gin.get_configurable(models.T5Config)()
        data = gin.get_configurable(run_config.DataConfig)().for_model(config)
    finally:
        gin.clear_config()
    inputs, targets = data.row_lengths()
    shapes = jax.eval_shape(models.model_for(config).init, jax.random.key(0))
    return Size(models.count_parameters(shapes),
                flops.model_flops_per_step(config, args.batch_size, inputs, targets))


def split_flags(flags: list[str]) -> tuple[list[str], list[str]]:
    files = [flag.split("=", 1)[1] for flag in flags if flag.startswith("--gin_file=")]
    bindings = [flag[len("--gin."):] for flag in flags if flag.startswith("--gin.")]
    return files, bindings


def finished(model_dir: str, steps: int) -> bool:
    checkpoints = os.path.join(model_dir, "checkpoints")
    return os.path.isdir(checkpoints) and str(steps) in os.listdir(checkpoints)


def run_stage(title: str, entry: str, flags: list[str], log_path: str) -> None:
    """Runs `python -m t5x_lite.<entry> flags`, showing its step lines; its whole output goes
    to log_path. Exits as it did if it fails or is stopped (then rerunning this script
    resumes from the run's checkpoint)."""
    print(title, flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, "-m", f"t5x_lite.{entry}", *flags],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   cwd=REPO)
        try:
            for line in process.stdout:
                log.write(line)
                if line.startswith(("step ", "Stopped", "error:", "Finished")):
                    print("    " + line.rstrip(), flush=True)
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: it saves a checkpoint and stops; wait for that.
            for line in process.stdout:
                log.write(line)
                if line.startswith("Stopped"):
                    print("    " + line.rstrip(), flush=True)
        returncode = process.wait()
    if returncode in STOPPED:
        print("Stopped: rerun the same command to resume.", file=sys.stderr)
    elif returncode:
        print(f"{entry} failed (exit status {returncode}): its output is in {log_path}",
              file=sys.stderr)
    if returncode:
        sys.exit(returncode)


def read_rows(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_value(rows: list[dict], key: str, loss_row: bool) -> float:
    """`key` of the last validation row: a loss row (validation loss, token accuracy) or a
    task-metrics row (which has no loss)."""
    values = [row[key] for row in rows if row["split"] == "validation"
              and ("loss" in row) == loss_row and key in row]
    return values[-1] if values else math.nan


@dataclasses.dataclass(frozen=True)
class Result:
    contender: Contender
    size: Size
    steps: int
    validation_loss: float
    bleu: float
    rouge_l: float
    choice_accuracy: float

    @property
    def pretraining_flops(self) -> float:
        return self.steps * self.size.step_flops


def figures(result: Result) -> dict:
    """The table's row as numbers (NaN where a family has no such figure)."""
    return {"model": result.contender.key, "family": result.contender.family,
            "objective": result.contender.objective, "parameters": result.size.parameters,
            "step_flops": result.size.step_flops, "steps": result.steps,
            "pretraining_flops": result.pretraining_flops,
            "validation_loss": result.validation_loss, "docstring_bleu": result.bleu,
            "docstring_rouge_l": result.rouge_l, "choice_accuracy": result.choice_accuracy}


def table(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"Pretraining budget {args.budget_tflops:g} model TFLOPs a run, batch "
        f"{args.batch_size}; fine-tuning {args.finetune_steps} steps a task; task metrics on "
        f"{args.metrics_examples or 'all'} held-out functions of the validation split "
        f"(choice: chance {100 / CHOICES:.0f}%).", "",
        "| model | objective | parameters | GFLOPs a step | steps | pretraining TFLOPs "
        "| validation loss | docstring BLEU | docstring ROUGE-L | docstring choice |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r.contender.family}", r.contender.objective, f"{r.size.parameters:,}",
                 f"{r.size.step_flops / 1e9:.1f}", f"{r.steps:,}",
                 f"{r.pretraining_flops / 1e12:.2f}", f"{r.validation_loss:.3f}",
                 "-" if math.isnan(r.bleu) else f"{r.bleu:.2f}",
                 "-" if math.isnan(r.rouge_l) else f"{r.rouge_l:.2f}",
                 f"{r.choice_accuracy:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Each validation loss is its own objective's (per target token: masked spans, "
              "every next token, the denoisers' targets, the masked tokens) and compares with "
              "none of the others. Docstring choice: the generative families rank the four "
              "docstrings by their score as targets; the encoder-only model sees all four in "
              "one input and picks one with its classification head."]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], args: argparse.Namespace, path: str) -> None:
    """Training loss (each objective's own: not comparable in level, only in shape) against
    model FLOPs spent, one line a contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for r in results:
        rows = read_rows(run_dir(args, r.contender, "pretrain"))
        points = [(row["step"] * r.size.step_flops / 1e12, row["loss"])
                  for row in rows if row["split"] == "train"]
        if points:
            axis.plot(*zip(*points), label=f"{r.contender.family}, {r.contender.objective}")
    axis.set_xlabel("pretraining model TFLOPs")
    axis.set_ylabel("training loss (per target token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def check_plan(args: argparse.Namespace) -> None:
    """Refuses to mix runs of other arguments into OUT: resuming needs the same ones."""
    path = os.path.join(args.out, "arguments.json")
    plan = {name: value for name, value in vars(args).items() if name != "out"}
    plan = json.loads(json.dumps(plan))
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != plan:
                print(f"error: {args.out} holds a comparison run with other arguments "
                      f"({path}): rerun with those, or pass another --out", file=sys.stderr)
                sys.exit(2)
        return
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=1)


def compare(contender: Contender, size: Size, steps: int, args: argparse.Namespace,
            stage: int, stages: int) -> Result:
    """Runs (or resumes, or skips as done) the contender's three runs; their figures."""
    pretrain_dir = run_dir(args, contender, "pretrain")
    name = f"{contender.family}, {contender.objective}"
    if not finished(pretrain_dir, steps):
        run_stage(f"[{stage}/{stages}] {name}: pretraining {steps:,} steps "
                  f"({steps * size.step_flops / 1e12:.2f} TFLOPs) in {pretrain_dir}", "train",
                  pretraining_command(contender, args, steps),
                  os.path.join(pretrain_dir + ".log"))
    tasks = ((DOCSTRINGS_TASK, CHOICE_TASK) if contender.generates
             else (CLASSIFICATION_TASK,))
    for offset, task in enumerate(tasks, 1):
        model_dir = run_dir(args, contender, task)
        if not finished(model_dir, args.finetune_steps):
            run_stage(f"[{stage + offset}/{stages}] {name}: fine-tuning on {task} "
                      f"({args.finetune_steps} steps) in {model_dir}", "train",
                      finetuning_command(contender, args, task), model_dir + ".log")
    docstrings = (read_rows(run_dir(args, contender, DOCSTRINGS_TASK)) if contender.generates
                  else [])
    choice = read_rows(run_dir(args, contender, tasks[-1]))
    return Result(contender, size, steps,
                  last_value(read_rows(pretrain_dir), "loss", loss_row=True),
                  last_value(docstrings, "bleu", loss_row=False),
                  last_value(docstrings, "rougeL", loss_row=False),
                  last_value(choice, "accuracy", loss_row=False))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_plan(args)
    from t5x_lite import startup

    # TensorFlow's and JAX's start-up logging, shown only if they fail to load.
    with startup.stderr_shown_only_on_failure():
        import jax
        import tensorflow  # noqa: F401

        jax.devices()
    sizes = [measure(contender, args) for contender in CONTENDERS]
    budget = args.budget_tflops * 1e12
    steps = [max(1, round(budget / size.step_flops)) for size in sizes]
    print("Matched parameters and pretraining FLOPs:")
    for contender, size, count in zip(CONTENDERS, sizes, steps):
        print(f"  {contender.family + ', ' + contender.objective:<34} {size.parameters:>11,} "
              f"parameters  {size.step_flops / 1e9:8.2f} GFLOPs a step x {count:>6,} steps = "
              f"{count * size.step_flops / 1e12:.2f} TFLOPs", flush=True)
    stages = sum(3 if contender.generates else 2 for contender in CONTENDERS)
    results, stage = [], 1
    for contender, size, count in zip(CONTENDERS, sizes, steps):
        results.append(compare(contender, size, count, args, stage, stages))
        stage += 3 if contender.generates else 2
    markdown = table(results, args)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump([figures(result) for result in results], f, indent=1)
    plot(results, args, os.path.join(args.out, "loss_vs_flops.png"))
    print("\n" + markdown)
    print(f"Wrote {os.path.join(args.out, 'comparison.md')} and "
          f"{os.path.join(args.out, 'loss_vs_flops.png')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Between runs: nothing to save.
        print("\nStopped by SIGINT: rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)
