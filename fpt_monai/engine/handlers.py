"""Handlers the bundle needs beyond MONAI's and ignite's own: gradient clipping, a progress bar, TensorBoard
scalars of training (loss, learning rate, gradient norm) and the per-image report of an evaluation."""

from __future__ import annotations

import csv
import json
import logging
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.data import decollate_batch
from monai.engines import IterationEvents
from monai.utils import CommonKeys

from fpt_monai.engine.metrics import classification_output, confusion_matrix
from fpt_monai.networks.labels import class_names_of
from fpt_monai.utils import atomic_write, escape_path

__all__ = ["GradientNormClipping", "ProgressBarHandler", "write_training_scalars", "ClassificationReport"]

logger = logging.getLogger(__name__)


class GradientNormClipping:
    """Clip the global gradient norm of the trained parameters after each backward pass (before the step).

    Attach to a MONAI ``SupervisedTrainer``: it runs on ``IterationEvents.BACKWARD_COMPLETED``, unscales the
    gradients first under AMP, and leaves the norm before clipping in ``engine.state.grad_norm`` (for logging) and
    the iteration it belongs to in ``engine.state.grad_norm_iteration``.

    Args:
        max_norm: the largest allowed norm (1.0 in the FPT papers).
        norm_type: the p of the p-norm.
    """

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}.")
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        engine.state.grad_norm = float(norm)
        engine.state.grad_norm_iteration = engine.state.iteration


class ProgressBarHandler:
    """ignite's tqdm progress bar, attachable from a bundle config (MONAI calls ``attach(engine)`` only).

    Args:
        show_loss: show the running training loss (trainers) in the bar.
        persist: keep the bar of each finished epoch on screen.
    """

    def __init__(self, show_loss: bool = True, persist: bool = False) -> None:
        self.show_loss = show_loss
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        bar = ProgressBar(persist=self.persist)
        transform = (lambda output: {"loss": _loss(output)}) if self.show_loss else None
        bar.attach(engine, output_transform=transform)


def _loss(output: Any) -> float:
    item = output[0] if isinstance(output, (list, tuple)) else output
    loss = item[CommonKeys.LOSS]
    # the step's loss still holds its graph: reading it must not convert a tensor that requires grad
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def write_training_scalars(engine: Engine, writer) -> None:
    """TensorBoard writer of a trainer's iteration: loss, learning rate (per parameter group) and gradient norm.

    Use as ``iteration_event_writer`` of MONAI's ``TensorBoardStatsHandler``.
    """
    step = engine.state.iteration
    writer.add_scalar("train_loss", _loss(engine.state.output), step)
    groups = engine.optimizer.param_groups
    for index, group in enumerate(groups):
        writer.add_scalar("learning_rate" if len(groups) == 1 else f"learning_rate/{index}", group["lr"], step)
    if getattr(engine.state, "grad_norm", None) is not None:
        writer.add_scalar("grad_norm", engine.state.grad_norm, step)
    writer.flush()


def _filename(item: dict, image_key: str) -> str:
    """The image file of an item: its ``"filename"`` key, else the image's metadata."""
    if isinstance(item.get("filename"), str):
        return item["filename"]
    image = item.get(image_key)
    meta = getattr(image, "meta", None) or item.get(f"{image_key}_meta_dict") or {}
    name = meta.get("filename_or_obj", "")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


class ClassificationReport:
    """Write what an evaluation or inference run saw, image by image, when it completes.

    Files in ``output_dir``: ``predictions.csv`` (filename, label when known, predicted class, one probability
    per class); with labels, ``confusion_matrix.csv`` (rows: true class, columns: predicted) and
    ``metrics.json`` (every scalar metric of the engine, the confusion matrix, class names, image count, and
    ``extra`` such as the checkpoint evaluated). Files are written to a temporary name and renamed, so a
    crash never leaves a half-written report. Only rank 0 writes; per-image rows are gathered from all ranks.
    File names are written as :func:`~fpt_monai.utils.escape_path` gives them (one not valid UTF-8: escaped).

    The class names of the report are the network's (those of the checkpoint loaded into it, in output order;
    see :mod:`fpt_monai.networks.labels`) when ``network`` is given and carries names: the names describe what the
    outputs mean, which the checkpoint knows, not the config. ``class_names`` then only has to agree with them.

    Args:
        output_dir: folder of the report (created); may be changed between runs (see ``evaluate_checkpoints``).
        class_names: names of the classes in label order (``None``: the network's).
        image_key: batch key whose metadata names the image file.
        output_transform: engine output -> (probabilities (B, C), labels (B,)); default
            :func:`classification_output`.
        network: the network whose outputs are reported; its class names, read when the report is written,
            name the columns and predictions.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        image_key: str = CommonKeys.IMAGE,
        output_transform: Callable = classification_output,
        network: torch.nn.Module | None = None,
    ) -> None:
        if class_names is None and network is None:
            raise ValueError("ClassificationReport needs class_names or a network that carries them.")
        self.output_dir = Path(output_dir)
        self.network = network
        self.class_names = class_names
        self.image_key = image_key
        self.output_transform = output_transform
        self.extra: dict = {}
        self.confusion: torch.Tensor | None = None  # of the last run with labels (rank 0)
        self._rows: list[dict] = []

    @property
    def class_names(self) -> list[str]:
        """The class names in output order: the network's when it carries them, else the ones given.

        Read from the network when a run starts (after its checkpoint is loaded) and kept for the run."""
        if self._run_class_names is not None:
            return list(self._run_class_names)
        names = class_names_of(self.network) if self.network is not None else None
        if names is None:
            if self._class_names is None:
                raise ValueError("the network carries no class names and none were given to ClassificationReport.")
            return list(self._class_names)
        if self._class_names is not None and names != self._class_names:
            raise ValueError(
                f"the network's (checkpoint's) class names {names} differ from the report's class_names "
                f"{self._class_names}: give the checkpoint's class names."
            )
        return names

    @class_names.setter
    def class_names(self, class_names: Sequence[str] | None) -> None:
        self._class_names = None if class_names is None else [str(c) for c in class_names]
        self._run_class_names = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._rows = []
        self._run_class_names = None
        self._run_class_names = self.class_names
        self.confusion = None

    def _collect(self, engine: Engine) -> None:
        # MONAI engines decollate batch and output into per-item lists by default; accept batched ones too
        output, items = engine.state.output, engine.state.batch
        output = output if isinstance(output, list) else decollate_batch(output)
        items = items if isinstance(items, list) else decollate_batch(items)
        if all(item.get(CommonKeys.LABEL) is not None for item in output):
            probabilities, labels = self.output_transform(output)
        else:
            probabilities = torch.stack([torch.as_tensor(item[CommonKeys.PRED]).float() for item in output])
            labels = None
        for index, item in enumerate(items):
            row = {"filename": _filename(item, self.image_key)}
            if labels is not None:
                row["label"] = int(labels[index])
            row["probabilities"] = [float(p) for p in probabilities[index]]
            self._rows.append(row)

    @property
    def rows(self) -> list[dict]:
        """Per-image rows of the last run (this rank's)."""
        return list(self._rows)

    def _write(self, engine: Engine) -> None:
        rows = self._rows
        if idist.get_world_size() > 1:
            # a list is gathered as one object per rank; interleaving undoes the round-robin split of an
            # unshuffled DistributedSampler, so the rows come in datalist order as in a one-process run
            parts = idist.all_gather(rows)
            rows = [part[i] for i in range(max(map(len, parts))) for part in parts if i < len(part)]
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        n = len(self.class_names)
        header = ["filename"] + (["label"] if rows and "label" in rows[0] else []) + ["prediction"]
        header += [f"probability_{name}" for name in self.class_names]
        table = []
        for row in rows:
            if len(row["probabilities"]) != n:
                raise ValueError(
                    f"the network gives {len(row['probabilities'])} scores for {n} classes {self.class_names}."
                )
            predicted = max(range(n), key=lambda c: row["probabilities"][c])
            line = [escape_path(row["filename"])] + ([self.class_names[row["label"]]] if "label" in row else [])
            table.append(line + [self.class_names[predicted]] + [f"{p:.6f}" for p in row["probabilities"]])
        with atomic_write(
            self.output_dir / "predictions.csv", "w", what="report", fsync=True, newline="", encoding="utf-8"
        ) as f:
            _write_csv(f, header, table)
        if not rows or "label" not in rows[0]:
            logger.info("predictions for %d images written to %s", len(rows), self.output_dir / "predictions.csv")
            return
        confusion = confusion_matrix(
            torch.tensor([row["label"] for row in rows]),
            torch.tensor([max(range(n), key=lambda c: row["probabilities"][c]) for row in rows]),
            n,
        )
        self.confusion = confusion
        with atomic_write(self.output_dir / "confusion_matrix.csv", "w", what="report", fsync=True, newline="") as f:
            _write_csv(
                f,
                ["true \\ predicted", *self.class_names],
                [[name, *confusion[i].tolist()] for i, name in enumerate(self.class_names)],
            )
        metrics = {
            name: float(value)
            for name, value in engine.state.metrics.items()
            # numbers.Real: numpy scalars too (MONAI's ROCAUC gives a numpy.float32, not a float)
            if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
        }
        summary = {
            "metrics": metrics,
            "num_images": len(rows),
            "class_names": self.class_names,
            "confusion_matrix": confusion.tolist(),
            **self.extra,
        }
        with atomic_write(self.output_dir / "metrics.json", "w", what="report", fsync=True) as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        logger.info("evaluation report (%d images) written to %s", len(rows), self.output_dir)


def _write_csv(f, header: list, rows: list) -> None:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
