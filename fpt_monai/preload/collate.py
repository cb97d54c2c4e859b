"""Collation that refuses a batch mixing dtypes, instead of upcasting it silently.

``torch.stack``, inside MONAI's ``list_data_collate`` (the default ``collate_fn`` of MONAI's ``DataLoader``),
promotes a float16 and a float32 tensor to float32 without a word. For cached keys/values that hides a real
mistake: items of two caches with different storage dtypes (float16 and float32, or bfloat16 and float16) in
one batch, e.g. through a ``ConcatDataset`` of two :class:`~fpt_monai.preload.KVCacheDataset`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import list_data_collate

__all__ = ["MixedDtypeBatchError", "check_batch_dtypes", "dtype_checked_collate"]


class MixedDtypeBatchError(TypeError):
    """Items of one batch hold a field in different dtypes."""


def _dtype(value: Any) -> Any:
    return value.dtype if isinstance(value, (torch.Tensor, np.ndarray)) else None


def _check(values: Sequence, where: str) -> None:
    items_by_dtype: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        dtype = _dtype(value)
        if dtype is not None:
            items_by_dtype.setdefault(str(dtype).removeprefix("torch."), []).append(index)
    if len(items_by_dtype) > 1:
        found = ", ".join(
            f"{dtype} (item{'s' if len(items) > 1 else ''} {', '.join(map(str, items[:8]))}"
            f"{', ...' if len(items) > 8 else ''})"
            for dtype, items in items_by_dtype.items()
        )
        raise MixedDtypeBatchError(
            f"the items of one batch hold {where} in different dtypes: {found}. Collating would convert them "
            "silently; items of K/V caches with different storage dtypes (e.g. two KVCacheDatasets) must not "
            "share a batch: fill one cache in one dtype, or convert the items before collating."
        )


def check_batch_dtypes(batch: Sequence) -> None:
    """Raise :class:`MixedDtypeBatchError`, naming the field, the dtypes and the items, when the items of
    ``batch`` (dicts, sequences or tensors; lists of them as MONAI's ``list_data_collate`` takes them) hold one
    field as tensors or arrays of different dtypes."""
    if not batch:
        return
    items = [i for item in batch for i in item] if isinstance(batch[0], list) else list(batch)
    first = items[0]
    if isinstance(first, Mapping):
        for key in first:
            _check([item.get(key) if isinstance(item, Mapping) else None for item in items], f"{key!r}")
    elif isinstance(first, tuple):
        for position in range(len(first)):
            _check([item[position] if len(item) > position else None for item in items], f"element {position}")
    else:
        _check(items, "their tensors")


def dtype_checked_collate(batch: Sequence) -> Any:
    """MONAI's ``list_data_collate`` after :func:`check_batch_dtypes`: a ``collate_fn`` for data loaders of
    cached keys/values (the bundle's)."""
    check_batch_dtypes(batch)
    return list_data_collate(batch)
