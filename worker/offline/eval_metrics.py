"""Per-category quality numbers shared by ``modworker train`` and ``modworker eval``.

A category *hits* an input when its score is at least the threshold (``score >=
threshold``, as the policy decides). Numbers are for one category treated as a binary
task over all inputs: positives are the inputs labelled with it, every other input is a
negative. Needs numpy and scikit-learn (the ``local`` extra).
"""

from __future__ import annotations

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
