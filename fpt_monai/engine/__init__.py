"""Engines' companions: classification metrics, handlers and checkpoint evaluation for the bundle."""

from fpt_monai.engine.evaluation import evaluate_checkpoints
from fpt_monai.engine.handlers import ClassificationReport, GradientNormClipping, ProgressBarHandler, write_training_scalars
from fpt_monai.engine.metrics import (
    MacroF1,
    QuadraticWeightedKappa,
    classification_output,
    macro_f1,
    quadratic_weighted_kappa,
)

__all__ = [
    "ClassificationReport",
    "GradientNormClipping",
    "MacroF1",
    "ProgressBarHandler",
    "QuadraticWeightedKappa",
    "classification_output",
    "evaluate_checkpoints",
    "macro_f1",
    "quadratic_weighted_kappa",
    "write_training_scalars",
]
