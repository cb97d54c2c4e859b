"""KVCacheDataset: MONAI ``PersistentDataset`` for FPT's preloaded keys/values, safe and verifiable on disk.

What it adds to ``PersistentDataset``:

- The cached part of the transform chain ends right after the :class:`FrozenBackboneKVd` transform, so an entry
  holds the backbone's selected keys/values (plus the item's small fields), not images: an FPT ViT-B/16 entry in
  float16 is 7,557,120 bytes of K/V plus a header. Everything after the K/V transform (loading and augmenting
  the side view) runs every epoch.
- Cache identity: entries live in ``cache_dir/<fingerprint>/``, the fingerprint covering the backbone's
  architecture, weights, input size, blocks and token ratio, every transform before the K/V transform, the
  storage dtype and the cache format version (:func:`~fpt_monai.preload.fingerprint.cache_fingerprint`).
  An entry's name hashes the item with its file paths made absolute and their size and modification time, so
  ``a/0001.png`` and ``b/0001.png`` never collide and an edited image is recomputed.
- Entries are safetensors files (no pickle), written to a temporary file in the same folder and renamed into
  place (atomic; two processes filling one cache leave it correct), with a SHA-256 of their tensors. A
  truncated or corrupted entry is detected, reported, recomputed and rewritten, never used.
- :meth:`KVCacheDataset.preload` fills the missing entries with batched backbone inference, with a progress
  bar; interrupted, it resumes where it stopped. Given ``rank``/``world_size`` it fills one shard, so that
  several processes fill one cache together (:func:`~fpt_monai.preload.preload_all_ranks`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose, RandomizableTrait
from monai.utils import convert_to_tensor
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader

from fpt_monai.preload.fingerprint import CACHE_FORMAT_VERSION, cache_fingerprint
from fpt_monai.preload.transform import FrozenBackboneKVd

__all__ = ["CorruptCacheEntryError", "item_digest", "write_entry", "read_entry", "KVCacheDataset"]

logger = logging.getLogger(__name__)

_JSON_KEY = "fpt_monai.fields"
_DIGEST_KEY = "fpt_monai.sha256"
_VERSION_KEY = "fpt_monai.format_version"
_FINGERPRINT_KEY = "fpt_monai.fingerprint"


class CorruptCacheEntryError(RuntimeError):
    """A cache entry that cannot be trusted: truncated, altered, or written for another cache."""


def _identity(value: Any) -> Any:
    """Item value -> what identifies it: file paths become absolute path + size + modification time.

    A folder (a DICOM series read as one volume) is identified by its path and every file in it (name, size,
    modification time), so an added, removed or edited slice gives the item a new entry.
    """
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        stat = os.stat(value)
        return {"path": str(Path(value).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        files = sorted(p for p in Path(value).iterdir() if p.is_file())
        return {"path": str(Path(value).resolve()),
                "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    return value


def item_digest(item: Any) -> bytes:
    """Name of an item's cache entry (``PersistentDataset`` ``hash_func``): SHA-256 of its identity."""
    encoded = json.dumps(_identity(item), sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:40].encode()


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def write_entry(path: Path, item: dict, fingerprint: str) -> None:
    """Write a cached item atomically: tensors as safetensors, other fields as JSON metadata, plus a digest.

    Raises:
        TypeError: for a field that is neither a tensor/array nor JSON-able, naming it.
        OSError: when the entry cannot be written (e.g. a full disk); no partial file is left behind.
    """
    tensors, fields = {}, {}
    for key, value in item.items():
        if isinstance(value, (torch.Tensor, np.ndarray)):
            tensor = convert_to_tensor(value, track_meta=False).detach().cpu().contiguous()
            tensors[str(key)] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        else:
            try:
                json.dumps(value)
            except TypeError as err:
                raise TypeError(
                    f"cache entry field {key!r} is a {type(value).__name__}, which the cache cannot store; only "
                    "tensors, arrays and JSON-able values may precede the end of the K/V transform."
                ) from err
            fields[str(key)] = value
    metadata = {
        _JSON_KEY: json.dumps(fields),
        _DIGEST_KEY: _tensors_digest(tensors),
        _VERSION_KEY: str(CACHE_FORMAT_VERSION),
        _FINGERPRINT_KEY: fingerprint,
    }
    payload = safetensors_save(tensors, metadata=metadata)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(payload)
        os.replace(temporary, path)  # atomic: readers see the old state or the whole new entry
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise OSError(err.errno, f"could not write cache entry {path}: {err.strerror or err}") from err


def read_entry(path: Path, fingerprint: str) -> dict:
    """Read and verify a cache entry written by :func:`write_entry`.

    Raises:
        CorruptCacheEntryError: when the file is truncated or altered, or belongs to another cache.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CorruptCacheEntryError(f"unreadable cache entry {path}: {err}") from err
    if metadata.get(_VERSION_KEY) != str(CACHE_FORMAT_VERSION) or metadata.get(_FINGERPRINT_KEY) != fingerprint:
        raise CorruptCacheEntryError(f"cache entry {path} was written for another cache (fingerprint/version).")
    if metadata.get(_DIGEST_KEY) != _tensors_digest(tensors):
        raise CorruptCacheEntryError(f"cache entry {path} fails its checksum (altered or partially written).")
    try:
        fields = json.loads(metadata[_JSON_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise CorruptCacheEntryError(f"cache entry {path} has unreadable fields: {err}") from err
    return {**fields, **tensors}


def _as_list(batch: list) -> list:
    return batch


class _UncachedItems(torch.utils.data.Dataset):
    """(item, item through the transforms before the K/V transform), for batched preloading in workers."""

    def __init__(self, items: list, before_kv: Compose) -> None:
        self.items, self.before_kv = items, before_kv

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        item = self.items[index]
        return item, self.before_kv(deepcopy(item))


class KVCacheDataset(PersistentDataset):
    """A ``PersistentDataset`` whose cache holds the frozen backbone's keys/values of each item.

    The transform chain must contain exactly one :class:`FrozenBackboneKVd` and no random transform before it.
    The chain up to and including it is cached (computed once per item and fingerprint); the rest runs every
    time an item is read.

    Args:
        data: the datalist (dicts with file paths and labels).
        transform: the transform chain (a ``Compose`` or a sequence of transforms).
        cache_dir: root of the cache; entries go to ``cache_dir/<fingerprint>/``.
        fingerprint_extra: anything else that changes the features, added to the fingerprint.
        progress: show a progress bar in :meth:`preload`.
    """

    def __init__(
        self,
        data: Sequence,
        transform: Sequence[Callable] | Callable,
        cache_dir: str | os.PathLike,
        fingerprint_extra: dict | None = None,
        progress: bool = True,
    ) -> None:
        chain = transform if isinstance(transform, Compose) else Compose(transform)
        transforms = chain.flatten().transforms
        kv_indices = [i for i, t in enumerate(transforms) if isinstance(t, FrozenBackboneKVd)]
        if len(kv_indices) != 1:
            raise ValueError(f"the transform chain needs exactly one FrozenBackboneKVd, found {len(kv_indices)}.")
        self.kv_index = kv_indices[0]
        randoms = [type(t).__name__ for t in transforms[: self.kv_index] if isinstance(t, RandomizableTrait)]
        if randoms:
            raise ValueError(
                f"random transforms {randoms} stand before FrozenBackboneKVd; the frozen backbone must see the "
                "un-augmented image, so move them after it."
            )
        self.kv_transform: FrozenBackboneKVd = transforms[self.kv_index]
        # The K/V transform enters through its backbone, dtype and output layout, not its device: ranks or
        # machines that fill one cache on different devices must agree on where it is.
        layout = {"kv_key": self.kv_transform.kv_key, "image_key": self.kv_transform.image_key,
                  "delete_input": self.kv_transform.delete_input}
        self.fingerprint, description = cache_fingerprint(
            self.kv_transform.backbone, transforms[: self.kv_index], self.kv_transform.dtype,
            {**layout, **(fingerprint_extra or {})},
        )
        self.cache_root = Path(cache_dir)
        folder = self.cache_root / self.fingerprint[:24]
        super().__init__(data=data, transform=Compose(transforms), cache_dir=folder, hash_func=item_digest)
        self.progress = progress
        self.corrupt_entries: list[Path] = []
        self._write_description(folder / "fingerprint.json", description)

    def _write_description(self, path: Path, description: dict) -> None:
        if path.is_file():
            return
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps({"fingerprint": self.fingerprint, **description}, indent=2, default=str))
        os.replace(temporary, path)

    def set_data(self, data: Sequence) -> None:
        """Replace the datalist. Unlike ``PersistentDataset`` the cache is kept: entries are named by item."""
        self.data = data

    # -- where the cached part of the chain ends --------------------------------------------------------
    def _pre_transform(self, item_transformed):
        return self.transform(item_transformed, end=self.kv_index + 1, threading=True)

    def _post_transform(self, item_transformed):
        return self.transform(item_transformed, start=self.kv_index + 1)

    # -- entries -------------------------------------------------------------------------------------
    def entry_path(self, item: Any) -> Path:
        """The file that holds (or will hold) ``item``'s cached keys/values."""
        return Path(self.cache_dir) / f"{self.hash_func(item).decode()}.safetensors"

    def is_cached(self, item: Any) -> bool:
        """Whether ``item`` has an entry on disk (not verified: reading it verifies it)."""
        return self.entry_path(item).is_file()

    def _cachecheck(self, item_transformed):
        path = self.entry_path(item_transformed)
        if path.is_file():
            try:
                return read_entry(path, self.fingerprint)
            except CorruptCacheEntryError as err:
                warnings.warn(f"{err}; recomputing it.", stacklevel=2)
                logger.warning("%s; recomputing it.", err)
                self.corrupt_entries.append(path)
        computed = convert_to_tensor(
            self._pre_transform(deepcopy(item_transformed)), convert_numeric=False, track_meta=False
        )
        write_entry(path, computed, self.fingerprint)
        return computed

    # -- batched filling -------------------------------------------------------------------------------
    def preload(
        self,
        batch_size: int = 8,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        items: Sequence | None = None,
    ) -> dict[str, float]:
        """Fill every missing entry, running the backbone on batches of ``batch_size`` images.

        Entries already on disk are kept (an interrupted preload resumes where it stopped). Each entry is
        written as soon as its batch is done.

        With ``world_size > 1`` only this process's shard is filled: items ``rank, rank + world_size, ...`` of the
        datalist, so ``world_size`` processes (``torchrun``, a job array) fill disjoint parts of one cache
        without talking to each other. Sharding the datalist, not the list of missing entries, keeps the shards
        disjoint however far each process's view of the cache folder lags. No synchronisation happens here;
        :class:`~fpt_monai.preload.PreloadHandler` adds it in a distributed run.

        Args:
            batch_size: images per backbone forward pass.
            num_workers: data-loading worker processes reading the high-resolution views.
            rank: this process's shard, in ``[0, world_size)``.
            world_size: number of shards.
            items: the items to fill (default: the whole datalist).

        Returns:
            ``{"total", "already_cached", "computed", "seconds", "images_per_second"}`` of the (shard's) items,
            plus ``"rank"`` and ``"world_size"`` when sharded.
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        items = self.data if items is None else items
        items = list(items)[rank::world_size] if world_size > 1 else items
        missing = [item for item in items if not self.is_cached(item)]
        report = {"total": len(items), "already_cached": len(items) - len(missing), "computed": 0}
        if world_size > 1:
            report.update(rank=rank, world_size=world_size)
        start = time.perf_counter()
        if missing:
            before_kv = Compose(self.transform.transforms[: self.kv_index])
            loader = DataLoader(
                _UncachedItems(missing, before_kv),
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_as_list,
            )
            key = self.kv_transform.image_key
            # one bar per job: the shards advance alike, and bars of several processes would garble a terminal
            desc = "preloading K/V" + (f" (shard {rank + 1} of {world_size})" if world_size > 1 else "")
            with tqdm(total=len(missing), desc=desc, unit="img", disable=not self.progress or rank > 0) as bar:
                for batch in loader:
                    kv = self.kv_transform.compute(torch.stack([prepared[key] for _, prepared in batch]))
                    for (item, prepared), item_kv in zip(batch, kv):
                        prepared[self.kv_transform.kv_key] = item_kv
                        if self.kv_transform.delete_input:
                            del prepared[key]
                        write_entry(self.entry_path(item), prepared, self.fingerprint)
                    report["computed"] += len(batch)
                    bar.update(len(batch))
        seconds = time.perf_counter() - start
        report["seconds"] = round(seconds, 3)
        report["images_per_second"] = round(report["computed"] / seconds, 3) if report["computed"] else 0.0
        logger.info(
            "preloaded %d images (%d already cached)%s into %s in %.1f s, %.2f images/s",
            report["computed"], report["already_cached"],
            f" as shard {rank + 1} of {world_size}" if world_size > 1 else "",
            self.cache_dir, seconds, report["images_per_second"],
        )
        return report
