"""Per-category quality numbers shared by ``modworker train`` and ``modworker eval``.

A category *hits* an input when its score is at least the threshold (``score >=
threshold``, as the policy decides). Numbers are for one category treated as a binary
task over all inputs: positives are the inputs labelled with it, every other input is a
negative. Needs numpy and scikit-learn (the ``local`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def f1_max_threshold(positive: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of the threshold that maximises F1; (1.0, 0.0) with no positives.

    The threshold is one of the observed scores, so ``scores >= threshold`` reproduces
    the F1 exactly.
    """
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    if not positive.any():
        return 1.0, 0.0
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def threshold_for_precision(positive: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, float] | None:
    """(threshold, recall) of the lowest threshold whose precision reaches ``target``.

    The lowest such threshold has the highest recall among them. None when no threshold
    reaches the target (or there are no positives).
    """
    import numpy as np
    from sklearn.metrics import precision_recall_curve

    if not positive.any():
        return None
    precision, recall, thresholds = precision_recall_curve(positive, scores)
    reached = np.flatnonzero(precision[:-1] >= target)
    if reached.size == 0:
        return None
    best = int(reached[np.argmax(recall[reached])])
    return float(thresholds[best]), float(recall[best])


def category_metrics(
    positive: np.ndarray, scores: np.ndarray, hits: np.ndarray, *, target_precision: float
) -> dict[str, Any]:
    """The report entry of one category.

    ``positive``: the labels (bool per input); ``scores``: the category's score per input;
    ``hits``: whether the policy flagged the category per input. Keys: ``support``,
    ``precision``, ``recall``, ``f1`` (of ``hits``), ``auprc`` (average precision of
    ``scores``; None without positives), ``best_f1`` and ``best_f1_threshold``, and
    ``threshold_at_target_precision`` / ``recall_at_target_precision`` (None when the
    target is out of reach).
    """
    from sklearn.metrics import average_precision_score

    support = int(positive.sum())
    true_hits = int((hits & positive).sum())
    flagged = int(hits.sum())
    precision = true_hits / flagged if flagged else 0.0
    recall = true_hits / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    best_threshold, best_f1 = f1_max_threshold(positive, scores)
    at_target = threshold_for_precision(positive, scores, target_precision)
    return {
        "support": support,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "auprc": round(float(average_precision_score(positive, scores)), 4) if support else None,
        "flagged": flagged,
        "best_f1": round(best_f1, 4),
        "best_f1_threshold": round(best_threshold, 4),
        "threshold_at_target_precision": round(at_target[0], 4) if at_target else None,
        "recall_at_target_precision": round(at_target[1], 4) if at_target else None,
    }


def reliability(positive: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Calibration of ``scores`` as probabilities: equal-width bins over [0, 1].

    ``ece`` (expected calibration error): the count-weighted mean over non-empty bins of
    |fraction of positives - mean score|. ``bins``: one entry per non-empty bin, ``{"low",
    "high", "count", "mean_score", "positive_rate"}``, the points of a reliability diagram.
    A calibrated scorer has ``positive_rate`` close to ``mean_score`` in every bin.
    """
    import numpy as np

    index = np.minimum((scores * bins).astype(int), bins - 1)
    entries = []
    ece = 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        mean_score = float(scores[members].mean())
        rate = float(positive[members].mean())
        ece += count / len(scores) * abs(rate - mean_score)
        entries.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "mean_score": round(mean_score, 4),
                "positive_rate": round(rate, 4),
            }
        )
    return {"ece": round(ece, 4), "bins": entries}


def bootstrap_f1(
    positive: np.ndarray, hits: np.ndarray, *, resamples: int = 1_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of F1 (``level`` coverage), resampling inputs with replacement."""
    import numpy as np

    n = len(positive)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    tp_i = (positive & hits).astype(np.int64)
    pos_i = positive.astype(np.int64)
    hit_i = hits.astype(np.int64)
    values = np.empty(resamples)
    for start in range(0, resamples, 100):
        draw = rng.integers(0, n, size=(min(100, resamples - start), n))
        tp, pos, flagged = tp_i[draw].sum(1), pos_i[draw].sum(1), hit_i[draw].sum(1)
        denominator = pos + flagged
        values[start : start + len(draw)] = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)


def bootstrap_macro_f1(
    positives: Sequence[np.ndarray],
    hits: Sequence[np.ndarray],
    *,
    resamples: int = 1_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean F1 over several categories (same resampled inputs)."""
    import numpy as np

    n = len(positives[0]) if positives else 0
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    values = np.zeros(resamples)
    for start in range(0, resamples, 100):
        draw = rng.integers(0, n, size=(min(100, resamples - start), n))
        for positive, hit in zip(positives, hits, strict=True):
            tp = (positive & hit).astype(np.int64)[draw].sum(1)
            denominator = positive.astype(np.int64)[draw].sum(1) + hit.astype(np.int64)[draw].sum(1)
            values[start : start + len(draw)] += np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    values /= len(positives)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return round(float(low), 4), round(float(high), 4)


def f1_of(positive: np.ndarray, hits: np.ndarray) -> float:
    """F1 of boolean decisions against boolean labels (0 when there is nothing to compare)."""
    tp = int((positive & hits).sum())
    denominator = int(positive.sum()) + int(hits.sum())
    return 2 * tp / denominator if denominator else 0.0
