"""seqio metric functions: fn(targets, predictions) -> {name: value}, over postprocessed
strings (or labels), every value in percent as T5 reports them; and score metrics,
fn(targets, scores), over each example's summed target log-probability.

BLEU is sacrebleu's corpus BLEU (13a tokenisation, exponential smoothing); ROUGE is
rouge-score's F-measure averaged over examples, with Porter stemming as in T5.
"""
from typing import Callable, Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_lengths(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """Percent of predictions equal to their target (labels of any type)."""
    _check_lengths(targets, predictions)
    return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percent of predicted strings equal to their target up to runs of whitespace."""
    _check_lengths(targets, predictions)
    same = [" ".join(t.split()) == " ".join(p.split()) for t, p in zip(targets, predictions)]
    return {"sequence_accuracy": 100.0 * float(np.mean(same))}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU of the predictions against one reference each."""
    _check_lengths(targets, predictions)
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)]).score}


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures."""
    _check_lengths(targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(target, prediction)
              for target, prediction in zip(targets, predictions)]
    return {name: 100.0 * float(np.mean([score[name].fmeasure for score in scores]))
            for name in ROUGE_TYPES}


def rank_classification_accuracy(targets: Sequence[tuple[int, bool]], scores: Sequence[float]
                                 ) -> dict[str, float]:
    """Percent of questions whose highest-scoring choice is a correct one. `targets` are
    (question index, is_correct) per choice (preprocessors.rank_classification_target). A
    question with fewer choices scored than the others (cut by an example limit) is left
    out."""
    _check_lengths(targets, scores)
    best: dict[int, tuple[float, bool]] = {}
    counts: dict[int, int] = {}
    for (question, is_correct), score in zip(targets, scores):
        counts[question] = counts.get(question, 0) + 1
        if question not in best or score > best[question][0]:
            best[question] = (float(score), is_correct)
    whole = [best[question][1] for question, count in counts.items()
             if count == max(counts.values())]
    return {"accuracy": 100.0 * float(np.mean(whole))}


METRICS: dict[str, Callable] = {fn.__name__: fn for fn in (accuracy, sequence_accuracy, bleu,
                                                           rouge)}


def get_metrics(names: Sequence[str]) -> list[Callable]:
    """The metric functions called `names` (keys of METRICS)."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)}")
    return [METRICS[name] for name in names]
