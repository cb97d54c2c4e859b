"""Cache identity: a fingerprint of everything that changes the cached keys/values.

A preloading cache is only valid for the exact features it was filled with. The fingerprint covers the
backbone's architecture and weights, its input size, extracted blocks and token ratio (all in its
:class:`~fpt_monai.networks.BackboneShape`), every deterministic transform before the K/V transform (reading,
resizing, intensity scaling, normalisation, with their parameters), the storage dtype and the package's cache
format version. Entries of another fingerprint live in another folder and are never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.transforms import Transform

from fpt_monai.utils import weights_digest

__all__ = ["CACHE_FORMAT_VERSION", "describe", "weights_digest", "cache_fingerprint"]

#: Bump when the layout or meaning of a cache entry changes: every older cache is then ignored.
#: 3: entries are named by the content digest of their files, no longer by their modification times.
CACHE_FORMAT_VERSION = 3

_MAX_DEPTH = 6


def _array_digest(array: np.ndarray | torch.Tensor) -> dict[str, Any]:
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.size <= 16:
        return {"array": array.tolist(), "dtype": str(array.dtype)}
    return {"array_sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(), "shape": array.shape}


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able, deterministic description of a (transform) object's configuration.

    Primitives are kept, arrays are summarised by value or hash, containers are described item by item, and
    objects by their class and public attributes (recursively, so a MONAI dictionary transform is described
    through the array transform it wraps, private attributes included). Modules are described by class and
    weights digest. Anything else (functions, locks, ...) is described by its type name.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (torch.dtype, torch.device, np.dtype)):
        return str(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _array_digest(obj)
    if depth >= _MAX_DEPTH:
        return type(obj).__qualname__
    if isinstance(obj, nn.Module):
        return {"module": type(obj).__qualname__, "weights": weights_digest(obj)}
    if isinstance(obj, Mapping):
        return {str(k): describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [describe(v, depth + 1) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"class": type(obj).__qualname__, "fields": describe(dataclasses.asdict(obj), depth + 1)}
    if hasattr(obj, "__dict__") and not callable(obj) or isinstance(obj, Transform):
        # private attributes too: MONAI keeps e.g. LoadImaged's reader settings in `_loader`
        return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", "attrs": describe(vars(obj), depth + 1)}
    return type(obj).__qualname__


def cache_fingerprint(
    backbone: nn.Module, transforms: Sequence[Any], dtype: torch.dtype, extra: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Fingerprint of a preloading cache and the description it was computed from.

    Args:
        backbone: the frozen backbone (a :class:`~fpt_monai.networks.FrozenBackbone`); its shape (input size,
            blocks, token ratio, ...) and weights are part of the identity.
        transforms: the deterministic transforms that produce the backbone's input.
        dtype: storage dtype of the keys/values.
        extra: anything else that changes the features.

    Returns:
        ``(hex digest, description)``; the description is JSON-able and is written next to the cache.
    """
    shape = getattr(backbone, "shape", None)
    description = {
        "format_version": CACHE_FORMAT_VERSION,
        "dtype": str(dtype),
        "backbone": {
            "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "architecture": repr(getattr(backbone, "model", backbone)),
            "shape": dataclasses.asdict(shape) if shape is not None else None,
            "weights_sha256": weights_digest(backbone),
        },
        "transforms": [describe(t) for t in transforms],
        "extra": describe(dict(extra or {})),
    }
    encoded = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest(), description
