"""Two views of one image: the un-augmented high-resolution view for the frozen backbone, the side view.

Both views start from the same reading and normalisation (:func:`load_and_normalize`); the side view is then
(optionally) augmented and resized with :class:`SideViewd`, the same resizing ``FPTNet.forward`` uses inside.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import EnsureTyped, MapTransform, NormalizeIntensityd, Resized

from fpt_monai.data.readers import LoadImageRGBd
from fpt_monai.networks.fpt import make_side_view

__all__ = ["ToRGBd", "ScaleToUnitd", "SideViewd", "load_and_normalize"]


class ToRGBd(MapTransform):
    """Channel-first image -> 3 channels: grayscale repeated, RGBA without alpha; anything else is an error."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = image.shape[0]
            if channels == 1:
                d[key] = image.repeat(3, *([1] * (image.ndim - 1)))
            elif channels == 4:
                d[key] = image[:3]
            elif channels != 3:
                source = getattr(image, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: cannot make RGB from {channels} channels (expected 1, 3 or 4).")
        return d


class ScaleToUnitd(MapTransform):
    """Scale intensities to [0, 1]: integer images by their type's maximum (255, 65535), others by min-max.

    Must run on the image as read (``LoadImaged(dtype=None)``), before anything converts it to float.
    """

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            dtype = image.dtype
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype if isinstance(dtype, torch.dtype) else np.dtype(dtype)
            image = image.float() if isinstance(image, torch.Tensor) else image.astype(np.float32)
            if np.issubdtype(np_dtype, np.integer):
                d[key] = image / float(np.iinfo(np_dtype).max)
            else:
                low, high = float(image.min()), float(image.max())
                d[key] = (image - low) / (high - low) if high > low else image * 0.0
        return d


class SideViewd(MapTransform):
    """Resize a (normalised, high-resolution) image to the side network's input size, as ``FPTNet`` does."""

    def __init__(self, keys: KeysCollection, size: Sequence[int] | int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = size

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spatial_dims = image.ndim - 1
            size = (self.size,) * spatial_dims if isinstance(self.size, int) else tuple(self.size)
            d[key] = make_side_view(torch.as_tensor(image)[None], size)[0]
        return d


def load_and_normalize(
    keys: Hashable | Sequence[Hashable],
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    reader: Mapping | None = None,
) -> list:
    """Read an image file as RGB in [0, 1], resize it to ``img_size``, normalise by ``mean``/``std``.

    This is the frozen backbone's (un-augmented) view, and the start of the side view. Reading goes through
    :class:`~fpt_monai.data.readers.LoadImageRGBd` (DICOM, NIfTI, PNG 8/16-bit, JPEG, TIFF, BMP; per-format
    intensity scaling in :mod:`fpt_monai.data.readers`); ``reader`` passes its options, e.g.
    ``{"volume_slice": "max", "dicom_window": "stored", "value_range": [-1000, 1000]}``.
    """
    spatial = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return [
        LoadImageRGBd(keys, **dict(reader or {})),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        Resized(keys, spatial, mode="bilinear", anti_aliasing=True),
        NormalizeIntensityd(keys, subtrahend=list(mean), divisor=list(std), channel_wise=True),
    ]
