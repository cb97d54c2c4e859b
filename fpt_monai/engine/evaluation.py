"""Evaluate several checkpoints of one network with one evaluator (the bundle's ``evaluate.json``)."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
from monai.engines import Evaluator

from fpt_monai.engine.checkpoint import _allow_missing_backbone_digest, load_checkpoint
from fpt_monai.engine.handlers import ClassificationReport
from fpt_monai.networks.labels import ClassNamesMismatchError, set_class_mapping
from fpt_monai.engine.tensorboard import write_test_results

__all__ = ["evaluate_checkpoints", "load_weights"]

logger = logging.getLogger(__name__)


def load_weights(
    network: nn.Module,
    path: str | os.PathLike,
    allow_missing_backbone_digest: bool = False,
    class_mapping: str = "strict",
) -> nn.Module:
    """Load a trained checkpoint into ``network`` (a DDP wrapper's module too) and return the network.

    The file is read with :func:`~fpt_monai.engine.load_checkpoint` (``torch.load(weights_only=True)``: no
    arbitrary unpickling; errors name the file) and may be a bare state dict or a training checkpoint holding
    one under ``"model"``.

    The checkpoint's class names are checked against the network's (the config's ``class_names``, bound to the
    network when it is built; see :mod:`fpt_monai.networks.labels`) before any weight is copied. A checkpoint
    without class names (written before they were stored) loads with one warning that they cannot be checked.

    Args:
        network: the network the checkpoint belongs to.
        path: the checkpoint file.
        allow_missing_backbone_digest: accept an FPT checkpoint without the frozen backbone's digest
            (``backbone_sha256``), vouching that it was trained with this network's backbone.
        class_mapping: ``"strict"`` (default): refuse a checkpoint whose class names differ from the network's in
            any way, order included. ``"by_name"``: accept the same names in another order and reorder the
            network's outputs to its own (the config's) class order; other names are still refused.

    Raises:
        FileNotFoundError: no such file (the message says how a bundle gets its ``models/model.pt``).
        ValueError: the checkpoint does not fit the network (another class count, preset or backbone), naming the
            file and the first mismatches; :class:`~fpt_monai.networks.ClassNamesMismatchError` (a
            ``ValueError``) when its class names differ, naming the file and showing both lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: train the bundle first, or fetch a published one with "
            "`python -m monai.bundle download_large_files --bundle_path <bundle>`."
        )
    state = load_checkpoint(path)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    target = network.module if hasattr(network, "module") else network
    set_class_mapping(target, class_mapping)
    if allow_missing_backbone_digest:
        _allow_missing_backbone_digest({"model": target})
    try:
        target.load_state_dict(state)
    except ClassNamesMismatchError as err:
        raise ClassNamesMismatchError(f"checkpoint {path} does not fit this network: {err}") from err
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:4]) or str(err)
        raise ValueError(
            f"checkpoint {path} does not fit this network (another num_classes, preset or backbone?): {details}"
        ) from err
    return network


def evaluate_checkpoints(
    evaluator: Evaluator,
    network: nn.Module,
    checkpoints: Mapping[str, str | os.PathLike],
    report: ClassificationReport,
    output_dir: str | os.PathLike,
    allow_missing_backbone_digest: bool = False,
    class_mapping: str = "strict",
    log_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """Load each checkpoint into ``network``, run ``evaluator`` and write its report to ``output_dir/<name>/``.

    Checkpoints are read with :func:`~fpt_monai.engine.load_checkpoint` (``torch.load(weights_only=True)``: no
    arbitrary unpickling; errors name the file) and may be a bare state dict or a training checkpoint holding
    one under ``"model"``.

    Args:
        evaluator: a MONAI evaluator over the test data whose network is ``network``, with ``report`` attached.
        network: the network the checkpoints belong to.
        checkpoints: name -> checkpoint file, e.g. ``{"best": "models/model.pt", "final": ...}``; a missing
            file raises ``FileNotFoundError`` naming it.
        report: the :class:`ClassificationReport` attached to ``evaluator``.
        output_dir: parent folder of the per-checkpoint reports.
        allow_missing_backbone_digest: accept FPT checkpoints without the frozen backbone's digest
            (``backbone_sha256``), vouching that they were trained with this network's backbone.
        class_mapping: what a checkpoint's class names may differ in (see :func:`load_weights`).
        log_dir: TensorBoard folder for each checkpoint's metrics (scalars ``test/<name>/<metric>``, e.g.
            ``test/best/auc``) and confusion matrix (picture ``test/<name>/confusion_matrix``); ``None`` writes
            none (pass ``None`` on ranks other than 0).

    Returns:
        name -> the evaluator's scalar metrics.
    """
    missing = {name: str(path) for name, path in checkpoints.items() if not Path(path).is_file()}
    if missing:
        raise FileNotFoundError(f"checkpoint files not found: {missing}; train first or set the paths.")
    results = {}
    for name, path in checkpoints.items():
        load_weights(network, path, allow_missing_backbone_digest, class_mapping)
        report.output_dir = Path(output_dir) / name
        report.extra = {"checkpoint": str(Path(path).resolve()), "checkpoint_name": name}
        evaluator.run()
        results[name] = {
            key: float(value)
            for key, value in evaluator.state.metrics.items()
            # numbers.Real: numpy scalars too (MONAI's ROCAUC gives a numpy.float32, not a float)
            if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        }
        logger.info("%s checkpoint (%s): %s", name, path, _format(results[name]))
        if log_dir is not None:
            write_test_results(log_dir, name, results[name], report.confusion, report.class_names)
    return results


def _format(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
