"""The classical baseline a head must beat: word TF-IDF + logistic regression, trained the same way.

``modworker train`` fits it on the same training part, with the same cross-validation
folds and the same threshold rule (F1-max on out-of-fold scores, Platt-calibrated), and
measures it on the same held-out split as the head. Its numbers go into ``baseline.json``
in the head directory; ``modworker eval --holdout`` prints them beside the head's.

Word unigrams and bigrams of the raw text (lower-cased, scikit-learn's default token
pattern), sublinear TF, at least 2 training texts per term, C = 4 without class weights:
of C 4 and 16, with and without balanced class weights, the setting that did best on the
held-out split when this was written, so the comparison gives the baseline the benefit
of the doubt. Needs scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

BASELINE_C = 4.0


def fit_baseline(
    texts: Sequence[str],
    targets: np.ndarray,
    train: np.ndarray,
    folds: Sequence[tuple[Any, Any]],
    *,
    c: float = BASELINE_C,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores for every text, thresholds per label): fitted on the ``train`` rows only.

    Scores are Platt-calibrated per label on out-of-fold logits; thresholds are F1-max on
    out-of-fold calibrated scores of the training rows, as for the head.
    """
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from worker.offline.eval_metrics import f1_max_threshold
    from worker.offline.head_fit import _linear_logits, _stack

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, dtype=np.float32)
    train_texts = [texts[i] for i in train]
    x_train = vectorizer.fit_transform(train_texts)
    x_all = vectorizer.transform(texts)
    y = targets[train]
    oof, weight, bias = _linear_logits(x_train, y, folds, c, None)
    logits_all = np.asarray(x_all @ weight.T) + bias
    scores = np.zeros(targets.shape)
    thresholds = np.zeros(targets.shape[1])
    for j in range(targets.shape[1]):
        z = oof[:, [j]]
        w, b = _stack(z, y[:, j])
        scores[:, j] = 1.0 / (1.0 + np.exp(-(logits_all[:, [j]] @ w + b)))
        oof_scores = np.zeros(len(train))
        for fold_train, fold_test in folds:
            fw, fb = _stack(z[fold_train], y[fold_train, j])
            oof_scores[fold_test] = 1.0 / (1.0 + np.exp(-(z[fold_test] @ fw + fb)))
        thresholds[j], _ = f1_max_threshold(y[:, j], oof_scores)
    return scores, thresholds
