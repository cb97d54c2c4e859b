"""Preloading: the frozen backbone's selected keys/values, computed once per image and kept on disk."""

from fpt_monai.preload.dataset import (
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
from fpt_monai.preload.transform import STORAGE_DTYPES, FrozenBackboneKVd, storage_dtype

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CorruptCacheEntryError",
    "FrozenBackboneKVd",
    "KVCacheDataset",
    "KVCacheLoader",
    "KVReference",
    "PreloadHandler",
    "STORAGE_DTYPES",
    "cache_fingerprint",
    "default_num_workers",
    "describe",
    "item_digest",
    "item_identity",
    "preload_all_ranks",
    "read_entry",
    "read_kv_into",
    "storage_dtype",
    "weights_digest",
    "write_entry",
]
