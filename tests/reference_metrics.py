"""Reference formulas of macro F1 and quadratic-weighted kappa on a confusion matrix, for testing the ignite
metrics that :mod:`fpt_monai.engine.metrics` builds (``confusion[i, j]`` counts items of class i predicted as j)."""

from __future__ import annotations

import torch


def macro_f1(confusion: torch.Tensor) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both counts as 0."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1e-12), torch.zeros_like(tp))
    return float(f1.mean())


def quadratic_weighted_kappa(confusion: torch.Tensor) -> float:
    """Cohen's kappa with quadratic weights (the grading metric of diabetic-retinopathy challenges).

    ``confusion[i, j]`` counts items of true class i predicted as j. Returns 1 for perfect agreement, 0 for
    chance agreement, and 0 when the raters' marginals leave no disagreement to explain.
    """
    confusion = confusion.double()
    n = confusion.shape[0]
    total = confusion.sum()
    if total == 0 or n < 2:
        return 0.0
    grades = torch.arange(n, dtype=torch.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2 / (n - 1) ** 2
    expected = confusion.sum(1)[:, None] * confusion.sum(0)[None, :] / total
    denominator = (weights * expected).sum()
    if denominator == 0:
        return 0.0
    return float(1.0 - (weights * confusion).sum() / denominator)

