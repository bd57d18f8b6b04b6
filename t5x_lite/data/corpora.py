"""Raw-text sources for seqio tasks: the embedded Python standard library corpus, local
plain-text / JSONL files, and TFDS datasets (C4, Wikipedia) for those who have them prepared.
Each source yields `{"text": tf.string}` documents (TFDS ones more fields); tokenization,
chunking and noising live in `preprocessors.py`, per-host sharding in `pipeline.py`.

The embedded corpus is the running interpreter's standard library: `.py` files outside
`site-packages` and test directories. On CPython 3.11.7 that is 734 files, 12.1 MB (12,118,641
bytes); 16 of them (2.2% of files, 0.12 MB) form the validation split.
"""
import ast
import functools
import hashlib
import json
import os
import sysconfig
import textwrap
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

STDLIB_SPLITS = ("train", "validation")
# Directory names whose contents are test suites or fixtures rather than library code.
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_EXCLUDED_DIRS = _TEST_DIRS | {"site-packages", "dist-packages", "__pycache__"}
VALIDATION_FRACTION = 0.02
# TFDS datasets known by name: (TFDS name:version, our split -> TFDS split). Wikipedia has only
# a train split; its first 1% is held out for validation.
TFDS_SOURCES = {
    "c4": ("c4/en:3.1.0", {"train": "train", "validation": "validation"}),
    "wikipedia": ("wikipedia/20230601.en:1.0.0",
                  {"train": "train[1%:]", "validation": "train[:1%]"}),
}
SOURCE_NAMES = ("stdlib", *TFDS_SOURCES)


def _is_validation(relative_path: str) -> bool:
    """A stable split: sha256 of the '/'-joined relative path, independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_FRACTION


@functools.cache
def _stdlib_files_by_split() -> dict[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    by_split = {split: [] for split in STDLIB_SPLITS}
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _EXCLUDED_DIRS]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = os.path.join(directory, filename)
            relative_path = os.path.relpath(path, root).replace(os.sep, "/")
            split = "validation" if _is_validation(relative_path) else "train"
            by_split[split].append(path)
    return {split: sorted(paths) for split, paths in by_split.items()}


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}: allowed values are {', '.join(allowed)}")


def stdlib_files(split: str) -> list[str]:
    """Sorted absolute paths of the standard-library source files in `split`."""
    _check_split(split, STDLIB_SPLITS)
    return list(_stdlib_files_by_split()[split])


def _read_files(paths: Sequence[str], shuffle_files: bool, seed: int | None) -> tf.data.Dataset:
    """One `{"text": file contents}` element per path, in order or shuffled by `seed`."""
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    if shuffle_files:
        dataset = dataset.shuffle(len(paths), seed=seed)
    return dataset.map(lambda path: {"text": tf.io.read_file(path)},
                       num_parallel_calls=tf.data.AUTOTUNE)


def stdlib_source() -> seqio.DataSource:
    """The standard-library corpus, one document per file; files are listed on first use."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return _read_files(stdlib_files(split), shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=STDLIB_SPLITS)


def _read_jsonl_documents(path: str, text_field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_number}: JSON line has no field {text_field!r}")
            if not isinstance(record[text_field], str):
                raise ValueError(f"{path}:{line_number}: field {text_field!r} is "
                                 f"{type(record[text_field]).__name__}, expected a string")
            documents.append(record[text_field])
    return documents


def _file_documents(path: str, jsonl_documents: dict[str, list[str]],
                    rng: np.random.Generator | None) -> tf.data.Dataset:
    """Documents of one file as a dataset of `{"text": tf.string}`: a parsed JSONL file's
    documents, shuffled by `rng` when given, or a plain-text file's lines, streamed in order."""
    if path in jsonl_documents:
        documents = jsonl_documents[path]
        if rng is not None:
            documents = [documents[i] for i in rng.permutation(len(documents))]
        lines = tf.data.Dataset.from_tensor_slices(tf.constant(documents, dtype=tf.string))
    else:
        lines = tf.data.TextLineDataset(path).filter(
            lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
    return lines.map(lambda text: {"text": text})


def _has_text(path: str, chunk_bytes: int = 1 << 20) -> bool:
    """Whether a text file holds anything but whitespace (read until the first such chunk)."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            if chunk.strip():
                return True
    return False


def _check_files(files: str | Sequence[str]) -> list[str]:
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise ValueError("text_files_source needs at least one file, got none")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text file {path} does not exist")
    return paths


def text_files_source(files: str | Sequence[str],
                      validation_files: str | Sequence[str] | None = None,
                      text_field: str = "text") -> seqio.DataSource:
    """Local `.txt` files (one document per non-empty line) or `.jsonl` files (one document
    per line, the string in `text_field`). Any other extension is read as plain text.
    Shuffling orders the files and, within JSONL files (held in memory), the documents.

    Files are checked, and JSONL files parsed, now: a bad input fails at registration.
    """
    files_by_split = {"train": _check_files(files)}
    if validation_files is not None:
        files_by_split["validation"] = _check_files(validation_files)
    jsonl_documents = {path: _read_jsonl_documents(path, text_field)
                       for paths in files_by_split.values() for path in paths
                       if path.endswith(".jsonl")}
    for split, paths in files_by_split.items():
        if not any(jsonl_documents[path] if path in jsonl_documents else _has_text(path)
                   for path in paths):
            raise ValueError(f"the {split} files hold no text ({', '.join(paths)}): add "
                             "documents, one per line (.txt) or one JSON object per line (.jsonl)")
    splits = tuple(files_by_split)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, splits)
        paths = files_by_split[split]
        rng = np.random.default_rng(seed) if shuffle_files else None
        if rng is not None:
            paths = [paths[i] for i in rng.permutation(len(paths))]
        return functools.reduce(tf.data.Dataset.concatenate,
                                [_file_documents(path, jsonl_documents, rng) for path in paths])

    return seqio.FunctionDataSource(dataset_fn, splits=splits)


# Docstring summaries: first lines of at least this many words, inputs cut to this many
# characters (longer than any input length the tokens would allow).
MIN_SUMMARY_WORDS = 3
MAX_FUNCTION_CHARS = 4000


def function_summaries(source: str) -> list[tuple[str, str]]:
    """(function without its docstring, first line of the docstring) for every function of
    a Python source text that has a docstring; the function is dedented to its `def`."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        summary = docstring.strip().splitlines()[0].strip() if docstring else ""
        if len(summary.split()) < MIN_SUMMARY_WORDS or len(node.body) < 2:
            continue
        docstring_node = node.body[0]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        kept = (lines[first - 1:docstring_node.lineno - 1]
                + lines[docstring_node.end_lineno:node.end_lineno])
        pairs.append((textwrap.dedent("\n".join(kept))[:MAX_FUNCTION_CHARS], summary))
    return pairs


@functools.cache
def _stdlib_summaries(split: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for path in stdlib_files(split):
        with open(path, encoding="utf-8", errors="replace") as f:
            pairs.extend(function_summaries(f.read()))
    return tuple(pairs)


def stdlib_docstrings_source() -> seqio.DataSource:
    """A supervised task from the embedded corpus: a standard-library function, its docstring
    removed -> the docstring's first line. Split by file, as pretraining's corpus, so no
    validation function was seen in pretraining; parsed on first use (a few seconds)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, STDLIB_SPLITS)
        pairs = list(_stdlib_summaries(split))
        if shuffle_files:
            pairs = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
        return _pairs_dataset(pairs)

    return seqio.FunctionDataSource(dataset_fn, splits=STDLIB_SPLITS)


def multiple_choice(pairs: Sequence[tuple[str, str]], num_choices: int, seed: int
                    ) -> list[tuple[str, list[str], int]]:
    """(input, choices, label) per pair: its target among num_choices - 1 distinct other
    targets drawn from the other pairs, at a random position `label`."""
    targets = sorted({target for _, target in pairs})
    if len(targets) < num_choices:
        raise ValueError(f"{len(targets)} distinct targets cannot make {num_choices} choices")
    rng = np.random.default_rng(seed)
    questions = []
    for text, target in pairs:
        distractors = []
        while len(distractors) < num_choices - 1:
            candidate = targets[rng.integers(len(targets))]
            if candidate != target and candidate not in distractors:
                distractors.append(candidate)
        label = int(rng.integers(num_choices))
        questions.append((text, distractors[:label] + [target] + distractors[label:], label))
    return questions


def stdlib_multiple_choice_source(num_choices: int = 4) -> seqio.DataSource:
    """A multiple-choice task from the embedded corpus: a standard-library function, its
    docstring removed, and num_choices docstring first lines, one its own (the others drawn
    from other functions of the split); {"inputs", "choices", "label"}. The same questions on
    every read; the train split's hold their right choice only."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, STDLIB_SPLITS)
        questions = multiple_choice(_stdlib_summaries(split), num_choices,
                                    STDLIB_SPLITS.index(split))
        return _questions_dataset(questions, split, shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=STDLIB_SPLITS)


def _questions_dataset(questions: Sequence[tuple[str, Sequence[str], int]], split: str,
                       shuffle: bool, seed: int | None) -> tf.data.Dataset:
    """The questions as {"inputs", "choices", "label"}; the train split's keep only their
    right choice, so that training (rank classification's train mode) sees no distractor."""
    if split == "train":
        questions = [(text, [choices[label]], 0) for text, choices, label in questions]
    if shuffle:
        questions = [questions[i] for i in np.random.default_rng(seed).permutation(
            len(questions))]
    texts, choices, labels = zip(*questions)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.constant(texts, tf.string), "choices": tf.constant(choices, tf.string),
        "label": tf.constant(labels, tf.int32)})


def _numbered_lines(path: str) -> Iterator[tuple[str, str]]:
    """("path:line", line) for each non-blank line of a local examples file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{number}", line


def _json_fields(where: str, line: str, keys: Sequence[str]) -> list:
    """The values of `keys` in a JSON object line (None where missing)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    return [record.get(key) if isinstance(record, dict) else None for key in keys]


def _read_questions(path: str) -> list[tuple[str, list[str], int]]:
    """(input, choices, label) per line of a .jsonl file of {"inputs": str, "choices":
    [str, ...], "label": int} records."""
    questions = []
    for where, line in _numbered_lines(path):
        text, choices, label = _json_fields(where, line, ("inputs", "choices", "label"))
        if not (isinstance(text, str) and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) for c in choices) and isinstance(label, int)):
            raise ValueError(f"{where}: needs 'inputs' (a string), 'choices' (two or more "
                             "strings) and 'label' (the index of the right choice)")
        if not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label} is outside its {len(choices)} "
                             f"choices: use 0 to {len(choices) - 1}")
        questions.append((text, choices, label))
    return questions


def multiple_choice_files_source(files: str | Sequence[str],
                                 validation_files: str | Sequence[str] | None = None
                                 ) -> seqio.DataSource:
    """Local multiple-choice questions from `.jsonl` files, one {"inputs", "choices",
    "label"} record per line, every question with the same number of choices (the train
    split's keep their right choice only). Files are parsed now, so a bad one fails at
    registration."""
    files_by_split = {"train": _check_files(files)}
    if validation_files is not None:
        files_by_split["validation"] = _check_files(validation_files)
    by_split = {split: [q for path in paths for q in _read_questions(path)]
                for split, paths in files_by_split.items()}
    counts = {len(choices) for questions in by_split.values() for _, choices, _ in questions}
    if len(counts) != 1:
        raise ValueError(f"the questions have {' or '.join(map(str, sorted(counts))) or 'no'} "
                         "choices: give every question the same number of choices")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, tuple(by_split))
        return _questions_dataset(by_split[split], split, shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(by_split))


def choice_classification_text(question: str, choices: Sequence[str]) -> str:
    """A multiple-choice question as one classifier input: the choices first, each after its
    marker ("choice 0: ..."), then the question, so a long question is what the inputs
    length cuts, never a choice."""
    lines = [f"choice {index}: {choice}" for index, choice in enumerate(choices)]
    return "\n".join(lines + [f"question:\n{question}"])


def stdlib_choice_classification_source(num_choices: int = 4) -> seqio.DataSource:
    """stdlib_multiple_choice_source's questions for a classifier: {"inputs": the choices
    and the function in one text (choice_classification_text), "label": the index of its
    own docstring line}, every split with all its choices."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, STDLIB_SPLITS)
        examples = [(choice_classification_text(text, choices), label)
                    for text, choices, label in multiple_choice(
                        _stdlib_summaries(split), num_choices, STDLIB_SPLITS.index(split))]
        return _labelled_dataset(examples, shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=STDLIB_SPLITS)


def _labelled_dataset(examples: Sequence[tuple[str, int]], shuffle: bool, seed: int | None
                      ) -> tf.data.Dataset:
    if shuffle:
        examples = [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]
    texts, labels = zip(*examples)
    return tf.data.Dataset.from_tensor_slices({"inputs": tf.constant(texts, tf.string),
                                               "label": tf.constant(labels, tf.int32)})


def _read_labelled(path: str, num_classes: int, input_field: str, label_field: str
                   ) -> list[tuple[str, int]]:
    """(input, label) per line of a .jsonl file ({input_field: str, label_field: int}) or a
    .tsv file (input TAB label); a label outside [0, num_classes) is an error naming it."""
    examples = []
    for where, line in _numbered_lines(path):
        if path.endswith(".jsonl"):
            text, label = _json_fields(where, line, (input_field, label_field))
            if not isinstance(text, str) or not isinstance(label, int) or isinstance(
                    label, bool):
                raise ValueError(f"{where}: needs {input_field!r} (a string) and "
                                 f"{label_field!r} (an int class)")
        else:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[1].strip().lstrip("-").isdigit():
                raise ValueError(f"{where}: expected input<TAB>label (an int class)")
            text, label = fields[0], int(fields[1])
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: {label_field} {label} is outside the "
                             f"{num_classes} classes: use 0 to {num_classes - 1}, or "
                             f"register the task with num_classes > {label}")
        examples.append((text, label))
    return examples


def classification_files_source(files: str | Sequence[str],
                                validation_files: str | Sequence[str] | None = None, *,
                                num_classes: int, input_field: str = "inputs",
                                label_field: str = "label") -> seqio.DataSource:
    """Local classification examples as {"inputs": tf.string, "label": tf.int32}, from
    `.jsonl` files (fields `input_field`, `label_field`) or `.tsv` files (input TAB label),
    labels in [0, num_classes). Files are parsed now, so a bad one fails at registration."""
    files_by_split = {"train": _check_files(files)}
    if validation_files is not None:
        files_by_split["validation"] = _check_files(validation_files)
    by_split = {split: [example for path in paths for example in _read_labelled(
        path, num_classes, input_field, label_field)] for split, paths in files_by_split.items()}
    for split, examples in by_split.items():
        if not examples:
            raise ValueError(f"the {split} files hold no examples "
                             f"({', '.join(files_by_split[split])}): add one (input, label) "
                             "per line, as JSON (.jsonl) or input TAB label (.tsv)")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, tuple(by_split))
        return _labelled_dataset(by_split[split], shuffle_files, seed)

    return seqio.FunctionDataSource(dataset_fn, splits=tuple(by_split))


def _pairs_dataset(pairs: Sequence[tuple[str, str]]) -> tf.data.Dataset:
    inputs, targets = zip(*pairs)
    return tf.data.Dataset.from_tensor_slices(
        {"inputs": tf.constant(inputs, tf.string), "targets": tf.constant(targets, tf.string)})


def _read_supervised_pairs(path: str, input_field: str, target_field: str
                           ) -> list[tuple[str, str]]:
    """(input, target) pairs of a .jsonl file (two string fields per line) or a .tsv file
    (input TAB target per line; fields hold no tabs or newlines)."""
    pairs = []
    for where, line in _numbered_lines(path):
        if path.endswith(".jsonl"):
            fields = _json_fields(where, line, (input_field, target_field))
            if not all(isinstance(field, str) for field in fields):
                raise ValueError(f"{where}: needs string fields {input_field!r} and "
                                 f"{target_field!r}")
        else:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2:
                raise ValueError(f"{where}: expected input<TAB>target, got {len(fields)} "
                                 "tab-separated field(s)")
        pairs.append(tuple(fields))
    if not pairs:
        raise ValueError(f"{path} holds no examples")
    return pairs


def supervised_files_source(files: str | Sequence[str],
                            validation_files: str | Sequence[str] | None = None,
                            input_field: str = "inputs", target_field: str = "targets"
                            ) -> seqio.DataSource:
    """Local (input, target) examples as {"inputs": tf.string, "targets": tf.string}, from
    `.jsonl` files (fields `input_field`, `target_field`) or `.tsv` files (input TAB
    target). Files are parsed now, so a bad one fails at registration; shuffling orders the
    examples of all files of the split."""
    files_by_split = {"train": _check_files(files)}
    if validation_files is not None:
        files_by_split["validation"] = _check_files(validation_files)
    pairs_by_split = {split: [pair for path in paths
                              for pair in _read_supervised_pairs(path, input_field, target_field)]
                      for split, paths in files_by_split.items()}
    for split, pairs in pairs_by_split.items():
        if not pairs:
            raise ValueError(f"the {split} files hold no examples "
                             f"({', '.join(files_by_split[split])}): add one (input, target) "
                             "per line, as JSON (.jsonl) or input TAB target (.tsv)")
    splits = tuple(files_by_split)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        _check_split(split, splits)
        pairs = pairs_by_split[split]
        if shuffle_files:
            pairs = [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]
        return _pairs_dataset(pairs)

    return seqio.FunctionDataSource(dataset_fn, splits=splits)


def tfds_source(tfds_name: str, splits: dict[str, str]) -> seqio.DataSource:
    """A TFDS dataset prepared under $TFDS_DATA_DIR (default ~/tensorflow_datasets); nothing
    is read or downloaded until the first dataset is built."""
    return seqio.TfdsDataSource(tfds_name=tfds_name, splits=splits)


def named_source(name: str) -> seqio.DataSource:
    """"stdlib" (the embedded corpus), "c4" (C4 English) or "wikipedia" (English Wikipedia)."""
    if name == "stdlib":
        return stdlib_source()
    if name in TFDS_SOURCES:
        return tfds_source(*TFDS_SOURCES[name])
    raise ValueError(f"unknown source {name!r}: allowed values are {', '.join(SOURCE_NAMES)}, "
                     "or use tasks.register_text_task for local files")


class ReseededSource(seqio.DataSource):
    """`source` read with its shuffle seed offset by `seed_offset`: tasks that share a source
    in one mixture (UL2's denoisers) then read its documents in different orders, instead of
    each seeing the same passages at the same time. Shards and splits are the source's."""

    def __init__(self, source: seqio.DataSource, seed_offset: int):
        super().__init__(splits=source.splits, caching_permitted=source.caching_permitted)
        self._source = source
        self._seed_offset = seed_offset

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return self._source.supports_arbitrary_sharding

    def list_shards(self, split: str) -> Sequence[str]:
        return self._source.list_shards(split)

    def num_input_examples(self, split: str) -> int | None:
        return self._source.num_input_examples(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        if seed is not None:
            seed += self._seed_offset
        return self._source.get_dataset(split=split, shuffle=shuffle, seed=seed,
                                        shard_info=shard_info)
