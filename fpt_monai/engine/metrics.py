"""Classification metrics for the bundle's evaluators: macro F1 and quadratic-weighted kappa as ignite metrics.

Both derive from ignite's :class:`~ignite.metrics.ConfusionMatrix`, so they accumulate over an epoch and are
summed across processes in distributed runs. AUC comes from MONAI's ``ROCAUC`` handler and accuracy from
ignite's ``Accuracy``; :func:`classification_output` gives all of them the same view of an evaluator's output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from ignite.metrics import ConfusionMatrix
from monai.utils import CommonKeys

__all__ = ["classification_output", "macro_f1", "quadratic_weighted_kappa", "MacroF1", "QuadraticWeightedKappa"]


def classification_output(output: Sequence[Mapping] | Mapping, one_hot: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, labels) from a MONAI engine's output, batched.

    Args:
        output: ``engine.state.output``: a list of per-item dicts (decollated) or one dict of batched tensors,
            with ``"pred"`` (class scores, (C,) per item) and ``"label"`` (class index, scalar or (1,) per item,
            or one-hot (C,)).
        one_hot: return labels one-hot (B, C) (MONAI's ``ROCAUC`` needs them) instead of indices (B,).

    Returns:
        ``pred`` (B, C) float and ``label`` (B,) long or (B, C) float.
    """
    if isinstance(output, Mapping):
        pred, label = torch.as_tensor(output[CommonKeys.PRED]), torch.as_tensor(output[CommonKeys.LABEL])
    else:
        pred = torch.stack([torch.as_tensor(item[CommonKeys.PRED]) for item in output])
        label = torch.stack([torch.as_tensor(item[CommonKeys.LABEL]).reshape(-1) for item in output])
    pred = pred.float().reshape(pred.shape[0], -1)
    num_classes = pred.shape[1]
    label = label.reshape(label.shape[0], -1)
    if label.shape[1] == num_classes and num_classes > 1:  # one-hot already
        label = label.argmax(dim=1)
    else:
        label = label[:, 0].long()
    if one_hot:
        return pred, torch.nn.functional.one_hot(label, num_classes).float()
    return pred, label


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


class MacroF1(ConfusionMatrix):
    """Macro-averaged F1 over ``num_classes`` (ignite metric; predictions are the argmax of the scores).

    Args:
        num_classes: number of classes.
        output_transform: engine output -> (scores (B, C), labels (B,)); default :func:`classification_output`.
    """

    def __init__(self, num_classes: int, output_transform=classification_output, device="cpu") -> None:
        super().__init__(num_classes=num_classes, output_transform=output_transform, device=device)

    def compute(self) -> float:
        return macro_f1(super().compute())


class QuadraticWeightedKappa(ConfusionMatrix):
    """Quadratic-weighted Cohen's kappa between labels and the argmax of the scores (ignite metric).

    Args:
        num_classes: number of (ordinal) classes.
        output_transform: engine output -> (scores (B, C), labels (B,)); default :func:`classification_output`.
    """

    def __init__(self, num_classes: int, output_transform=classification_output, device="cpu") -> None:
        super().__init__(num_classes=num_classes, output_transform=output_transform, device=device)

    def compute(self) -> float:
        return quadratic_weighted_kappa(super().compute())
