"""The K/V transform: frozen backbone on the high-resolution view -> selected keys/values in the data dict."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from fpt_monai.networks.backbones import FrozenBackbone
from fpt_monai.preload.quantize import dequantize_item, quantize_int8, scale_key

__all__ = ["STORAGE_DTYPES", "storage_dtype", "FrozenBackboneKVd"]

#: Storage dtypes a cache may use; float16 halves the authors' float32 footprint, int8 (with a float16 scale
#: per token, :mod:`fpt_monai.preload.quantize`) halves it again and is read back as float16.
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"bfloat16"``/``"float32"``/``"int8"`` (or the torch dtype) -> torch dtype; anything else
    raises."""
    if isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")


class FrozenBackboneKVd(MapTransform):
    """Run the frozen backbone on the high-resolution view and store its selected keys/values under ``kv_key``.

    Deterministic (the backbone is frozen and never sees augmentation), so it belongs before the first random
    transform: :class:`~fpt_monai.preload.KVCacheDataset` caches its output and training never runs the
    backbone again. The high-resolution view is dropped afterwards (``delete_input``) since only the K/V are
    needed; the side network's view is made from the source image by the transforms that follow.

    With ``dtype="int8"`` a cache entry holds int8 keys/values and their float16 scales (:meth:`cache_form`),
    and the transform's output, like an item read from the cache, holds them dequantised to float16: the same
    values whether or not a cache stands in between.

    Args:
        keys: the one key holding the high-resolution view, a (C, *img_size) image normalised for the backbone.
        backbone: the frozen backbone adapter.
        kv_key: key the keys/values go to, shape ``backbone.shape.kv_shape``.
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"``, ``"float32"`` or ``"int8"``.
        device: device the backbone runs on (default: where its weights are).
        delete_input: drop the high-resolution view from the data dict after use.
    """

    def __init__(
        self,
        keys: KeysCollection,
        backbone: FrozenBackbone,
        kv_key: str = "kv",
        dtype: str | torch.dtype = "float16",
        device: str | torch.device | None = None,
        delete_input: bool = True,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"FrozenBackboneKVd takes exactly one image key, got {self.keys}.")
        if not isinstance(backbone, FrozenBackbone):
            raise TypeError(f"backbone must be a FrozenBackbone, got {type(backbone).__name__}.")
        self.backbone = backbone
        self.kv_key = kv_key
        self.dtype = storage_dtype(dtype)
        self.device = torch.device(device) if device is not None else None
        self.delete_input = delete_input

    @property
    def image_key(self) -> Hashable:
        return self.keys[0]

    def compute(self, images: torch.Tensor) -> torch.Tensor:
        """Batched: (B, C, *img_size) images -> (B, *kv_shape) keys/values on the CPU, in the storage dtype
        (for int8 storage in float32, quantised per item by :meth:`cache_form`)."""
        device = self.device or next(self.backbone.parameters()).device
        images = convert_to_tensor(images, track_meta=False).to(device=device, dtype=torch.float32)
        dtype = torch.float32 if self.dtype == torch.int8 else self.dtype
        return self.backbone(images).to(dtype=dtype, device="cpu")

    def cache_form(self, data: Mapping, kv: torch.Tensor | None = None) -> dict:
        """The item as a cache entry holds it: keys/values under ``kv_key`` in the storage dtype (int8: with
        their scales under :func:`~fpt_monai.preload.quantize.scale_key`), the high-resolution view dropped
        (``delete_input``).

        Args:
            data: the item with its high-resolution view.
            kv: this item's keys/values from :meth:`compute` (batched preloading); computed here when ``None``.
        """
        d = dict(data)
        kv = self.compute(d[self.image_key][None])[0] if kv is None else kv
        if self.dtype == torch.int8:
            d[self.kv_key], d[scale_key(self.kv_key)] = quantize_int8(kv)
        else:
            d[self.kv_key] = kv
        if self.delete_input:
            del d[self.image_key]
        return d

    def __call__(self, data: Mapping) -> dict:
        return dequantize_item(self.cache_form(data), self.kv_key)
