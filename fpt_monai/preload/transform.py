"""The K/V transform: frozen backbone on the high-resolution view -> selected keys/values in the data dict."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from fpt_monai.networks.backbones import FrozenBackbone

__all__ = ["STORAGE_DTYPES", "storage_dtype", "FrozenBackboneKVd"]

#: Storage dtypes a cache may use; float16 halves the authors' float32 footprint.
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"bfloat16"``/``"float32"`` (or the torch dtype) -> torch dtype; anything else raises."""
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

    Args:
        keys: the one key holding the high-resolution view, a (C, *img_size) image normalised for the backbone.
        backbone: the frozen backbone adapter.
        kv_key: key the keys/values go to, shape ``backbone.shape.kv_shape``.
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
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
        """Batched: (B, C, *img_size) images -> (B, *kv_shape) keys/values in the storage dtype, on the CPU."""
        device = self.device or next(self.backbone.parameters()).device
        images = convert_to_tensor(images, track_meta=False).to(device=device, dtype=torch.float32)
        return self.backbone(images).to(dtype=self.dtype, device="cpu")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d[self.kv_key] = self.compute(d[self.image_key][None])[0]
        if self.delete_input:
            del d[self.image_key]
        return d
