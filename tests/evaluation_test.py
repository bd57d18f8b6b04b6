"""Task metrics: the metric functions against sacrebleu / rouge-score called directly and
closed forms, supervised JSONL / TSV tasks, the docstring task of the embedded corpus, and
seqio evaluation of decoded predictions."""
import json

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from t5x_lite import evaluation
from t5x_lite.data import corpora
from t5x_lite.data import metrics
from t5x_lite.data import tasks
from t5x_lite.data import vocab

TARGETS = ["the cat sat on the mat", "a quick brown fox jumps", "hello world", "open the file"]
PREDICTIONS = ["the cat sat on a mat", "a quick brown dog jumps over", "hello world",
               "close  the file"]


def test_bleu_equals_sacrebleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [TARGETS]).score
    assert metrics.bleu(TARGETS, PREDICTIONS) == {"bleu": pytest.approx(expected, abs=1e-9)}
    assert 0 < expected < 100
    assert metrics.bleu(TARGETS, TARGETS)["bleu"] == pytest.approx(100.0)


def test_rouge_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(t, p) for t, p in zip(TARGETS, PREDICTIONS)]
    result = metrics.rouge(TARGETS, PREDICTIONS)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * np.mean([score[name].fmeasure for score in scores])
        assert result[name] == pytest.approx(expected, abs=1e-9)
    # Closed form for one pair: 5 of 6 unigrams shared both ways, so F1 = 5/6.
    assert metrics.rouge(["the cat sat on the mat"], ["the cat sat on a mat"])["rouge1"] == (
        pytest.approx(100 * 5 / 6))


def test_accuracy_and_sequence_accuracy():
    assert metrics.accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == {"accuracy": 50.0}
    # "close  the file" differs by a word; the double space alone would not count.
    assert metrics.sequence_accuracy(TARGETS, PREDICTIONS) == {"sequence_accuracy": 25.0}
    assert metrics.sequence_accuracy(["a b"], [" a  b "]) == {"sequence_accuracy": 100.0}
    assert metrics.accuracy(["a b"], [" a  b "]) == {"accuracy": 0.0}


def test_metric_bad_input():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown metric 'blue': choose from accuracy"):
        metrics.get_metrics(["blue"])


# --- supervised tasks ----------------------------------------------------------------------

PAIRS = [(f"repeat {word}", f"say {word} then {word} again") for word in
         "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()]


def write_pairs(tmp_path):
    jsonl, tsv = tmp_path / "train.jsonl", tmp_path / "validation.tsv"
    jsonl.write_text("".join(json.dumps({"question": i, "answer": t}) + "\n" for i, t in PAIRS))
    tsv.write_text("".join(f"{i}\t{t}\n" for i, t in PAIRS[:6]))
    return str(jsonl), str(tsv)


def register_pairs_task(tmp_path, name="pairs", metric_names=("bleu", "sequence_accuracy")):
    jsonl, tsv = write_pairs(tmp_path)
    return tasks.register_text_task(name, jsonl, objective="supervised",
                                    vocabulary=vocab.byte_vocabulary(), validation_files=tsv,
                                    input_field="question", target_field="answer",
                                    metrics=metric_names)


def test_supervised_task_reads_jsonl_and_tsv(tmp_path):
    name = register_pairs_task(tmp_path)
    task = tasks.get_task_or_mixture(name)
    lengths = {"inputs": 32, "targets": 40}
    train = list(task.get_dataset(lengths, "train", shuffle=False).as_numpy_iterator())
    validation = list(task.get_dataset(lengths, "validation", shuffle=False)
                      .as_numpy_iterator())
    assert [(e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode())
            for e in train] == PAIRS
    assert len(validation) == 6
    byte_vocab = vocab.byte_vocabulary()
    assert list(validation[0]["targets"]) == list(byte_vocab.encode("say alpha then alpha again")) + [1]


@pytest.mark.parametrize("content,message", [
    ('{"question": "x"}\n', "needs string fields 'question' and 'answer'"),
    ("not json\n", "invalid JSON"),
])
def test_supervised_jsonl_bad_lines(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        tasks.register_text_task("bad", str(path), objective="supervised",
                                 input_field="question", target_field="answer")


def test_supervised_tsv_needs_two_fields(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("only one field\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected input<TAB>target"):
        tasks.register_text_task("bad", str(path), objective="supervised")


def test_function_summaries():
    source = (
        "import os\n\n"
        "@decorator\n"
        "def join(a, b):\n"
        '    """Join two paths with a slash.\n\n    More detail.\n    """\n'
        "    return a + '/' + b\n\n"
        "class K:\n"
        "    def method(self):\n"
        "        'Too short.'\n"
        "        return 1\n\n"
        "    def other(self):\n"
        '        """Return the answer to everything."""\n'
        "        x = 42\n"
        "        return x\n")
    assert corpora.function_summaries(source) == [
        ("@decorator\ndef join(a, b):\n    return a + '/' + b", "Join two paths with a slash."),
        ("def other(self):\n    x = 42\n    return x", "Return the answer to everything."),
    ]
    assert corpora.function_summaries("def broken(:\n") == []


def test_stdlib_docstrings_split_by_file():
    """Validation examples come from the validation files only, and are never in train."""
    validation = corpora._stdlib_summaries("validation")
    assert len(validation) > 30
    expected = [pair for path in corpora.stdlib_files("validation")
                for pair in corpora.function_summaries(open(path, errors="replace").read())]
    assert list(validation) == expected
    assert tasks.get_task_or_mixture("stdlib_docstrings").metric_objs


# --- seqio evaluation of predictions -------------------------------------------------------

def oracle(task_name: str, lengths: dict, wrong_rows=()) -> callable:
    """predict(params, tokens) returning each input's target tokens (EOS included), except
    an empty prediction for the inputs whose text is in `wrong_rows`."""
    byte_vocab = vocab.byte_vocabulary()
    answers = {}
    for inputs, targets in PAIRS:
        ids = tuple(byte_vocab.encode(inputs)) + (1,)
        answers[ids] = [1] if inputs in wrong_rows else list(byte_vocab.encode(targets)) + [1]

    def predict(params, tokens):
        out = np.zeros((len(tokens), lengths["targets"]), np.int32)
        for row, ids in enumerate(tokens):
            answer = answers.get(tuple(int(i) for i in ids if i), [])
            out[row, :len(answer)] = answer
        return out, np.zeros(len(tokens), np.float32)

    return predict


def test_task_metrics_of_an_oracle_are_perfect(tmp_path):
    name = register_pairs_task(tmp_path, metric_names=("bleu", "rouge", "sequence_accuracy"))
    lengths = {"inputs": 32, "targets": 40}
    # Batch 4 over 6 examples: the last batch is padded.
    values = evaluation.TaskMetrics(name, "validation", lengths, 4)(oracle(name, lengths), None, None)
    assert values == pytest.approx({"bleu": 100.0, "rouge1": 100.0, "rouge2": 100.0,
                                    "rougeL": 100.0, "sequence_accuracy": 100.0})


def test_task_metrics_score_the_decoded_strings(tmp_path):
    name = register_pairs_task(tmp_path)
    lengths = {"inputs": 32, "targets": 40}
    wrong = {"repeat beta", "repeat delta"}
    values = evaluation.TaskMetrics(name, "validation", lengths, 4, max_examples=5)(
        oracle(name, lengths, wrong), None, None)
    targets = [t for _, t in PAIRS[:5]]
    predictions = ["" if i in wrong else t for i, t in PAIRS[:5]]
    assert values["sequence_accuracy"] == pytest.approx(60.0)
    assert values["bleu"] == pytest.approx(metrics.bleu(targets, predictions)["bleu"])


def test_task_without_metrics_is_refused():
    assert not evaluation.has_metrics("stdlib_span_corruption_bytes")
    with pytest.raises(ValueError, match="has no task with metric functions"):
        evaluation.TaskMetrics("stdlib_span_corruption_bytes", "validation",
                               {"inputs": 32, "targets": 40}, 4)


def test_mixture_metrics_are_per_task(tmp_path):
    first = register_pairs_task(tmp_path, "pairs_a", ("sequence_accuracy",))
    second = register_pairs_task(tmp_path, "pairs_b", ("sequence_accuracy",))
    mixture = tasks.register_mixture("pairs_ab", [(first, 1.0), (second, 1.0)])
    lengths = {"inputs": 32, "targets": 40}
    values = evaluation.TaskMetrics(mixture, "validation", lengths, 4)(
        oracle(mixture, lengths, {"repeat alpha", "repeat beta", "repeat gamma"}), None, None)
    assert values == {"pairs_a/sequence_accuracy": 50.0, "pairs_b/sequence_accuracy": 50.0}


# --- rank classification ---------------------------------------------------------------------

def test_rank_classification_accuracy_counts_questions_whose_best_choice_is_correct():
    # Question 0: the correct choice scores -3, another -1 -> wrong; question 1: -2 against
    # -5 and -9 -> right; question 2: a tie broken by the first choice, the correct one ->
    # right; question 3 lost a choice to an example limit and is left out.
    targets = [(0, True), (0, False), (0, False), (1, False), (1, True), (1, False),
               (2, True), (2, False), (2, False), (3, False), (3, True)]
    scores = [-3.0, -1.0, -7.0, -5.0, -2.0, -9.0, -4.0, -4.0, -6.0, -8.0, -1.0]
    assert metrics.rank_classification_accuracy(targets, scores) == {
        "accuracy": pytest.approx(200 / 3)}


def register_choice_task(tmp_path) -> str:
    """Multiple choice over PAIRS from a JSONL file: each input with its own target and
    three others."""
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"inputs": i, "choices": c, "label": label}) + "\n"
                            for i, c, label in corpora.multiple_choice(PAIRS, 4, seed=0)))
    return tasks.register_text_task("pairs_choice", [str(path)], "multiple_choice",
                                    vocab.byte_vocabulary(), validation_files=[str(path)])


@pytest.mark.parametrize("records, message", [
    ([{"inputs": "a", "choices": ["x", "y"], "label": 2}],
     "label 2 is outside its 2 choices: use 0 to 1"),
    ([{"inputs": "a", "choices": ["x", "y"], "label": 0},
      {"inputs": "b", "choices": ["x", "y", "z"], "label": 0}],
     "the questions have 2 or 3 choices: give every question the same number"),
    ([{"inputs": "a", "choices": "x", "label": 0}], "needs 'inputs' .a string., 'choices'")])
def test_bad_multiple_choice_files_are_one_line_errors(tmp_path, records, message):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(ValueError, match=message):
        tasks.register_text_task("bad_choice", [str(path)], "multiple_choice")


def oracle_scorer(decoder_only: bool, wrong_inputs=()) -> callable:
    """score(params, batch) of the model family's unpacked rows: 0 for an input's own target
    (PAIRS), -1 for any other; for the inputs in `wrong_inputs` the other way round."""
    byte_vocab = vocab.byte_vocabulary()
    answers = dict(PAIRS)

    def text(ids) -> str:
        return byte_vocab.decode([int(i) for i in ids if i > 1])

    def score(params, batch):
        out = []
        for row in range(len(batch["decoder_target_tokens"])):
            targets = batch["decoder_target_tokens"][row]
            if decoder_only:
                split = int(batch["decoder_causal_attention"][row].sum()) - 1
                inputs, targets = targets[:split], targets[split:]
            else:
                inputs = batch["encoder_input_tokens"][row]
            right = answers.get(text(inputs)) == text(targets)
            out.append(0.0 if right != (text(inputs) in wrong_inputs) else -1.0)
        return np.asarray(out, np.float32)

    return score


@pytest.mark.parametrize("decoder_only", [False, True])
def test_rank_classification_picks_the_oracle_choice(tmp_path, decoder_only):
    name = register_choice_task(tmp_path)
    lengths = {"inputs": 32, "targets": 40}
    metric = evaluation.TaskMetrics(name, "validation", lengths, 3, decoder_only=decoder_only)
    assert metric(None, oracle_scorer(decoder_only), None) == {"accuracy": 100.0}
    wrong = {"repeat alpha", "repeat beta", "repeat gamma"}
    assert metric(None, oracle_scorer(decoder_only, wrong), None) == {"accuracy": 70.0}


def test_stdlib_docstring_choice_holds_each_functions_own_docstring():
    task = tasks.get_task_or_mixture("stdlib_docstring_choice")
    pairs = set(corpora._stdlib_summaries("validation"))
    examples = list(task.get_dataset({"inputs": 512, "targets": 64}, split="validation",
                                     shuffle=False).take(40).as_numpy_iterator())
    assert len(examples) == 40 and [e["idx"][1] for e in examples[:4]] == [0, 1, 2, 3]
    for question in range(10):
        choices = examples[4 * question:4 * question + 4]
        assert {e["idx"][0] for e in choices} == {question}
        correct = [e["targets_pretokenized"].decode() for e in choices if e["is_correct"]]
        assert len(correct) == 1 and len({e["targets_pretokenized"] for e in choices}) == 4
        assert (choices[0]["inputs_pretokenized"].decode(), correct[0]) in pairs
