"""Two views of one image: the un-augmented high-resolution view for the frozen backbone, the side view.

Both views start from the same reading and normalisation (the bundle's transform lists, see
:mod:`fpt_monai.data.pipeline`); the side view is then (optionally) augmented and resized with :class:`SideViewd`,
the same resizing ``FPTNet.forward`` uses inside.
For training from the K/V cache, :class:`SideSourced` keeps a small float16 copy of the high-resolution view next
to the keys/values, and the augmented side views are made from that copy instead of the image file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from fpt_monai.networks.fpt import make_side_view

__all__ = ["SideSourced", "SideViewd"]


class SideViewd(MapTransform):
    """Resize a (normalised, high-resolution) image to the side network's input size, as ``FPTNet`` does.

    The result is a plain ``torch.Tensor``, also for a MONAI ``MetaTensor`` input: the side view is a network
    input, and a ``MetaTensor`` batch would carry its metadata bookkeeping through every operation of the
    training step.
    """

    def __init__(self, keys: KeysCollection, size: Sequence[int] | int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = size

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            spatial_dims = image.ndim - 1
            size = (self.size,) * spatial_dims if isinstance(self.size, int) else tuple(self.size)
            d[key] = make_side_view(torch.as_tensor(image).as_subclass(torch.Tensor)[None], size)[0]
        return d


class SideSourced(MapTransform):
    """Keep a small float16 copy of an image in [0, 1] under ``name``: the source of the augmented side views.

    The copy is ``scale`` times the side view's ``size`` (at most the image's own size), resized with
    antialiasing (:func:`~fpt_monai.networks.make_side_view`), shape ``(C, *spatial)``, ``float16`` (11
    significant bits: 16-bit and DICOM sources keep more than 8 bits, and a side view needs no rescaling but a
    ``float32`` conversion). Deterministic: placed before :class:`~fpt_monai.preload.FrozenBackboneKVd`, it is
    stored in the cache entry with the keys/values, so that training makes its side views without reading the
    image file or resizing it from full resolution again. At 1.5 times the side view's size every random resized
    crop of the augmentation (at least 80% of the area, aspect ratio 0.7-1.3: at least 0.75 of the width and 0.78
    of the height) still covers more pixels of the copy than the side view has, as it does of the full image.
    Bytes per image: ``2 C (scale x size)^2`` (2D), e.g. 221,184 for a 128 side view, 677,376 for 224.

    Args:
        keys: the one key holding the image, (C, *spatial) in [0, 1] (before normalisation).
        name: the key the copy goes to.
        size: the side view's size, an int or one per spatial dim. It is part of the cache's identity: entries
            made for another side-view size are not read (their copy has another size).
        scale: the copy's size as a multiple of ``size``.
    """

    def __init__(self, keys: KeysCollection, name: str, size: Sequence[int] | int, scale: float = 1.5) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SideSourced copies exactly one image key, got {self.keys}.")
        if scale < 1:
            raise ValueError(f"scale must be >= 1 (a copy smaller than the side view loses detail), got {scale}.")
        self.name = name
        # one canonical form (224 and (224, 224) are the same size): the size enters the cache fingerprint
        sizes = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
        self.size = sizes[0] if len(set(sizes)) == 1 else sizes
        self.scale = float(scale)
        self.dtype = torch.float16  # an attribute, so that the cache fingerprint describes what is stored

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.keys[0]]).as_subclass(torch.Tensor)
        spatial = tuple(image.shape[1:])
        side = (self.size,) * len(spatial) if isinstance(self.size, int) else tuple(self.size)
        copy = tuple(min(n, math.ceil(self.scale * s)) for n, s in zip(spatial, side))
        d[self.name] = make_side_view(image[None].float(), copy)[0].to(self.dtype)
        return d
