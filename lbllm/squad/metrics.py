"""SQuAD v1.1 exact-match and token-F1, scored the way the official v1.1 script does.

Results are only comparable with published numbers (BERT's 88.5 F1, You et al.'s
90.584) if the normalization and the averaging are identical, so every rule here is
the official one, including its quirks:

- normalization is lowercase -> drop ASCII punctuation -> drop the articles a/an/the
  -> collapse whitespace, in that order;
- F1 is over whitespace tokens of the normalized strings, counted as a multiset;
  two strings that normalize to nothing score F1 0 (v1.1 behaviour; v2.0 changed it);
- each question takes the max over its ground truths, and a question with no
  prediction scores 0 but still counts in the denominator;
- the final numbers are 100 * mean over all questions.
"""

from __future__ import annotations

import re
import statistics
import string
import sys
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "max_over_ground_truths",
    "evaluate",
    "aggregate_seeds",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Canonical form used for both EM and F1 (order of steps matters: punctuation
    goes before articles so "the," still loses its article)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalized strings are identical, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Harmonic mean of token precision and recall, tokens counted with multiplicity."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:  # also covers empty-vs-empty, which v1.1 scores 0
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2.0 * precision * recall / (precision + recall)


def max_over_ground_truths(
    metric: Callable[[str, str], float], prediction: str, ground_truths: Sequence[str]
) -> float:
    """A prediction is as good as its best match: annotators disagree on span edges."""
    if not ground_truths:
        raise ValueError("a question needs at least one ground-truth answer to be scored")
    return max(metric(prediction, truth) for truth in ground_truths)


def _articles(dataset: object) -> Iterable[Mapping]:
    """Accept the whole SQuAD json or just its "data" list, as callers hold either."""
    if isinstance(dataset, Mapping):
        if "data" not in dataset:
            raise ValueError('SQuAD json has no "data" list')
        dataset = dataset["data"]
    if not isinstance(dataset, list):
        raise ValueError('SQuAD "data" must be a list of articles')
    return dataset


def evaluate(
    dataset: object,
    predictions: Mapping[str, str],
    *,
    warn_unanswered: bool = True,
) -> dict[str, float]:
    """Score `predictions` ({question id: answer text}) against a SQuAD v1.1 dataset.

    Returns {"exact_match": .., "f1": ..} in percent. Unanswered questions count as 0
    and, unless `warn_unanswered` is False, are named on stderr like the official script.
    """
    exact = f1 = 0.0
    total = 0
    for article in _articles(dataset):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                qid = qa["id"]
                if qid not in predictions:
                    if warn_unanswered:
                        print(f"Unanswered question {qid} will receive score 0.", file=sys.stderr)
                    continue
                truths = [answer["text"] for answer in qa["answers"]]
                prediction = predictions[qid]
                exact += max_over_ground_truths(exact_match_score, prediction, truths)
                f1 += max_over_ground_truths(f1_score, prediction, truths)
    if total == 0:
        raise ValueError("SQuAD dataset has no questions to score")
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one seed) of EM and F1 over
    fine-tuning seeds, plus the seeds and the per-seed dicts themselves.

    SQuAD F1 of one fine-tuning run moves by about a point with the seed of the fresh
    QA head and the batch order, as much as recipes differ by, so results report the
    spread they were measured with.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds needs the results of at least one seed")
    out: dict[str, Any] = {}
    for key in ("exact_match", "f1"):
        values = [float(r[key]) for r in per_seed]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["seeds"] = [r["seed"] for r in per_seed]
    out["per_seed"] = [dict(r) for r in per_seed]
    return out
