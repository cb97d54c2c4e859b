"""Engines' companions: classification metrics, handlers and checkpoint evaluation for the bundle."""

from fpt_monai.engine import distributed  # multi-process helpers, as fpt_monai.engine.distributed.*
from fpt_monai.engine.checkpoint import (
    AtomicDiskSaver,
    CheckpointReadError,
    SafeCheckpointLoader,
    SafeCheckpointSaver,
    load_checkpoint,
)
from fpt_monai.engine.evaluation import evaluate_checkpoints, load_weights
from fpt_monai.engine.guards import NonFiniteLossError, NonFiniteLossGuard
from fpt_monai.engine.lock import RunLock, RunLockedError
from fpt_monai.engine.handlers import (
    ClassificationReport,
    GradientNormClipping,
    ProgressBarHandler,
    write_training_scalars,
)
from fpt_monai.engine.metrics import MacroF1, QuadraticWeightedKappa, classification_output, confusion_matrix
from fpt_monai.engine.resume import EpochSeeder, attach_resume, epoch_seed, latest_checkpoint, resume_objects
from fpt_monai.engine.tensorboard import (
    ConfusionMatrixImage,
    HyperparametersText,
    SelectionMapImages,
    SelectionMapWriter,
    write_test_results,
)

__all__ = [
    "AtomicDiskSaver",
    "CheckpointReadError",
    "EpochSeeder",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RunLock",
    "RunLockedError",
    "SafeCheckpointLoader",
    "SafeCheckpointSaver",
    "attach_resume",
    "epoch_seed",
    "latest_checkpoint",
    "resume_objects",
    "ClassificationReport",
    "ConfusionMatrixImage",
    "HyperparametersText",
    "SelectionMapImages",
    "SelectionMapWriter",
    "confusion_matrix",
    "write_test_results",
    "GradientNormClipping",
    "MacroF1",
    "ProgressBarHandler",
    "QuadraticWeightedKappa",
    "classification_output",
    "distributed",
    "evaluate_checkpoints",
    "load_checkpoint",
    "load_weights",
    "write_training_scalars",
]
