"""The seqio task registry: every task registration in t5x_lite happens in this module.

A task is a source (`corpora.py`) + an objective (`objectives.py`) + a vocabulary (`vocab.py`).
Registered at import, named SOURCE_OBJECTIVE:
  - stdlib_span_corruption, stdlib_ul2, stdlib_prefix_lm, stdlib_causal_lm (targets only,
    for decoder-only models), stdlib_bart, stdlib_bert_mlm (for encoder-only models) on the
    embedded corpus
    (SentencePiece, 8000 pieces + 100 sentinels, trained on first use), and
    stdlib_span_corruption_bytes (byte vocabulary);
  - stdlib_docstrings, a supervised task on the same corpus (a function -> the first line of
    its docstring; BLEU and ROUGE), for fine-tuning;
  - stdlib_docstring_choice, multiple choice on the same functions (which of four docstring
    first lines is this function's), scored by rank classification (accuracy);
  - stdlib_docstring_choice_classification, the same questions for a classifier (an
    encoder-only model with num_classes = 4): the choices and the function in one input,
    the right choice's index the label (accuracy);
  - c4_span_corruption, c4_ul2, wikipedia_span_corruption, wikipedia_ul2 for TFDS data
    prepared under $TFDS_DATA_DIR.
UL2 names a mixture of one task per denoiser ("stdlib_ul2.nlu_span3_density0.15", ...).
Importing trains nothing and reads no files. Gin registers variants at run time with
`MIXTURE_OR_TASK_NAME = @tasks.register_task()` (see gin/objectives/).
"""
import difflib
import functools
from typing import Sequence

import seqio

from t5x_lite.data import corpora
from t5x_lite.data import metrics as metrics_lib
from t5x_lite.data import objectives
from t5x_lite.data import preprocessors
from t5x_lite.data import vocab

# Examples are shuffled after chunking, since one document yields consecutive (correlated)
# chunks. Filling the buffer delays the first batch (about 1 s for 1000 stdlib examples).
_SHUFFLE_BUFFER_SIZE = 1000
DEFAULT_SUPERVISED_METRICS = ("bleu", "rouge")


@functools.cache
def default_vocabulary() -> seqio.Vocabulary:
    """The stdlib SentencePiece vocabulary (one object, so the model file loads once)."""
    return vocab.sentencepiece_vocabulary()


def _output_features(vocabulary: seqio.Vocabulary, with_inputs: bool = True
                     ) -> dict[str, seqio.Feature]:
    features = {"targets": seqio.Feature(vocabulary, add_eos=True)}
    if with_inputs:
        features["inputs"] = seqio.Feature(vocabulary, add_eos=True, required=False)
    return features


def _add_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
              objective: objectives.Objective) -> None:
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            *objective.preprocessors(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=_output_features(
            vocabulary, with_inputs=not isinstance(objective, objectives.CausalLM)),
        metric_fns=[],
        shuffle_buffer_size=_SHUFFLE_BUFFER_SIZE,
    )


def _remove(name: str) -> None:
    """Unregisters `name`, and the denoiser tasks of a UL2 mixture of that name."""
    if name in seqio.MixtureRegistry.names():
        for task in seqio.MixtureRegistry.get(name).tasks:
            if task.name.startswith(f"{name}."):
                seqio.TaskRegistry.remove(task.name)
        seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)


def register_task(name: str | None = None, source: str | seqio.DataSource = "stdlib",
                  objective: str | objectives.Objective = "span_corruption",
                  vocabulary: seqio.Vocabulary | None = None) -> str:
    """Registers (or replaces) a task, or for UL2 a mixture, and returns its name.

    Args:
      name: default SOURCE_OBJECTIVE, such as "c4_ul2" (needs a named source).
      source: "stdlib", "c4", "wikipedia" (see `corpora.named_source`) or a seqio.DataSource
        yielding {"text": tf.string}.
      objective: a name in `objectives.OBJECTIVES` (default settings) or a settings object.
      vocabulary: default the stdlib SentencePiece vocabulary.
    """
    objective = objectives.get_objective(objective)
    if name is None:
        if not isinstance(source, str):
            raise ValueError("register_task needs a name when the source is not a named one")
        name = f"{source}_{objective.name}"
    if isinstance(source, str):
        source = corpora.named_source(source)
    if vocabulary is None:
        vocabulary = default_vocabulary()
    _remove(name)
    if not isinstance(objective, objectives.UL2):
        _add_task(name, source, vocabulary, objective)
        return name
    rates = []
    for index, (label, rate, denoiser) in enumerate(objective.components()):
        _add_task(f"{name}.{label}", corpora.ReseededSource(source, index), vocabulary, denoiser)
        rates.append((f"{name}.{label}", rate))
    seqio.MixtureRegistry.add(name, rates)
    return name


def register_text_task(name: str, files, objective: str | objectives.Objective = "span_corruption",
                       vocabulary: seqio.Vocabulary | None = None, validation_files=None,
                       text_field: str = "text", input_field: str = "inputs",
                       target_field: str = "targets",
                       metrics: Sequence[str] = DEFAULT_SUPERVISED_METRICS,
                       label_field: str = "label", num_classes: int | None = None) -> str:
    """Registers (or replaces) a task over local files. Splits: "train", plus "validation"
    given `validation_files`. Returns `name`.

    A pretraining objective reads `.txt` / `.jsonl` documents (see
    `corpora.text_files_source`). objective="supervised" reads (input, target) examples from
    `.jsonl` (`input_field`, `target_field`) or `.tsv` files and evaluates predictions with
    `metrics` (names in data.metrics.METRICS). objective="multiple_choice" reads
    {"inputs", "choices", "label"} questions from `.jsonl` files, evaluated by rank
    classification (register_multiple_choice_task). objective="classification" reads
    (input, label) examples from `.jsonl` (`input_field`, `label_field`: an int in
    [0, num_classes)) or `.tsv` (input TAB label) files, for an encoder-only classifier
    (register_classification_task).
    """
    if objective == "supervised":
        source = corpora.supervised_files_source(files, validation_files, input_field,
                                                 target_field)
        return register_supervised_task(name, source, vocabulary, metrics)
    if objective == "multiple_choice":
        source = corpora.multiple_choice_files_source(files, validation_files)
        return register_multiple_choice_task(name, source, vocabulary)
    if objective == "classification":
        if num_classes is None:
            raise ValueError("register_text_task(objective='classification') needs num_classes"
                             ", the number of labels (0 to num_classes - 1)")
        source = corpora.classification_files_source(
            files, validation_files, num_classes=num_classes, input_field=input_field,
            label_field=label_field)
        return register_classification_task(name, source, num_classes, vocabulary)
    source = corpora.text_files_source(files, validation_files, text_field)
    return register_task(name, source, objective, vocabulary)


def register_supervised_task(name: str, source: seqio.DataSource,
                             vocabulary: seqio.Vocabulary | None = None,
                             metrics: Sequence[str] = DEFAULT_SUPERVISED_METRICS) -> str:
    """Registers (or replaces) an input -> target task over a source of {"inputs",
    "targets"} strings, evaluated by decoding and scoring `metrics` against the targets."""
    return _add_evaluated_task(name, source, vocabulary, [],
                               metrics_lib.get_metrics(metrics))


def register_multiple_choice_task(name: str, source: seqio.DataSource,
                                  vocabulary: seqio.Vocabulary | None = None) -> str:
    """Registers (or replaces) a multiple-choice task over a source of {"inputs": string,
    "choices": strings [N], "label": int} questions, evaluated by rank classification: every
    choice is scored as a target given the inputs, and accuracy counts the questions whose
    best-scoring choice is the label."""
    return _add_evaluated_task(name, source, vocabulary,
                               [preprocessors.rank_classification],
                               [metrics_lib.rank_classification_accuracy],
                               preprocessors.rank_classification_target)


def register_classification_task(name: str, source: seqio.DataSource, num_classes: int,
                                 vocabulary: seqio.Vocabulary | None = None) -> str:
    """Registers (or replaces) a classification task over a source of {"inputs": string,
    "label": int in [0, num_classes)} examples, for an encoder-only model with
    T5Config.num_classes = num_classes: the inputs are tokenized with EOS, the label is the
    one-id target of vocab.ClassLabels(num_classes); evaluated by accuracy of the predicted
    class."""
    return _add_evaluated_task(name, source, vocabulary, [preprocessors.label_as_target],
                               [metrics_lib.accuracy], preprocessors.class_label,
                               seqio.Feature(vocab.ClassLabels(num_classes), add_eos=False))


def _add_evaluated_task(name: str, source: seqio.DataSource,
                        vocabulary: seqio.Vocabulary | None, first_steps: list,
                        metric_fns: list, postprocess_fn=None,
                        targets: seqio.Feature | None = None) -> str:
    """A task of {"inputs", "targets"} strings (after `first_steps`), tokenized with EOS and
    evaluated by `metric_fns`; `targets` replaces the targets' feature (a classifier's
    labels)."""
    vocabulary = vocabulary or default_vocabulary()
    _remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            *first_steps,
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                         "targets": targets or seqio.Feature(vocabulary, add_eos=True)},
        postprocess_fn=postprocess_fn,
        metric_fns=metric_fns,
        shuffle_buffer_size=_SHUFFLE_BUFFER_SIZE,
    )
    return name


def register_mixture(name: str, tasks_and_rates) -> str:
    """Registers (or replaces) a seqio mixture of registered tasks or mixtures, given as
    [(name, rate), ...]; each example comes from a member with probability rate / sum(rates)."""
    for member, rate in tasks_and_rates:
        get_task_or_mixture(member)
        if rate <= 0:
            raise ValueError(f"mixture {name!r}: rate of {member!r} must be > 0, got {rate}")
    _remove(name)
    seqio.MixtureRegistry.add(name, list(tasks_and_rates))
    return name


def has_inputs(name: str) -> bool:
    """Whether the task or mixture `name` declares an inputs feature (a causal-LM task has
    targets only), read from its registration: no data is touched."""
    return any("inputs" in task.output_features
               for task in seqio.get_subtasks(get_task_or_mixture(name)))


def targets_vocabulary(name: str) -> seqio.Vocabulary:
    """The vocabulary that the task or mixture `name` tokenizes its targets with."""
    return get_task_or_mixture(name).output_features["targets"].vocabulary


def text_vocabulary(name: str) -> seqio.Vocabulary:
    """The vocabulary of the task's text: its targets', or a classification task's inputs'."""
    if num_classes(name):
        return get_task_or_mixture(name).output_features["inputs"].vocabulary
    return targets_vocabulary(name)


def num_classes(name: str) -> int:
    """The classes of a classification task or mixture (its targets are vocab.ClassLabels);
    0 for any other, read from its registration."""
    vocabulary = targets_vocabulary(name)
    return vocabulary.num_classes if isinstance(vocabulary, vocab.ClassLabels) else 0


def is_masked_lm(name: str) -> bool:
    """Whether the task or mixture `name` is a masked LM (objectives.BertMlm), for an
    encoder-only model, read from its registration."""
    return any(getattr(step, "func", step) is preprocessors.bert_mlm
               for task in seqio.get_subtasks(get_task_or_mixture(name))
               for step in task.preprocessors)


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; ValueError naming the closest ones if none."""
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    registered = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    closest = difflib.get_close_matches(name, registered, n=3, cutoff=0.8)
    suggestion = f"did you mean {' or '.join(closest)}?" if closest else \
        f"registered names include {', '.join(n for n in registered if '.' not in n)}"
    raise ValueError(f"unknown task or mixture {name!r}: {suggestion} (register yours in a "
                     "module of your own and pass --module_import=my_tasks, or put `import "
                     "my_tasks` in a gin file; README: Your own corpus)")


for _objective in ("span_corruption", "ul2", "prefix_lm", "causal_lm", "bart", "bert_mlm"):
    register_task(source="stdlib", objective=_objective)
register_task("stdlib_span_corruption_bytes", "stdlib", "span_corruption",
              vocab.byte_vocabulary())
register_supervised_task("stdlib_docstrings", corpora.stdlib_docstrings_source())
register_multiple_choice_task("stdlib_docstring_choice", corpora.stdlib_multiple_choice_source())
register_classification_task("stdlib_docstring_choice_classification",
                             corpora.stdlib_choice_classification_source(), num_classes=4)
for _source in corpora.TFDS_SOURCES:
    for _objective in ("span_corruption", "ul2"):
        register_task(source=_source, objective=_objective)
