"""Two views of one image: the un-augmented high-resolution view for the frozen backbone, the side view.

Both views start from the same reading and normalisation (:func:`load_and_normalize`); the side view is then
(optionally) augmented and resized with :class:`SideViewd`, the same resizing ``FPTNet.forward`` uses inside.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import EnsureTyped, MapTransform, NormalizeIntensityd, Resized

from fpt_monai.data.readers import LoadImageRGBd
from fpt_monai.networks.fpt import make_side_view

__all__ = ["SideViewd", "load_and_normalize"]


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
