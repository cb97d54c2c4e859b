"""TensorBoard pictures and text of a run, beyond MONAI's scalar handlers, and the inference selection-map PNGs.

- :class:`SelectionMapImages`: at each validation, a few validation images with the side view the side network
  reads and the map of the high-resolution patches the frozen backbone's token selection kept
  (:meth:`~fpt_monai.networks.FrozenBackbone.selection_map`), plus the network's current prediction for them;
- :class:`ConfusionMatrixImage`: the confusion matrix of each validation as a picture;
- :class:`HyperparametersText`: the run's settings, as text and in TensorBoard's HPARAMS tab;
- :func:`write_test_results`: an evaluation's test metrics and confusion matrix per checkpoint;
- :class:`SelectionMapWriter`: one selection-map PNG per image at inference.

Pictures are drawn by :mod:`fpt_monai.visualize` and written with MONAI's ``plot_2d_or_3d_image``, to the same
folder as MONAI's ``TensorBoardStatsHandler`` scalars (MONAI's ``TensorBoardImageHandler`` draws a batch's first
image, label and output, a segmentation layout; ignite's ``TensorboardLogger`` would be a second writer stack
beside MONAI's, so neither is used). Writers are created on first use, on rank 0 only: the handlers can be
attached on every rank of a distributed run (the confusion matrix sums all ranks' counts) without other ranks
writing event files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.utils import CommonKeys
from monai.visualize import plot_2d_or_3d_image
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from fpt_monai.engine.metrics import classification_output, confusion_matrix
from fpt_monai.networks.backbones import FrozenBackbone
from fpt_monai.networks.fpt import make_side_view
from fpt_monai.visualize import confusion_matrix_image, display_image, save_png, selection_overlay, unique_png_names

__all__ = [
    "ConfusionMatrixImage",
    "HyperparametersText",
    "SelectionMapImages",
    "SelectionMapWriter",
    "write_test_results",
]

logger = logging.getLogger(__name__)


def _summary_writer(log_dir: str | os.PathLike):
    return SummaryWriter(log_dir=str(log_dir))


def _add_picture(writer, picture: np.ndarray, tag: str, step: int) -> None:
    """An (H, W, 3) uint8 picture as one TensorBoard image (MONAI's writer; it appends ``_CHW`` to the tag)."""
    plot_2d_or_3d_image(np.moveaxis(picture, -1, 0)[None], step, writer, max_channels=3, tag=tag)


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _frozen_backbone(network: nn.Module):
    network = network.module if hasattr(network, "module") else network
    backbone = getattr(network, "backbone", None)
    if not isinstance(backbone, FrozenBackbone):
        raise TypeError(
            f"selection maps need an FPT network with a frozen backbone; {type(network).__name__} has none "
            "(baselines select no tokens: set `selection_map_images` to 0 / `selection_maps` to false)."
        )
    return network, backbone


class SelectionMapImages:
    """At each validation, log a few validation images with what FPT's frozen backbone selected in them.

    Per image ``i`` (the first ``num_images`` of ``data``, the same ones every time), TensorBoard gets
    ``<tag>/selection_map/<i>``: the high-resolution image with the fraction of (extracted block, head) pairs
    that kept each patch painted over it (:func:`~fpt_monai.visualize.selection_overlay`), and
    ``<tag>/side_view/<i>``: the low-resolution view the side network reads; and, as text, ``<tag>/predictions``:
    each image's label and the network's current prediction. The backbone is frozen, so its selection (and the
    keys/values the prediction needs) is computed once, by one backbone pass over these images at the first
    validation; later validations only rerun the small trainable part. Volumes (3D) are not drawn: the handler
    logs that once and does nothing.

    Attach to the validation evaluator (its ``state.epoch`` is the trainer's epoch, the TensorBoard step).

    Args:
        network: the FPT network being trained (:class:`~fpt_monai.networks.FPTNet`).
        data: the validation datalist (dicts with ``image`` and ``label``).
        transform: item -> item whose ``image`` is the high-resolution image normalised as the backbone's
            input (C, *img_size): the validation preprocessing up to the K/V transform.
        num_images: how many images to log; 0 logs nothing.
        class_names: class names, to name labels and predictions.
        log_dir: TensorBoard folder (used when ``summary_writer`` is ``None``).
        summary_writer: a TensorBoard ``SummaryWriter`` to write with.
        tag: prefix of the tags.
    """

    def __init__(
        self,
        network: nn.Module,
        data: Sequence[Mapping],
        transform: Callable,
        num_images: int = 4,
        class_names: Sequence[str] | None = None,
        log_dir: str | os.PathLike = "./runs",
        summary_writer: Any = None,
        tag: str = "val",
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be at least 0, got {num_images}.")
        self.network, self.backbone = _frozen_backbone(network)
        self.data = list(data)[: int(num_images)]
        self.transform = transform
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.log_dir = log_dir
        self.writer = summary_writer
        self.tag = tag
        self._prepared: dict | None = None

    def attach(self, engine: Engine) -> None:
        if self.data:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _prepare(self) -> dict | None:
        items = [self.transform(dict(item)) for item in self.data]
        images = torch.stack([torch.as_tensor(item[CommonKeys.IMAGE]).as_subclass(torch.Tensor) for item in items])
        if images.ndim != 4:
            logger.info("selection maps are drawn for 2D images only; %dD inputs are not logged.", images.ndim - 2)
            return None
        images = images.float().to(_device(self.backbone))
        with torch.no_grad():
            maps = self.backbone.selection_map(images)
            kv = self.backbone(images)
        side = make_side_view(images, self.network.side_img_size)
        return {
            "overlays": [selection_overlay(image, m) for image, m in zip(images, maps)],
            "sides": [display_image(s) for s in side],
            "side": side,
            "kv": kv,
            "labels": [item.get(CommonKeys.LABEL) for item in self.data],
            "names": [Path(str(item[CommonKeys.IMAGE])).name for item in self.data],
        }

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self._prepared is None:
            self._prepared = self._prepare() or {}
        if not self._prepared:
            return
        if self.writer is None:
            self.writer = _summary_writer(self.log_dir)
        step = engine.state.epoch
        p = self._prepared
        for i, (overlay, side) in enumerate(zip(p["overlays"], p["sides"])):
            _add_picture(self.writer, overlay, f"{self.tag}/selection_map/{i}", step)
            _add_picture(self.writer, side, f"{self.tag}/side_view/{i}", step)
        training = self.network.training
        self.network.eval()
        with torch.no_grad():
            probabilities = self.network(p["side"], kv=p["kv"]).float().softmax(dim=1).cpu()
        self.network.train(training)
        rows = ["| image | file | label | predicted | probability |", "|---|---|---|---|---|"]
        for i, (name, label, prob) in enumerate(zip(p["names"], p["labels"], probabilities)):
            predicted = int(prob.argmax())
            rows.append(f"| {i} | {name} | {self._name(label)} | {self._name(predicted)} | {float(prob.max()):.3f} |")
        self.writer.add_text(f"{self.tag}/predictions", "\n".join(rows), step)
        self.writer.flush()

    def _name(self, label: Any) -> str:
        if label is None:
            return "-"
        index = int(torch.as_tensor(label).reshape(-1).argmax() if torch.as_tensor(label).numel() > 1 else label)
        return self.class_names[index] if self.class_names and 0 <= index < len(self.class_names) else str(index)


class ConfusionMatrixImage:
    """The confusion matrix of each run of an evaluator as a TensorBoard picture (``<tag>_CHW``).

    Counts are summed over all ranks of a distributed run; rank 0 writes. Attach on every rank.

    Args:
        class_names: class names in label order.
        log_dir: TensorBoard folder (used when ``summary_writer`` is ``None``).
        summary_writer: a TensorBoard ``SummaryWriter`` to write with.
        tag: the picture's tag.
        output_transform: engine output -> (scores (B, C), labels (B,)); default :func:`classification_output`.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        log_dir: str | os.PathLike = "./runs",
        summary_writer: Any = None,
        tag: str = "val_confusion_matrix",
        output_transform: Callable = classification_output,
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        self.log_dir = log_dir
        self.writer = summary_writer
        self.tag = tag
        self.output_transform = output_transform
        self.counts = torch.zeros(len(self.class_names), len(self.class_names), dtype=torch.long)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.counts.zero_()

    def _collect(self, engine: Engine) -> None:
        scores, labels = self.output_transform(engine.state.output)
        self.counts += confusion_matrix(labels, scores.argmax(dim=1), len(self.class_names))

    def __call__(self, engine: Engine) -> None:
        counts = self.counts
        if idist.get_world_size() > 1:
            counts = idist.all_reduce(counts.clone().to(idist.device())).cpu()
        if idist.get_rank() != 0:
            return
        if self.writer is None:
            self.writer = _summary_writer(self.log_dir)
        _add_picture(self.writer, confusion_matrix_image(counts, self.class_names), self.tag, engine.state.epoch)
        self.writer.flush()


class HyperparametersText:
    """Write a run's settings once, when the trainer starts: as a markdown table (``hparams`` text) and in
    TensorBoard's HPARAMS tab (``metrics`` name the scalars it shows beside them). Rank 0 only.

    Args:
        hparams: name -> value; values other than numbers, strings and booleans are written as text.
        log_dir: TensorBoard folder (used when ``summary_writer`` is ``None``).
        summary_writer: a TensorBoard ``SummaryWriter`` to write with.
        metrics: names of scalar tags to show in the HPARAMS tab.
    """

    def __init__(
        self,
        hparams: Mapping[str, Any],
        log_dir: str | os.PathLike = "./runs",
        summary_writer: Any = None,
        metrics: Sequence[str] = (),
    ) -> None:
        self.hparams = {str(k): v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        self.log_dir = log_dir
        self.writer = summary_writer
        self.metrics = list(metrics)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self.writer is None:
            self.writer = _summary_writer(self.log_dir)
        table = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in self.hparams.items()]
        self.writer.add_text("hparams", "\n".join(table), engine.state.iteration)
        for summary in hparams_summaries(self.hparams, {name: 0.0 for name in self.metrics}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


def write_test_results(
    log_dir: str | os.PathLike,
    name: str,
    metrics: Mapping[str, float],
    confusion: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    prefix: str = "test_",
) -> None:
    """Write one checkpoint's test metrics as scalars ``test/<name>/<metric>`` (``test_auc`` -> ``auc``) and its
    confusion matrix as the picture ``test/<name>/confusion_matrix``, at step 0."""
    writer = _summary_writer(log_dir)
    try:
        for key, value in metrics.items():
            metric = key[len(prefix) :] if key.startswith(prefix) else key
            writer.add_scalar(f"test/{name}/{metric}", float(value), 0)
        if confusion is not None and class_names is not None:
            _add_picture(writer, confusion_matrix_image(confusion, class_names), f"test/{name}/confusion_matrix", 0)
    finally:
        writer.close()


class SelectionMapWriter:
    """At inference, write one selection-map PNG per image: ``<output_dir>/<name>.png``.

    Each PNG is the network's high-resolution input with the fraction of (extracted block, head) pairs of the
    frozen backbone that kept each patch painted over it (:func:`~fpt_monai.visualize.selection_overlay`). It
    costs one more pass of the backbone per batch. Names come from :func:`~fpt_monai.visualize.unique_png_names`
    over ``data``: the image's stem, with a hash of its path appended when two inputs share a stem.

    Args:
        network: the FPT network (:class:`~fpt_monai.networks.FPTNet`).
        output_dir: folder of the PNGs (created).
        data: the inference datalist (dicts with ``image``: the file), to name the PNGs.
        image_key: batch key of the network's (normalised, high-resolution) input.
        filename_key: batch key of the image file name (else the image's metadata names it).
    """

    def __init__(
        self,
        network: nn.Module,
        output_dir: str | os.PathLike,
        data: Sequence[Mapping],
        image_key: str = CommonKeys.IMAGE,
        filename_key: str = "filename",
    ) -> None:
        self.network, self.backbone = _frozen_backbone(network)
        self.output_dir = Path(output_dir)
        self.names = unique_png_names(str(item[image_key]) for item in data)
        self.image_key = image_key
        self.filename_key = filename_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        items = engine.state.batch
        items = items if isinstance(items, list) else decollate_batch(items)
        images = torch.stack([torch.as_tensor(item[self.image_key]).as_subclass(torch.Tensor) for item in items])
        if images.ndim != 4:
            raise ValueError("selection-map PNGs are drawn for 2D images only; set `selection_maps` to false.")
        maps = self.backbone.selection_map(images.float().to(_device(self.backbone)))
        for item, image, selection in zip(items, images, maps):
            filename = str(item.get(self.filename_key) or item[self.image_key].meta["filename_or_obj"])
            name = self.names.get(filename) or unique_png_names([filename])[filename]
            save_png(selection_overlay(image, selection), self.output_dir / name)
