"""The FPT data pipeline: datalist -> (cached) keys/values + side view + label, for training or evaluation.

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
from collections.abc import Sequence

import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    NormalizeIntensityd,
    RandTorchVisiond,
    TorchVisiond,
)

from fpt_monai.data.transforms import SideSourced, SideViewd, load_and_normalize
from fpt_monai.networks.backbones import FrozenBackbone
from fpt_monai.preload import FrozenBackboneKVd, KVCacheDataset

__all__ = ["fpt_transforms", "image_transforms", "inference_transforms", "make_fpt_dataset"]


def fpt_transforms(
    img_size: Sequence[int] | int,
    side_img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    backbone: FrozenBackbone | None = None,
    kv_dtype: str = "float16",
    image_key: str = "image",
    high_res_key: str = "high_res",
    reader: dict | None = None,
    side_source: bool = True,
) -> list:
    """The two-view transform chain of FPT.

    With a ``backbone``, the high-resolution view becomes keys/values under ``"kv"`` (and is dropped); without
    one it stays under ``high_res_key`` for a network that runs the backbone itself (the online path).
    The side view ends under ``image_key``: for training made from the small copy of the high-resolution view that
    :class:`~fpt_monai.data.SideSourced` keeps there, for evaluation read again from the file. ``reader``: options
    of the image reading (:class:`~fpt_monai.data.readers.LoadImageRGBd`: volume slice, DICOM window, value range).
    ``side_source``: whether the copy is made with the keys/values (and cached with them, 677,376 bytes per
    image for the ``fpt`` preset) or, for training, from the image file read again for every side view: the same
    side views, a smaller cache, more work per image in every epoch.
    """
    # the source path travels with the item (as "filename") for per-image reports. The bundle's
    # train#deterministic_transforms is this same chain: both fill and read the same K/V cache entries.
    *load, normalize = load_and_normalize(high_res_key, img_size, mean, std, reader)
    if not isinstance(normalize, NormalizeIntensityd):
        raise AssertionError("load_and_normalize must end with its normalisation")
    high_res = [
        CopyItemsd(image_key, names=["filename"]),
        CopyItemsd(image_key, names=[high_res_key]),
        *load,
        *([SideSourced(high_res_key, name=image_key, size=side_img_size)] if side_source else []),
        normalize,
    ]
    if backbone is not None:
        high_res.append(FrozenBackboneKVd(high_res_key, backbone, kv_key="kv", dtype=kv_dtype))
    if train:  # from the stored copy: to float32, augment, normalise (torchvision's transforms keep plain tensors)
        size = [side_img_size] * 2 if isinstance(side_img_size, int) else list(side_img_size)
        side = []
        if not side_source:  # the same copy, made from the image file read again (its path is still there)
            *load_side, _ = load_and_normalize(image_key, img_size, mean, std, reader)
            side = [*load_side, SideSourced(image_key, name=image_key, size=side_img_size)]
        side += [
            EnsureTyped(image_key, data_type="tensor", dtype=torch.float32, track_meta=False),
            RandTorchVisiond(image_key, name="RandomResizedCrop", size=size, scale=(0.8, 1.0), ratio=(0.7, 1.3)),
            RandTorchVisiond(image_key, name="RandomHorizontalFlip", p=0.5),
            RandTorchVisiond(image_key, name="ColorJitter", brightness=0.2, contrast=0.2),
            TorchVisiond(image_key, name="Normalize", mean=list(mean), std=list(std)),
        ]
    else:  # the image itself, as the network run on it sees it
        side = [
            DeleteItemsd(image_key),
            CopyItemsd("filename", names=[image_key]),
            *load_and_normalize(image_key, img_size, mean, std, reader),
        ]
    side.append(SideViewd(image_key, side_img_size))
    return [*high_res, *side]


def inference_transforms(
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    image_key: str = "image",
    reader: dict | None = None,
) -> list:
    """The transforms for a network that runs its backbone itself (``FPTNet.forward(images)``, an export).

    Only the high-resolution view (the network makes its side view); the source path is kept as ``"filename"``.
    """
    return [CopyItemsd(image_key, names="filename"), *load_and_normalize(image_key, img_size, mean, std, reader)]


def image_transforms(
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    image_key: str = "image",
    reader: dict | None = None,
) -> list:
    """One high-resolution view for the networks that take the image itself (the baselines of the benchmark).

    For training, the same augmentation as FPT's side view (random resized crop with scale 0.8-1 and ratio
    0.7-1.3, horizontal flip p=0.5, brightness/contrast jitter 0.2), at the backbone's resolution.
    """
    chain = inference_transforms(img_size, mean, std, image_key=image_key, reader=reader)
    if not train:
        return chain
    normalize = chain.pop()  # augment intensities in [0, 1], then normalise
    if not isinstance(normalize, NormalizeIntensityd):
        raise AssertionError("load_and_normalize must end with its normalisation")
    size = [img_size] * 2 if isinstance(img_size, int) else list(img_size)
    return [
        *chain,
        RandTorchVisiond(image_key, name="RandomResizedCrop", size=size, scale=(0.8, 1.0), ratio=(0.7, 1.3)),
        RandTorchVisiond(image_key, name="RandomHorizontalFlip", p=0.5),
        RandTorchVisiond(image_key, name="ColorJitter", brightness=0.2, contrast=0.2),
        normalize,
    ]


def make_fpt_dataset(
    datalist: Sequence[dict],
    img_size: Sequence[int] | int,
    side_img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    backbone: FrozenBackbone | None = None,
    cache_dir: str | os.PathLike | None = None,
    kv_dtype: str = "float16",
    progress: bool = True,
    reader: dict | None = None,
    side_source: bool = True,
) -> Dataset:
    """A MONAI dataset of FPT items; with ``backbone`` and ``cache_dir``, a preloading :class:`KVCacheDataset`.
    ``side_source``: see :func:`fpt_transforms`."""
    if cache_dir is not None and backbone is None:
        raise ValueError("a K/V cache needs the backbone that fills it.")
    transforms = fpt_transforms(
        img_size, side_img_size, mean, std, train, backbone, kv_dtype, reader=reader, side_source=side_source
    )
    if cache_dir is None:
        return Dataset(list(datalist), Compose(transforms))
    return KVCacheDataset(list(datalist), transforms, cache_dir, progress=progress)
