"""Fit a format-2 head: embedding and token n-gram logistic regressions, stacked and calibrated.

The recipe (``modworker train`` runs it on the training part of its split only):

1. Token n-gram vocabulary: unigrams and bigrams of the encoder's token ids that occur
   in at least ``min_df`` training texts, with smoothed IDF (scikit-learn's formula).
2. Two linear models per label, each an L2 logistic regression: one on the standardised
   pooled embedding, one on the n-gram TF-IDF rows (``worker.backends.embedding_head``).
3. Out-of-fold logits of both from ``folds``-fold cross-validation on the training part
   (grouped: copies of a text stay in one fold; stratified on source and label set).
4. Per label, a two-input logistic regression on those out-of-fold logits (Platt scaling
   of their combination): it weighs the two models and calibrates the result. The base
   models are then refitted on the whole training part.
5. Thresholds: a second cross-validation of step 4 gives out-of-fold calibrated scores for
   every training text; per label the F1-max threshold on those is kept, and their
   reliability (ECE) is reported. Nothing outside the training part is looked at.

Needs numpy, scipy and scikit-learn (the ``local`` extra); torch only to build n-grams.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import scipy.sparse

    from worker.backends.local_model import Features

NGRAM_CHUNK = 512
STACK_C = 100.0
"""Inverse L2 strength of the two-input calibration regressions: nearly unregularised."""


@dataclass
class FitSettings:
    """Hyper-parameters of the head recipe (``modworker train`` flags)."""

    c_embedding: float = 1.0
    c_ngrams: float = 4.0
    min_df: int = 2
    folds: int = 5
    seed: int = 0
    class_weight: str | None = "balanced"


@dataclass
class FittedHead:
    """Everything a format-2 head directory stores, plus the cross-validated evidence."""

    weight: np.ndarray
    bias: np.ndarray
    ngram_keys: np.ndarray
    ngram_idf: np.ndarray
    ngram_weight: np.ndarray
    ngram_bias: np.ndarray
    combine_weight: np.ndarray
    combine_bias: np.ndarray
    oof_scores: np.ndarray
    """Out-of-fold calibrated scores of the training texts (rows of the training part)."""
    info: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, np.ndarray]:
        import numpy as np

        return {
            "weight": self.weight.astype(np.float32),
            "bias": self.bias.astype(np.float32),
            "ngram_keys": self.ngram_keys.astype(np.int64),
            "ngram_idf": self.ngram_idf.astype(np.float32),
            "ngram_weight": self.ngram_weight.astype(np.float32),
            "ngram_bias": self.ngram_bias.astype(np.float32),
            "combine_weight": self.combine_weight.astype(np.float32),
            "combine_bias": self.combine_bias.astype(np.float32),
        }


def ngram_vocabulary(token_ids: Sequence[Sequence[int]], vocab_size: int, min_df: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys ascending, smoothed idf) of the n-grams in at least ``min_df`` of these texts."""
    import numpy as np

    document_frequency: Counter[int] = Counter()
    for ids in token_ids:
        keys = set(ids)
        keys.update(vocab_size + a * vocab_size + b for a, b in itertools.pairwise(ids))
        document_frequency.update(keys)
    kept = sorted(k for k, n in document_frequency.items() if n >= min_df)
    n_docs = len(token_ids)
    idf = np.array([math.log((1 + n_docs) / (1 + document_frequency[k])) + 1.0 for k in kept], dtype=np.float32)
    return np.array(kept, dtype=np.int64), idf


def ngram_matrix(
    features: Sequence[Features], vocab_size: int, keys: np.ndarray, idf: np.ndarray
) -> scipy.sparse.csr_matrix:
    """TF-IDF rows (scipy CSR) computed exactly as the head computes them at inference."""
    import numpy as np
    import scipy.sparse
    import torch

    from worker.backends.embedding_head import ngram_tfidf

    key_tensor, idf_tensor = torch.from_numpy(keys), torch.from_numpy(idf)
    blocks = []
    for start in range(0, len(features), NGRAM_CHUNK):
        part = features[start : start + NGRAM_CHUNK]
        width = max(1, *(len(f.input_ids) for f in part))
        ids = torch.zeros((len(part), width), dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, f in enumerate(part):
            ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids, dtype=torch.long)
            mask[row, : len(f.input_ids)] = 1
        rows, columns, values = ngram_tfidf(ids, mask, vocab_size, key_tensor, idf_tensor)
        blocks.append(
            scipy.sparse.csr_matrix(
                (values.numpy(), (rows.numpy(), columns.numpy())), shape=(len(part), len(keys)), dtype=np.float32
            )
        )
    return scipy.sparse.vstack(blocks, format="csr") if blocks else scipy.sparse.csr_matrix((0, len(keys)))


def grouped_folds(groups: Sequence[str], strata: Sequence[str], folds: int, seed: int) -> list[tuple[Any, Any]]:
    """``folds`` (train, test) index pairs: a group never on both sides, strata balanced where possible."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    sizes = Counter(strata)
    pooled = [s if sizes[s] >= folds else "(rare)" for s in strata]
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(groups)), pooled, groups))


def _logistic(x: Any, y: np.ndarray, c: float, class_weight: str | None) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5_000, class_weight=class_weight).fit(x, y)


def _linear_logits(
    x: Any, y: np.ndarray, folds: Sequence[tuple[Any, Any]], c: float, class_weight: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out-of-fold logits, weight, bias) of per-label logistic regressions on ``x``.

    A label with one class (overall or in a fold) gets its base rate as a constant logit.
    """
    import numpy as np

    n, labels = y.shape
    oof = np.zeros((n, labels))
    weight = np.zeros((labels, x.shape[1]))
    bias = np.zeros(labels)
    for j in range(labels):
        column = y[:, j]
        for train, test in folds:
            if column[train].all() or not column[train].any():
                oof[test, j] = _base_logit(column[train])
            else:
                oof[test, j] = _logistic(x[train], column[train], c, class_weight).decision_function(x[test])
        if column.all() or not column.any():
            bias[j] = _base_logit(column)
            continue
        model = _logistic(x, column, c, class_weight)
        weight[j], bias[j] = model.coef_[0], model.intercept_[0]
    return oof, weight, bias


def _base_logit(column: np.ndarray) -> float:
    import numpy as np

    rate = float(np.clip(column.mean() if column.size else 0.5, 1e-6, 1 - 1e-6))
    return math.log(rate / (1 - rate))


def _stack(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Platt scaling of a label's component logits ``z`` (n x k): (weights, bias)."""
    import numpy as np

    if y.all() or not y.any():
        return np.zeros(z.shape[1]), _base_logit(y)
    model = _logistic(z, y, STACK_C, None)
    return model.coef_[0], float(model.intercept_[0])


def fit_head(
    embeddings: np.ndarray,
    ngrams: scipy.sparse.csr_matrix,
    targets: np.ndarray,
    folds: Sequence[tuple[Any, Any]],
    settings: FitSettings,
    *,
    ngram_keys: np.ndarray,
    ngram_idf: np.ndarray,
) -> FittedHead:
    """Run the recipe on the training part (rows of ``embeddings``/``ngrams``/``targets``)."""
    import numpy as np

    mean = embeddings.mean(axis=0)
    scale = embeddings.std(axis=0)
    scale[scale == 0] = 1.0
    standardised = (embeddings - mean) / scale
    oof_e, weight_z, bias_z = _linear_logits(standardised, targets, folds, settings.c_embedding, settings.class_weight)
    # Fold the standardisation into the layer, so it takes raw embeddings.
    weight_e = weight_z / scale
    bias_e = bias_z - (weight_z * mean / scale).sum(axis=1)
    oof_n, weight_n, bias_n = _linear_logits(ngrams, targets, folds, settings.c_ngrams, settings.class_weight)

    labels = targets.shape[1]
    combine_weight = np.zeros((labels, 2))
    combine_bias = np.zeros(labels)
    oof_scores = np.zeros(targets.shape)
    for j in range(labels):
        z = np.column_stack([oof_e[:, j], oof_n[:, j]])
        combine_weight[j], combine_bias[j] = _stack(z, targets[:, j])
        for train, test in folds:  # nested: the scores thresholds are chosen on are out-of-fold too
            w, b = _stack(z[train], targets[train, j])
            oof_scores[test, j] = 1.0 / (1.0 + np.exp(-(z[test] @ w + b)))
    return FittedHead(
        weight=weight_e,
        bias=bias_e,
        ngram_keys=ngram_keys,
        ngram_idf=ngram_idf,
        ngram_weight=weight_n,
        ngram_bias=bias_n,
        combine_weight=combine_weight,
        combine_bias=combine_bias,
        oof_scores=oof_scores,
    )
