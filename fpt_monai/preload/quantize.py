"""int8 storage of cached keys/values: symmetric quantisation with float16 scales stored in the cache entry.

An item's keys/values, shape ``(blocks, 2, heads, tokens, head_dim)``, are stored as int8 values ``q`` and one
float16 scale ``s`` per token of each block's keys and of its values (shared by the heads: ``heads x head_dim``
values per scale), ``x ~= q * s`` with ``s = max|x| / 127`` over those values. For the ``fpt`` preset (ViT-B/16 at
512: 12 blocks, 205 kept tokens) that is 4,920 scales, 9,840 bytes next to 3,778,560 int8 values: an entry of
3,789,080 bytes. A scale per head and token (59,040 scales) or per head and channel (18,432) is more accurate but
adds 118,080 or 36,864 bytes and takes the entry over 3.8 MB. Of the granularities that fit, per token was
measured against one scale per head-dimension index (over heads and tokens): the smaller error on the pretrained
``fpt_demo`` backbone's keys/values (0.74% against 0.79%) and the smaller largest logit difference on the
``cache_dtype`` benchmark (``benchmarks/README.md``, K/V cache dtype).

Reading dequantises to float16 (:func:`dequantize_item`), so the network receives float16 keys/values, in the
same shape and memory as from a float16 cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "INT8_SCALE_DIMS",
    "quantize_int8",
    "dequantize_int8",
    "int8_scale_shape",
    "kv_read_dtype",
    "scale_key",
    "dequantize_item",
]

#: Dimensions of an item's ``(blocks, 2, heads, tokens, head_dim)`` keys/values that share one scale (counted
#: from the end, so a batch dimension in front changes nothing): heads and head_dim, i.e. one scale per token.
INT8_SCALE_DIMS = (-3, -1)
_QMAX = 127  # symmetric: -128 is never used, so q and -q are both representable


def quantize_int8(x: torch.Tensor, dims: tuple[int, ...] = INT8_SCALE_DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation: ``x`` -> (int8 ``q``, float16 scales ``s``) with ``x ~= q * s``.

    One scale per slice over ``dims`` (kept as size-1 dimensions, so ``q * s`` broadcasts): ``s = max|x| / 127``,
    rounded to float16; ``q = round(x / s)`` is computed with the rounded scale and clamped to [-127, 127], so
    the error of each value is at most half a step, ``s / 2`` (plus a float16 rounding of ``s`` at the largest
    value). A slice of zeros gets scale 1 and zeros.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize_int8 takes floating-point keys/values, got {x.dtype}.")
    x = x.float()
    scales = (x.abs().amax(dim=dims, keepdim=True) / _QMAX).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # zeros (or scales below float16's range)
    values = (x / scales.float()).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return values, scales


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``values * scales`` in ``dtype`` (float16: each result is the exactly rounded product, as |q| <= 127)."""
    if values.dtype != torch.int8:
        raise TypeError(f"dequantize_int8 takes int8 values, got {values.dtype}.")
    return values.to(dtype) * scales.to(dtype)


def int8_scale_shape(kv_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the scales that :func:`quantize_int8` stores for keys/values of shape ``kv_shape``."""
    dims = {d % len(kv_shape) for d in INT8_SCALE_DIMS}
    return tuple(1 if d in dims else size for d, size in enumerate(kv_shape))


def kv_read_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype of the keys/values a network receives from a cache of ``storage`` dtype (int8: float16)."""
    return torch.float16 if storage == torch.int8 else storage


def scale_key(kv_key: str) -> str:
    """The entry field that holds the int8 scales of the keys/values under ``kv_key``."""
    return f"{kv_key}_int8_scale"


def dequantize_item(item: Mapping, kv_key: str = "kv") -> dict:
    """An item as a cache entry holds it -> as the network reads it: int8 keys/values (with their scales under
    :func:`scale_key`) become float16 and the scales are dropped; keys/values of a floating storage dtype pass.

    Raises:
        KeyError: for int8 keys/values without their scales.
    """
    d = dict(item)
    kv = d.get(kv_key)
    if isinstance(kv, torch.Tensor) and kv.dtype == torch.int8:
        if scale_key(kv_key) not in d:
            raise KeyError(f"int8 keys/values under {kv_key!r} come without their scales ({scale_key(kv_key)!r}).")
        d[kv_key] = dequantize_int8(kv, d.pop(scale_key(kv_key)))
    return d
