"""PNG plots for ``modworker eval``: how well scores separate harmful from safe.

- ``pr_curves.png``: precision-recall curve per category, with the policy's operating
  point marked.
- ``score_histograms.png``: per category, the score distribution of labelled positives
  against everything else (log counts).
- ``reliability.png``: reliability diagrams (calibration) per category and for ``unsafe``.
- ``embeddings_2d.png``: a 2-D projection (PCA, or t-SNE) of the inputs' embeddings,
  coloured by label: whether harmful and safe content separate in the embedding space
  at all, which is what makes a small head on a local encoder work.

matplotlib runs headless (Agg); needs the ``local`` extra.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt: Any, n: int, height: float) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels (3 a row, each 4.2 wide and ``height`` high), the unused ones off."""
    cols = min(3, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height * rows), squeeze=False)
    panels = list(axes.flat)
    for ax in panels[n:]:
        ax.axis("off")
    return fig, panels[:n]


def _unit_square(ax: Any, xlabel: str, ylabel: str, legend_loc: str) -> None:
    """Axes for a plot of two fractions: [0, 1] x [0, 1] with a little head room."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc=legend_loc)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pr_curves(
    path: Path,
    categories: Sequence[str],
    positives: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    operating_points: Mapping[str, tuple[float, float]],
) -> Path:
    """One precision-recall panel per category; ``operating_points[c]`` = (recall, precision)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = _pyplot()
    fig, panels = _panels(plt, len(categories), 3.6)
    for ax, category in zip(panels, categories, strict=True):
        y, s = positives[category], scores[category]
        if y.any():
            precision, recall, _ = precision_recall_curve(y, s)
            ax.plot(recall, precision, lw=1.5)
            ax.axhline(y.mean(), color="grey", lw=0.8, ls=":", label=f"base rate {y.mean():.3f}")
            r, p = operating_points[category]
            ax.plot([r], [p], "o", color="crimson", label="policy threshold")
            ax.set_title(f"{category}\nAUPRC {average_precision_score(y, s):.3f}, n+={int(y.sum())}", fontsize=9)
        _unit_square(ax, "recall", "precision", "lower left")
    return _save(plt, fig, path)


def plot_score_histograms(
    path: Path,
    categories: Sequence[str],
    positives: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    thresholds: Mapping[str, float | None],
) -> Path:
    """Score histograms per category: labelled positives against all other inputs."""
    import numpy as np

    plt = _pyplot()
    fig, panels = _panels(plt, len(categories), 3.2)
    bins = np.linspace(0, 1, 41)
    for ax, category in zip(panels, categories, strict=True):
        y, s = positives[category], scores[category]
        ax.hist(s[~y], bins=bins, alpha=0.6, label=f"others ({int((~y).sum())})", color="tab:blue")
        ax.hist(s[y], bins=bins, alpha=0.6, label=f"{category} ({int(y.sum())})", color="tab:red")
        if thresholds.get(category) is not None:
            ax.axvline(thresholds[category], color="black", lw=1, ls="--", label="threshold")
        ax.set_yscale("log")
        ax.set_title(category, fontsize=9)
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_embeddings(
    path: Path, embeddings: np.ndarray, names: Sequence[str], *, method: str = "pca", title: str = ""
) -> Path:
    """2-D projection of ``embeddings`` with one colour per label name (``safe`` in grey)."""
    import numpy as np

    plt = _pyplot()
    if method == "tsne":
        from sklearn.manifold import TSNE

        points = TSNE(
            n_components=2, init="pca", random_state=0, perplexity=min(30, max(5, len(names) // 4))
        ).fit_transform(embeddings)
    else:
        from sklearn.decomposition import PCA

        points = PCA(n_components=2, random_state=0).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    order = sorted(set(names), key=lambda n: (n != "safe", n))
    palette = plt.get_cmap("tab10")
    for i, name in enumerate(order):
        mask = np.array([n == name for n in names])
        color = "lightgrey" if name == "safe" else palette(i % 10)
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, color=color, label=f"{name} ({int(mask.sum())})")
    ax.set_title(title or f"embeddings, {method.upper()} projection", fontsize=10)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(plt, fig, path)


def plot_reliability(path: Path, calibrations: Mapping[str, Mapping[str, Any]]) -> Path:
    """Reliability diagrams: per category, fraction of positives against mean score per score bin.

    ``calibrations[name]`` is ``eval_metrics.reliability``'s result. Points on the diagonal
    mean a score of 0.8 is right about 80% of the time; marker area grows with the bin's
    count, and the title gives the expected calibration error (ECE).
    """
    plt = _pyplot()
    names = list(calibrations)
    fig, panels = _panels(plt, len(names), 3.8)
    for ax, name in zip(panels, names, strict=True):
        entry = calibrations[name]
        bins = entry["bins"]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
        if bins:
            total = sum(b["count"] for b in bins)
            ax.plot([b["mean_score"] for b in bins], [b["positive_rate"] for b in bins], color="tab:blue", lw=1)
            ax.scatter(
                [b["mean_score"] for b in bins],
                [b["positive_rate"] for b in bins],
                s=[12 + 300 * math.sqrt(b["count"] / total) for b in bins],
                color="tab:blue",
                alpha=0.7,
                label="bins (area ~ count)",
            )
        ax.set_title(f"{name}\nECE {entry['ece']:.3f}", fontsize=9)
        _unit_square(ax, "mean score in bin", "fraction labelled", "upper left")
    return _save(plt, fig, path)
