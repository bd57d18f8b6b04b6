"""Shows what a task trains the model on: decoded inputs and targets of its first examples,
with sentinels as <extra_id_N> and UL2 mode tokens as themselves.

  python -m t5x_lite.inspect_task stdlib_ul2 --n 3 [--split validation] [--inputs 512 --targets 114]
  python -m t5x_lite.inspect_task --gin_file=gin/objectives/ul2.gin --n 3   # a gin-registered task

Lengths default to TASK_FEATURE_LENGTHS of the gin files given, else 512 / 114.
"""
from t5x_lite import startup

# Before anything imports TensorFlow or JAX: quiet start-up, and Ctrl-C ends the program
# with one line at any moment (startup.py).
startup.begin(__name__, "rerun the same command to inspect the task")

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from t5x_lite import launch  # noqa: E402
from t5x_lite.data import pipeline  # noqa: E402
from t5x_lite.data import tasks  # noqa: E402
from t5x_lite.data import vocab  # noqa: E402

DEFAULT_LENGTHS = {"inputs": 512, "targets": 114}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", help="task or mixture name (default: the gin "
                        "files' MIXTURE_OR_TASK_NAME)")
    parser.add_argument("--n", type=int, default=3, help="examples to show")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0, help="shuffle and noise seed")
    parser.add_argument("--inputs", type=int, help="inputs length in tokens, EOS included")
    parser.add_argument("--targets", type=int, help="targets length in tokens, EOS included")
    return parser


def examples(task_name: str, split: str, lengths: dict[str, int], count: int,
             seed: int) -> list[dict[str, np.ndarray]]:
    """The first `count` examples of a shuffled pass, as the model sees them before packing
    (an encoder-only model's tasks at its rows' 'inputs' length)."""
    if tasks.is_masked_lm(task_name) or tasks.num_classes(task_name):
        lengths = pipeline.encoder_only_lengths(lengths)
    pipeline.check_lengths(lengths)
    provider = tasks.get_task_or_mixture(task_name)
    dataset = provider.get_dataset(sequence_length=lengths, split=split, shuffle=True,
                                   seed=seed, num_epochs=1)
    return list(dataset.take(count).as_numpy_iterator())


def describe(task_name: str, split: str, lengths: dict[str, int], count: int, seed: int) -> str:
    vocabulary, classes = tasks.text_vocabulary(task_name), tasks.num_classes(task_name)
    blocks = [f"{task_name} ({split}), lengths {lengths}, vocabulary "
              f"{type(vocabulary).__name__} of {vocabulary.vocab_size} ids"]
    for index, example in enumerate(examples(task_name, split, lengths, count, seed)):
        targets = (f"label {int(example['targets'][0])} of {classes}" if classes else
                   repr(vocab.show_ids(vocabulary, example["targets"])))
        blocks.append(f"--- example {index + 1}: {len(example['inputs'])} input tokens, "
                      f"{len(example['targets'])} target tokens ---\n"
                      f"inputs:  {vocab.show_ids(vocabulary, example['inputs'])!r}\n"
                      f"targets: {targets}")
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> None:
    launch.quiet_library_logs()
    with launch.bad_input_exits(argv) as argv:
        args = launch.parse_flags(argv, __doc__, _parser(), require_gin_file=False)
        launch.import_modules(args.module_import)
        if args.gin_file:
            launch.parse_gin(args.gin_file, args.gin_bindings)
        task_name = args.task or launch.macro_value("MIXTURE_OR_TASK_NAME")
        if task_name is None:
            raise launch.UsageError("no task given: pass a task name (such as stdlib_ul2) or "
                                    "--gin_file=... defining MIXTURE_OR_TASK_NAME")
        lengths = dict(launch.macro_value("TASK_FEATURE_LENGTHS") or DEFAULT_LENGTHS)
        lengths.update({key: value for key, value in
                        (("inputs", args.inputs), ("targets", args.targets)) if value})
        if args.n < 1:
            raise launch.UsageError(f"--n must be >= 1, got {args.n}")
        print(describe(task_name, args.split, lengths, args.n, args.seed), flush=True)


if __name__ == "__main__":
    main()
