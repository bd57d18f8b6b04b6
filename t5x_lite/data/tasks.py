"""The seqio task registry: every task registration in t5x_lite happens in this module.

Registered at import: "stdlib_span_corruption" (SentencePiece, 8000 pieces + 100 sentinels,
trained on first use) and "stdlib_span_corruption_bytes" (byte vocabulary). Importing trains
nothing and reads no files.
"""
import functools

import seqio

from t5x_lite.data import corpora
from t5x_lite.data import preprocessors
from t5x_lite.data import vocab

OBJECTIVES = ("span_corruption",)
# Examples are shuffled after chunking, since one document yields consecutive (correlated)
# chunks. Filling the buffer delays the first batch (about 1 s for 1000 stdlib examples).
_SHUFFLE_BUFFER_SIZE = 1000


def _span_corruption_preprocessors(noise_density: float, mean_noise_span_length: float) -> list:
    noise = dict(noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        functools.partial(preprocessors.split_tokens_to_inputs_length, **noise),
        functools.partial(preprocessors.span_corruption, **noise),
        seqio.preprocessors.append_eos_after_trim,
    ]


def _span_corruption_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }


def _register(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
              objective: str, noise_density: float, mean_noise_span_length: float) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: allowed values are "
                         f"{', '.join(OBJECTIVES)}")
    preprocessors.check_noise_args(noise_density, mean_noise_span_length)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=_span_corruption_preprocessors(noise_density, mean_noise_span_length),
        output_features=_span_corruption_features(vocabulary),
        metric_fns=[],
        shuffle_buffer_size=_SHUFFLE_BUFFER_SIZE,
    )
    return name


def register_text_task(name: str, files, objective: str = "span_corruption",
                       vocabulary: seqio.Vocabulary | None = None, validation_files=None,
                       text_field: str = "text", noise_density: float = 0.15,
                       mean_noise_span_length: float = 3.0) -> str:
    """Registers (or replaces) a task over local `.txt` / `.jsonl` files; see
    `corpora.text_files_source`. Splits: "train", plus "validation" given `validation_files`.
    `vocabulary` defaults to the stdlib SentencePiece vocabulary. Returns `name`."""
    source = corpora.text_files_source(files, validation_files, text_field)
    if vocabulary is None:
        vocabulary = vocab.sentencepiece_vocabulary()
    return _register(name, source, vocabulary, objective, noise_density, mean_noise_span_length)


def register_stdlib_task(name: str, vocabulary: seqio.Vocabulary, noise_density: float = 0.15,
                         mean_noise_span_length: float = 3.0) -> str:
    """Registers (or replaces) span corruption over the embedded stdlib corpus."""
    return _register(name, corpora.stdlib_source(), vocabulary, "span_corruption",
                     noise_density, mean_noise_span_length)


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; ValueError naming the registered ones if none."""
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    registered = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(f"unknown task or mixture {name!r}: registered names include "
                     f"{', '.join(registered)}; register it in t5x_lite/data/tasks.py or import "
                     f"your module from a gin file")


register_stdlib_task("stdlib_span_corruption", vocab.sentencepiece_vocabulary())
register_stdlib_task("stdlib_span_corruption_bytes", vocab.byte_vocabulary())
