"""Builders shared by the preloading tests and their subprocess workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import (
    CopyItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image

from conftest import make_tiny_timm_vit
from fpt_monai.networks import TimmViTBackbone
from fpt_monai.preload import FrozenBackboneKVd, KVCacheDataset


def write_images(root: Path, names=("a/0001.png", "b/0001.png", "a/0002.png", "b/0003.png"), seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    data = []
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(path)
        data.append({"image": str(path), "label": index % 2})
    return data


def make_backbone(img_size=64, depth=4, blocks=None, token_ratio=0.2, seed=0):
    return TimmViTBackbone(make_tiny_timm_vit(img_size, depth=depth, seed=seed), blocks=blocks, token_ratio=token_ratio)


def make_transforms(backbone, img_size=64, mean=0.5, std=0.5, dtype="float16", side_size=32, augment=True):
    """High-resolution view -> K/V (cached); then the side view, loaded again and (optionally) flipped."""
    side = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Resized("image", (side_size,) * 2),
            ScaleIntensityRanged("image", 0, 255, 0, 1)]
    return [
        CopyItemsd("image", names="high_res"),
        LoadImaged("high_res", image_only=True),
        EnsureChannelFirstd("high_res"),
        Resized("high_res", (img_size, img_size)),
        ScaleIntensityRanged("high_res", 0, 255, 0, 1),
        NormalizeIntensityd("high_res", subtrahend=[mean] * 3, divisor=[std] * 3, channel_wise=True),
        FrozenBackboneKVd("high_res", backbone, dtype=dtype),
        *side,
        *([RandFlipd("image", prob=0.5, spatial_axis=1)] if augment else []),
    ]


def make_dataset(data, cache_dir, **kwargs) -> KVCacheDataset:
    backbone_args = {k: kwargs.pop(k) for k in ("depth", "blocks", "token_ratio", "seed") if k in kwargs}
    backbone = make_backbone(img_size=kwargs.get("img_size", 64), **backbone_args)
    return KVCacheDataset(data, make_transforms(backbone, **kwargs), cache_dir, progress=False)
