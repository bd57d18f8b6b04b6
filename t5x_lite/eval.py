"""Evaluation entry point: restores the newest checkpoint in MODEL_DIR, reports validation
loss and token accuracy, the task's metrics when it has any (a supervised task: BLEU, ROUGE,
... of decoded predictions, through seqio's evaluator), and prints a few examples (input,
the model's output, the truth).

  python -m t5x_lite.eval --gin_file=gin/quickstart.gin
"""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "nothing more was evaluated; rerun the same command to evaluate")

import dataclasses  # noqa: E402
import os  # noqa: E402

import gin  # noqa: E402
import jax  # noqa: E402

from t5x_lite import evaluation  # noqa: E402
from t5x_lite import launch  # noqa: E402
from t5x_lite import metrics_io  # noqa: E402
from t5x_lite import models  # noqa: E402
from t5x_lite import partitioning  # noqa: E402
from t5x_lite import run_config  # noqa: E402
from t5x_lite import trainer as trainer_lib  # noqa: E402
from t5x_lite import warm_start  # noqa: E402
from t5x_lite.data import tasks  # noqa: E402
from t5x_lite.data import vocab  # noqa: E402

say = run_config.say


# t5x_lite.eval's metrics.jsonl and TensorBoard files, under MODEL_DIR.
EVAL_DIR = "eval"


def infillings(model: models.Model, params, data: run_config.DataConfig, mesh,
               rules, count: int) -> list[tuple[str, str, str]]:
    """(masked input, model fill, true fill) for the first `count` validation examples; none
    for a task without inputs (a causal LM) or a model that generates nothing (encoder-only)."""
    vocabulary = tasks.targets_vocabulary(data.mixture_or_task_name)
    if not tasks.has_inputs(data.mixture_or_task_name) or model.config.encoder_only:
        return []
    # Read with inputs and targets apart, whatever the family; shuffled with a fixed seed:
    # the first examples in file order all come from one file.
    local = next(dataclasses.replace(data, decoder_only=False).batches(
        "validation", mesh, shuffle=True, seed=0, repeat=False, pack=False))
    batch = partitioning.global_batch(local, mesh)
    decode_length = data.task_feature_lengths["targets"]
    predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=decode_length,
                                                       eos_id=vocabulary.eos_id))
    tokens, _ = trainer_lib.in_mesh(predict, mesh, rules)(params, {
        model.inputs_key: batch["encoder_input_tokens"]})
    # Every host holds some rows; process 0 (which prints) holds the first ones.
    tokens = evaluation.gathered(tokens)
    rows = range(min(count, len(local["encoder_input_tokens"])))
    return [(vocab.show_ids(vocabulary, local["encoder_input_tokens"][i]),
             vocab.show_ids(vocabulary, tokens[i]),
             vocab.show_ids(vocabulary, local["decoder_target_tokens"][i])) for i in rows]


def run(model_config: models.T5Config = gin.REQUIRED,
        data: run_config.DataConfig = gin.REQUIRED, model_dir: str = gin.REQUIRED,
        eval_steps: int | None = None, num_infillings: int = 3,
        mesh_config: partitioning.MeshConfig = partitioning.MeshConfig(),
        metrics_examples: int | None = None,
        decode: evaluation.DecodeSettings = evaluation.DecodeSettings()) -> dict[str, float]:
    """Validation loss and token accuracy; for a task with metric functions also its metrics
    on `metrics_examples` decoded validation examples (None: all of them)."""
    restored = warm_start.restore_run(model_config, data, model_dir, mesh_config)
    model, mesh, step, params, data = (restored.model, restored.mesh, restored.step,
                                       restored.params, restored.data)
    rules = mesh_config.rules
    eval_step = trainer_lib.compile_eval_step(
        model, mesh, trainer_lib.param_shardings(model, mesh, rules), rules)
    scores = run_config.validation_scores(eval_step, params, data, mesh, eval_steps)
    # A classifier's targets are its rows' labels; a masked LM's, the masked tokens.
    counted = "rows" if model_config.num_classes else "target tokens"
    say(f"Checkpoint step {step}: validation loss {scores['loss']:.4f}  "
        f"{'accuracy' if model_config.num_classes else 'token accuracy'} "
        f"{scores['accuracy']:.4f}  ({scores['target_tokens']:,.0f} {counted})")
    for line in metrics_io.format_moe_lines(scores):
        say(line)
    supervised = evaluation.has_metrics(data.mixture_or_task_name)
    if supervised:
        values = evaluation.validation_metrics(
            model, mesh, rules, data.mixture_or_task_name, data.task_feature_lengths,
            data.batch_size, metrics_examples, decode)(params, step)
        say(f"Checkpoint step {step}: {metrics_io.format_task_metrics(values)}")
        scores.update(values)
    # Apart from the training run's rows, which already hold its own evaluations.
    metrics_io.MetricsWriter(os.path.join(model_dir, EVAL_DIR)).write(step, scores,
                                                                     "validation")
    headings = (("example", "input", "model output", "target") if supervised else
                ("infilling", "input (spans masked)", "model fill", "true fill"))
    examples = infillings(model, params, data, mesh, rules, num_infillings)
    if num_infillings and not examples:
        why = ("the model is encoder-only, it generates nothing" if model_config.encoder_only
               else f"task {data.mixture_or_task_name!r} has no inputs (a causal LM)")
        say(f"No examples to show: {why}; the validation loss above is the measure.")
    for index, (masked, predicted, truth) in enumerate(examples):
        # Outputs are short: one line each, newlines escaped, to compare by eye.
        say(f"\n--- {headings[0]} {index + 1} ---\n{headings[1]}:\n{masked}\n"
            f"{headings[2]}: {predicted!r}\n{headings[3]}: {truth!r}")
    return scores


if __name__ == "__main__":
    launch.main("t5x_lite.eval.run", description=__doc__)
