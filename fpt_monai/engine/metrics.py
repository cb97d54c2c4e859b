"""Classification metrics for the bundle's evaluators: macro F1 and quadratic-weighted kappa from ignite.

Both accumulate counts over an epoch (ignite's ``Precision``/``Recall`` and ``ConfusionMatrix``), summed across
processes in distributed runs. AUC comes from MONAI's ``ROCAUC`` handler and accuracy from ignite's
``Accuracy``; :func:`classification_output` gives all of them the same view of an evaluator's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from ignite.metrics import CohenKappa, Fbeta, MetricsLambda, Precision, Recall
from monai.utils import CommonKeys

__all__ = ["classification_output", "confusion_matrix", "MacroF1", "QuadraticWeightedKappa"]


def classification_output(
    output: Sequence[Mapping] | Mapping, one_hot: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
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


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts (long, CPU): rows are the true classes, columns the predicted ones.

    Args:
        labels: (B,) true class indices.
        predictions: (B,) predicted class indices.
        num_classes: number of classes.
    """
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    predictions = torch.as_tensor(predictions).long().reshape(-1).cpu()
    counts = torch.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _predictions(output_transform: Callable, num_classes: int, indices: bool) -> Callable:
    """``output_transform`` checked for ``num_classes`` scores per item, giving class indices when ``indices``."""

    def transform(output) -> tuple[torch.Tensor, torch.Tensor]:
        pred, label = output_transform(output)
        if pred.ndim != 2 or pred.shape[1] != num_classes:
            raise ValueError(
                f"the metric expects {num_classes} class scores per item, got predictions {tuple(pred.shape)}."
            )
        return (pred.argmax(dim=1) if indices else pred), label

    return transform


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    return int(num_classes)


def MacroF1(  # noqa: N802 - the class-like name the bundle configs use as `_target_`
    num_classes: int, output_transform: Callable = classification_output, device: str | torch.device = "cpu"
) -> MetricsLambda:
    """Macro-averaged F1 over ``num_classes``: ignite's ``Fbeta(beta=1, average=True)`` on per-class precision
    and recall of the argmax of the scores. A class neither present nor predicted counts as 0 in the mean.

    Args:
        num_classes: number of classes (the scores must have this many per item).
        output_transform: engine output -> (scores (B, C), labels (B,)); default :func:`classification_output`.
        device: where the counts are kept.
    """
    transform = _predictions(output_transform, _check_num_classes(num_classes), indices=False)
    precision = Precision(average=False, output_transform=transform, device=device)
    recall = Recall(average=False, output_transform=transform, device=device)
    return Fbeta(beta=1.0, average=True, precision=precision, recall=recall)


def QuadraticWeightedKappa(  # noqa: N802 - the class-like name the bundle configs use as `_target_`
    num_classes: int, output_transform: Callable = classification_output, device: str | torch.device = "cpu"
) -> CohenKappa:
    """Quadratic-weighted Cohen's kappa between labels and the argmax of the scores (the grading metric of
    diabetic-retinopathy challenges): ignite's ``CohenKappa(weights="quadratic")`` on a running confusion matrix.

    Args:
        num_classes: number of (ordinal) classes (the scores must have this many per item).
        output_transform: engine output -> (scores (B, C), labels (B,)); default :func:`classification_output`.
        device: where the confusion matrix is kept.
    """
    num_classes = _check_num_classes(num_classes)
    return CohenKappa(
        output_transform=_predictions(output_transform, num_classes, indices=True),
        weights="quadratic",
        num_classes=num_classes,
        device=device,
    )
