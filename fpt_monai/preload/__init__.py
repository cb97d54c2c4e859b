"""Preloading: the frozen backbone's selected keys/values, computed once per image and kept on disk."""

from fpt_monai.preload.collate import MixedDtypeBatchError, check_batch_dtypes, dtype_checked_collate
from fpt_monai.preload.dataset import (
    CacheNotWritableError,
    CorruptCacheEntryError,
    KVCacheDataset,
    KVReference,
    item_digest,
    item_identity,
    read_entry,
    read_kv_into,
    write_entry,
)
from fpt_monai.preload.fingerprint import CACHE_FORMAT_VERSION, cache_fingerprint, describe, weights_digest
from fpt_monai.preload.handler import PreloadHandler, preload_all_ranks
from fpt_monai.preload.loader import KVCacheLoader, default_num_workers
from fpt_monai.preload.quantize import (
    dequantize_int8,
    dequantize_item,
    int8_scale_shape,
    kv_read_dtype,
    quantize_int8,
    scale_key,
)
from fpt_monai.preload.transform import STORAGE_DTYPES, FrozenBackboneKVd, storage_dtype

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheNotWritableError",
    "CorruptCacheEntryError",
    "FrozenBackboneKVd",
    "KVCacheDataset",
    "KVCacheLoader",
    "KVReference",
    "MixedDtypeBatchError",
    "PreloadHandler",
    "STORAGE_DTYPES",
    "cache_fingerprint",
    "check_batch_dtypes",
    "default_num_workers",
    "dequantize_int8",
    "dequantize_item",
    "describe",
    "dtype_checked_collate",
    "int8_scale_shape",
    "item_digest",
    "item_identity",
    "kv_read_dtype",
    "preload_all_ranks",
    "quantize_int8",
    "read_entry",
    "read_kv_into",
    "scale_key",
    "storage_dtype",
    "weights_digest",
    "write_entry",
]
