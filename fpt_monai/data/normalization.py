"""The frozen backbone's input normalisation: the backbone's statistics, numbers given, or the data set's own.

The FPT authors normalise the backbone's input with the data set's per-channel mean and standard deviation,
computed on the train split. ``mean``/``std`` of the bundle accept ``"dataset"`` for that (the default stays the
backbone's statistics). :class:`InputNormalization` resolves them:

- ``"dataset"`` statistics are those of the train split's images as the pipeline reads them (RGB in [0, 1]) at the
  backbone's input size (resized as the pipeline resizes them), over every pixel of every image: mean and
  population standard deviation per channel (:func:`dataset_statistics`, accumulated in float64). They are
  computed once: a JSON file in the cache folder, named by the digests of the images' contents, the size and the
  reader's options, holds them for later runs.
- They enter the preloading cache's fingerprint as the normalisation transform's parameters (other statistics,
  other cache entries), and the log shows them.
- Given a network, they are recorded in its state dict (a ``input_normalization`` buffer of shape ``(2, C)``:
  mean, std), so the checkpoint says how its inputs were normalised; a load pre-hook refuses a checkpoint whose
  recorded statistics differ from the network's (or that has none when the network has them), naming both.
  Evaluation (``evaluate.json``) reads the statistics back from the checkpoint it evaluates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.transforms import Compose, EnsureTyped, Resized

from fpt_monai.data.readers import LoadImageRGBd
from fpt_monai.engine.checkpoint import load_checkpoint
from fpt_monai.utils import atomic_write, escape_path, file_digest

__all__ = ["DATASET", "NORMALIZATION_KEY", "InputNormalization", "bind_normalization", "dataset_statistics"]

logger = logging.getLogger(__name__)

#: The value of ``mean``/``std`` that asks for the train split's own statistics.
DATASET = "dataset"
#: State-dict key (and buffer name) of the recorded statistics: a float32 ``(2, C)`` tensor, mean then std.
NORMALIZATION_KEY = "input_normalization"
#: Bump when the way the statistics are computed changes: older saved statistics are then computed again.
_STATISTICS_VERSION = 1


def _size(img_size: int | Sequence[int]) -> tuple[int, int]:
    return (int(img_size), int(img_size)) if isinstance(img_size, (int, float)) else tuple(int(s) for s in img_size)


def dataset_statistics(
    datalist: Sequence[Mapping[str, Any]],
    img_size: int | Sequence[int],
    reader: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_key: str = "image",
) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of the images of ``datalist`` at ``img_size``.

    Each image is read as the pipeline reads it (:class:`~fpt_monai.data.LoadImageRGBd` with the ``reader``
    options: RGB in [0, 1]) and resized as the pipeline resizes it (bilinear, antialiased); sums and sums of squares
    are accumulated in float64 over every pixel. With ``cache_dir`` the result is saved there
    (``normalization/<digest>.json``, the digest of the images' contents, the size and the reader's options) and
    read back by later calls.
    """
    if not datalist:
        raise ValueError("dataset normalisation needs the train split's images, and the train split is empty.")
    size = _size(img_size)
    reader = dict(reader or {})
    paths = [os.fspath(item[image_key]) for item in datalist]
    identity = {
        "version": _STATISTICS_VERSION,
        "size": size,
        "reader": reader,
        "images": sorted(file_digest(path) for path in paths),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    saved = Path(cache_dir) / "normalization" / f"{digest}.json" if cache_dir is not None else None
    if saved is not None and saved.is_file():
        content = json.loads(saved.read_text(encoding="utf-8"))
        logger.info("dataset statistics of %d images read from %s.", len(paths), escape_path(saved))
        return content["mean"], content["std"]
    load = Compose(
        [
            LoadImageRGBd(image_key, **reader),
            EnsureTyped(image_key, data_type="tensor", dtype=torch.float32, track_meta=False),
            Resized(image_key, spatial_size=size, mode="bilinear", anti_aliasing=True),
        ]
    )
    total = squares = None
    count = 0
    for path in paths:
        image = load({image_key: path})[image_key].to(torch.float64).flatten(1)
        total = image.sum(1) if total is None else total + image.sum(1)
        squares = (image * image).sum(1) if squares is None else squares + (image * image).sum(1)
        count += image.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    result = [float(m) for m in mean], [float(s) for s in std]
    if any(s <= 0 for s in result[1]):
        raise ValueError(f"dataset normalisation: a channel of the train split's images is constant (std {result[1]}).")
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(saved, "w", what="dataset statistics", encoding="utf-8") as f:
            json.dump({"mean": result[0], "std": result[1], "images": len(paths), **identity}, f)
    return result


def _recorded(state_dict: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    tensor = state_dict.get(NORMALIZATION_KEY)
    if tensor is None:
        return None
    values = tensor.detach().to("cpu", torch.float64)
    return values[0].tolist(), values[1].tolist()


def _check_normalization(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    """Load pre-hook: the checkpoint's recorded statistics must be the network's (see the module docstring)."""
    key = prefix + NORMALIZATION_KEY
    ours = module._buffers.get(NORMALIZATION_KEY)
    theirs = state_dict.get(key)
    if theirs is None and ours is None:
        return
    if theirs is not None and ours is not None and torch.allclose(theirs.cpu().double(), ours.cpu().double()):
        return
    shown = {
        "checkpoint": _recorded({NORMALIZATION_KEY: theirs}) if theirs is not None else "the backbone's statistics",
        "network": _recorded({NORMALIZATION_KEY: ours}) if ours is not None else "the backbone's statistics",
    }
    raise ValueError(
        f"the checkpoint's inputs were normalised with mean/std {shown['checkpoint']}, but this network's inputs are "
        f"normalised with {shown['network']}: run with the same mean and std as the training run "
        f"(--mean {DATASET} --std {DATASET} for the data set's statistics)."
    )


def bind_normalization(module: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """Record the input statistics in ``module``'s state dict (``None``: the backbone's, nothing recorded) and
    check a loaded checkpoint's against them (a load pre-hook, registered once)."""
    if not getattr(module, "_normalization_bound", False):
        module.register_load_state_dict_pre_hook(_check_normalization)
        module._normalization_bound = True
    if mean is None:
        module._buffers.pop(NORMALIZATION_KEY, None)
        return module
    reference = next(iter(module.parameters()), None)
    device = reference.device if reference is not None else None
    tensor = torch.tensor([list(mean), list(std)], dtype=torch.float32, device=device)
    module.register_buffer(NORMALIZATION_KEY, tensor)
    return module


def _statistics_of_checkpoint(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    content = load_checkpoint(path)
    state = content.get("model", content) if isinstance(content, Mapping) else {}
    found = _recorded(state) if isinstance(state, Mapping) else None
    if found is None:
        raise ValueError(
            f"mean/std are {DATASET!r}, but the checkpoint {escape_path(path)} records no dataset statistics: it was "
            f"trained with the backbone's (leave mean and std at their defaults)."
        )
    return found


class InputNormalization:
    """The mean and std that normalise the backbone's input (``.mean``, ``.std``: lists of floats per channel).

    Args:
        mean: per-channel values, or ``"dataset"``.
        std: per-channel values, or ``"dataset"``.
        datalist: the train split (for ``"dataset"``); ``None`` reads the statistics from ``checkpoint``.
        img_size: the backbone's input size.
        reader: the pipeline's reader options.
        cache_dir: where computed statistics are kept (computed once).
        network: given, the statistics are recorded in its state dict and checked when it loads a checkpoint.
        checkpoint: the checkpoint to read ``"dataset"`` statistics from when no ``datalist`` is given.
        conventions: ``"authors"`` (see :mod:`fpt_monai.conventions`) takes the data set's statistics,
            whatever ``mean`` and ``std`` say.
    """

    def __init__(
        self,
        mean: Sequence[float] | str,
        std: Sequence[float] | str,
        datalist: Sequence[Mapping[str, Any]] | None = None,
        img_size: int | Sequence[int] | None = None,
        reader: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        network: nn.Module | None = None,
        checkpoint: str | os.PathLike | None = None,
        conventions: str = "default",
    ) -> None:
        if conventions == "authors":  # the authors normalise with the data set's statistics
            mean, std = DATASET, DATASET
        for name, value in (("mean", mean), ("std", std)):
            if isinstance(value, str) and value != DATASET:
                raise ValueError(f"{name} must be a list of per-channel values or {DATASET!r}, got {value!r}.")
        #: whether the statistics are the data set's (then recorded in ``network``'s state dict)
        self.from_dataset = mean == DATASET or std == DATASET
        if self.from_dataset:
            if datalist is not None:
                if img_size is None:
                    raise ValueError("dataset normalisation needs img_size (the backbone's input size).")
                found = dataset_statistics(datalist, img_size, reader, cache_dir)
                source = f"the train split's statistics ({len(datalist)} images at {_size(img_size)} px)"
            elif checkpoint is not None:
                found = _statistics_of_checkpoint(checkpoint)
                source = f"the statistics recorded in {escape_path(checkpoint)}"
            else:
                raise ValueError(f"mean/std {DATASET!r} need the train split (datalist) or a checkpoint.")
            mean = found[0] if mean == DATASET else mean
            std = found[1] if std == DATASET else std
        else:
            source = "given (the backbone's by default)"
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != len(self.std) or not all(math.isfinite(v) for v in self.mean + self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must be finite, one value per channel each.")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive per channel, got {self.std}.")
        logger.info(
            "input normalisation: mean %s, std %s: %s.",
            [round(m, 4) for m in self.mean],
            [round(s, 4) for s in self.std],
            source,
        )
        if network is not None:
            bind_normalization(network, *((self.mean, self.std) if self.from_dataset else (None, None)))
