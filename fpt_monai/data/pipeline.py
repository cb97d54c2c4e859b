"""The FPT data pipeline: datalist -> (cached) keys/values + side view + label, for training or evaluation.

The transform chains are the packaged bundle's (``configs/train.json``, ``inference.json``, ``baseline.json``,
written out as ``_target_`` lists): the functions here parse those lists with the caller's settings as overrides,
so that the Python API, ``fpt-monai preload`` and the bundle run the same transforms and fill and read the same
K/V cache entries.

High-resolution view (never augmented): read, RGB, resize to the backbone's ``img_size``, scale to [0, 1],
normalise -> :class:`~fpt_monai.preload.FrozenBackboneKVd` (cached by :class:`~fpt_monai.preload.KVCacheDataset`).
Before normalising, :class:`~fpt_monai.data.SideSourced` keeps a float16 copy of that view at 1.5 times the side
network's input size under ``image`` (cached with the keys/values).
Side view for training: made from that copy (the image file is not read again), with the augmentation of the papers
(random resized crop with scale 0.8-1 and ratio 0.7-1.3, horizontal flip p=0.5, brightness/contrast jitter 0.2)
before normalising. Side view for evaluation: the image read again from its file (``filename``), normalised and
resized to the side network's input size as ``FPTNet`` does, so that an evaluation from the cache gives the
logits of the network run on the image itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from monai.bundle import ConfigParser
from monai.data import Dataset
from monai.transforms import Compose
from monai.utils import ensure_tuple_rep

from fpt_monai.data.normalization import InputNormalization
from fpt_monai.networks.backbones import FrozenBackbone
from fpt_monai.preload import FrozenBackboneKVd, KVCacheDataset
from fpt_monai.utils import config_files

__all__ = ["bundle_transforms", "fpt_transforms", "image_transforms", "inference_transforms", "make_fpt_dataset"]

#: The ``_target_`` of the K/V transform in the bundle's ``train#deterministic_transforms`` (the cached part ends there).
KV_TARGET = "fpt_monai.preload.FrozenBackboneKVd"


def bundle_transforms(
    configs: Sequence[str],
    key: str,
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    reader: Mapping[str, Any] | None = None,
    backbone: FrozenBackbone | None = None,
    **overrides: Any,
) -> list:
    """The transform list ``key`` of the packaged bundle's ``configs`` (merged in order), for these settings.

    The settings override the configs' own: ``img_size`` (an int is the same size on both axes), the
    normalisation (``mean``/``std``, as :class:`~fpt_monai.data.InputNormalization` gives them to the bundle),
    ``reader`` (entries of the bundle's ``image_reader``) and any further config key in ``overrides`` (e.g.
    ``side_img_size``, ``kv_dtype``, ``side_source``). Without a ``backbone`` the K/V transform is left out of
    ``train#deterministic_transforms``: the high-resolution view stays in the item.

    Raises:
        ValueError: ``reader`` names an option the bundle's ``image_reader`` does not have.
    """
    parser = ConfigParser()
    parser.read_config(config_files(*configs))
    image_reader = dict(parser["image_reader"])
    unknown = sorted(set(reader or {}) - set(image_reader))
    if unknown:
        raise ValueError(f"unknown reader option(s) {unknown}; the bundle's image_reader has {sorted(image_reader)}.")
    normalization = InputNormalization(mean, std)
    parser.update(
        {
            "img_size": ensure_tuple_rep(img_size, 2),
            "mean": normalization.mean,
            "std": normalization.std,
            "normalization": normalization,
            "image_reader": {**image_reader, **dict(reader or {})},
            "backbone": backbone,
            **overrides,
        }
    )
    deterministic = parser.get("train#deterministic_transforms")
    if backbone is None and deterministic is not None:
        parser["train#deterministic_transforms"] = [t for t in deterministic if t.get("_target_") != KV_TARGET]
    return list(parser.get_parsed_content(key))


def fpt_transforms(
    img_size: Sequence[int] | int,
    side_img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    backbone: FrozenBackbone | None = None,
    kv_dtype: str = "float16",
    reader: Mapping[str, Any] | None = None,
    side_source: bool = True,
) -> list:
    """The two-view transform chain of FPT: the bundle's ``train#preprocessing`` or ``validate#preprocessing``.

    With a ``backbone``, the high-resolution view becomes keys/values under ``"kv"`` (and is dropped); without
    one it stays under ``"high_res"`` for a network that runs the backbone itself (the online path).
    The side view ends under ``"image"``: for training made from the small copy of the high-resolution view that
    :class:`~fpt_monai.data.SideSourced` keeps there, for evaluation read again from the file; the source path
    travels with the item as ``"filename"`` (for per-image reports). ``reader``: options of the image reading
    (the bundle's ``image_reader``: volume slice, DICOM window, value range, pixel limit). ``side_source``: whether
    the copy is made with the keys/values (and cached with them, 677,376 bytes per image for the ``fpt`` preset)
    or, for training, from the image file read again for every side view: the same side views, a smaller cache,
    more work per image in every epoch.
    """
    settings = dict(side_img_size=side_img_size, kv_dtype=kv_dtype, side_source=bool(side_source))
    key = "train#preprocessing#transforms" if train else "validate#preprocessing#transforms"
    return bundle_transforms(["train"], key, img_size, mean, std, reader, backbone, **settings)


def inference_transforms(
    img_size: Sequence[int] | int, mean: Sequence[float], std: Sequence[float], reader: Mapping[str, Any] | None = None
) -> list:
    """The transforms for a network that runs its backbone itself (``FPTNet.forward(images)``, an export): the
    bundle's ``inference.json`` ``preprocessing``.

    Only the high-resolution view under ``"image"`` (the network makes its side view); the source path is kept as
    ``"filename"``.
    """
    return bundle_transforms(["inference"], "preprocessing#transforms", img_size, mean, std, reader)


def image_transforms(
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    reader: Mapping[str, Any] | None = None,
) -> list:
    """One high-resolution view for the networks that take the image itself (the baselines): the bundle's
    ``baseline.json`` chains.

    For training, the same augmentation as FPT's side view (random resized crop with scale 0.8-1 and ratio
    0.7-1.3, horizontal flip p=0.5, brightness/contrast jitter 0.2), at the backbone's resolution.
    """
    key = "train#preprocessing#transforms" if train else "validate#preprocessing#transforms"
    return bundle_transforms(["train", "baseline"], key, img_size, mean, std, reader)


def make_fpt_dataset(
    datalist: Sequence[dict],
    *chain_args: Any,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **chain_kwargs: Any,
) -> Dataset:
    """A MONAI dataset of FPT items; with a ``backbone`` and ``cache_dir``, a preloading :class:`KVCacheDataset`.

    ``chain_args``, ``chain_kwargs``: the arguments of :func:`fpt_transforms` (``img_size, side_img_size, mean,
    std, train``, and ``backbone``, ``kv_dtype``, ``reader``, ``side_source``).
    """
    transforms = fpt_transforms(*chain_args, **chain_kwargs)
    if cache_dir is None:
        return Dataset(list(datalist), Compose(transforms))
    if not any(isinstance(t, FrozenBackboneKVd) for t in transforms):
        raise ValueError("a K/V cache needs the backbone that fills it.")
    return KVCacheDataset(list(datalist), transforms, cache_dir, progress=progress)
