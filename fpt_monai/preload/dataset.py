"""KVCacheDataset: MONAI ``PersistentDataset`` for FPT's preloaded keys/values, safe and verifiable on disk.

What it adds to ``PersistentDataset``:

- The cached part of the transform chain ends right after the :class:`FrozenBackboneKVd` transform, so an entry
  holds the backbone's selected keys/values (plus the item's small fields), not images: an FPT ViT-B/16 entry in
  float16 is 7,557,120 bytes of K/V plus a header (int8: 3,778,560 bytes and 9,840 bytes of scales). Everything
  after the K/V transform (loading and augmenting the side view) runs every epoch. int8 keys/values are
  dequantised to float16 as an item is read (:mod:`fpt_monai.preload.quantize`).
- Cache identity: entries live in ``cache_dir/<fingerprint>/``, the fingerprint covering the backbone's
  architecture, weights, input size, blocks and token ratio, every transform before the K/V transform, the
  storage dtype and the cache format version (:func:`~fpt_monai.preload.fingerprint.cache_fingerprint`).
  An entry's name hashes the item's identity (:func:`item_identity`: every field, file paths resolved and with
  their size and content digest), so ``a/0001.png`` and ``b/0001.png`` never collide and an edited image is
  recomputed, also when its size and modification time were kept (``cp -p``, ``rsync -t``, tar extraction).
  A process hashes each image file once (:func:`~fpt_monai.utils.file_digest`, well under a millisecond per image;
  the data check before training hashes the same files in its pass and the cache reuses those digests); the
  reads of each epoch then cost one ``stat`` per file, as before. Data-loading workers forked after
  :meth:`KVCacheDataset.preload` inherit the digests.
- Entries are bound to their item: each stores the item's identity and the cache fingerprint, and a SHA-256
  over everything it stores (tensors, fields such as the label, identity, fingerprint). Reading an entry checks
  that the stored identity is the identity of the item asked for, so an entry copied over another item's file,
  or with an edited label, is never returned for it, and the checksum: once per process and file, as long as
  the file stays the same (inode, size, modification and change times; a file changed within 2 s of its
  verification is verified again at its next read). :meth:`KVCacheDataset.preload` verifies the entries it finds
  in the process that starts the data-loading workers, which inherit what it verified, so training does not
  hash every entry every epoch.
- Entries are safetensors files (no pickle), written to a temporary file in the same folder and renamed into
  place (atomic; two processes filling one cache leave it correct). A truncated, altered or misplaced entry
  is detected, reported naming the file, recomputed and rewritten, never used.
- :meth:`KVCacheDataset.preload` fills the missing (and recomputes the corrupt) entries with batched backbone
  inference, with a progress bar; interrupted, it resumes where it stopped. Given ``rank``/``world_size`` it
  fills one shard, so that several processes fill one cache together (:func:`~fpt_monai.preload.preload_all_ranks`).
- :meth:`KVCacheDataset.kv_reference` gives an item with a :class:`KVReference` to its verified entry in place of
  its keys/values, and :func:`read_kv_into` reads them from there into a given tensor: the data-loading workers of
  :class:`~fpt_monai.preload.KVCacheLoader` never handle the keys/values, the training process reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose, RandomizableTrait
from monai.utils import convert_to_tensor
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fpt_monai.preload.fingerprint import CACHE_FORMAT_VERSION, cache_fingerprint
from fpt_monai.preload.quantize import dequantize_item
from fpt_monai.preload.transform import FrozenBackboneKVd
from fpt_monai.utils import atomic_write, file_digest, state_dict_sha256

__all__ = [
    "CorruptCacheEntryError",
    "KVCacheDataset",
    "KVReference",
    "item_digest",
    "item_identity",
    "read_entry",
    "read_kv_into",
    "write_entry",
]

logger = logging.getLogger(__name__)

_JSON_KEY = "fpt_monai.fields"
_DIGEST_KEY = "fpt_monai.sha256"
_VERSION_KEY = "fpt_monai.format_version"
_FINGERPRINT_KEY = "fpt_monai.fingerprint"
_IDENTITY_KEY = "fpt_monai.item"
#: An entry modified this close to (or after) the moment it was verified is verified again at its next read: file
#: times are coarse (a change within the same tick of the clock leaves them as they were).
_RECENT_NS = 2_000_000_000


class CacheNotWritableError(OSError):
    """A cache that lacks entries on storage this process cannot write (read-only media, another user's folder);
    the message names the folder and the ways out."""


def _unwritable(folder: Path, missing: int | None, err: OSError) -> CacheNotWritableError:
    lacks = f"lacks {missing} of its entries" if missing is not None else "does not exist"
    return CacheNotWritableError(
        err.errno,
        f"the K/V cache {folder} {lacks} and cannot be written there ({err.strerror or err}). Make the folder "
        "writable, point cache_dir at a writable folder (bundle: --cache_dir PATH), or preload the cache where it "
        "is writable (a training run or fpt_monai.preload with the same settings) and copy it here.",
    )


class CorruptCacheEntryError(RuntimeError):
    """A cache entry that cannot be trusted: truncated, altered, or written for another cache."""


def _identity(value: Any) -> Any:
    """Item value -> what identifies it: file paths become absolute path + size + content digest.

    The content is :func:`~fpt_monai.utils.file_digest` (SHA-256 of the file's bytes, computed once per process and
    file version), so a file rewritten with its old size and modification time gets a new entry, and one whose
    times alone changed keeps its entry. A folder (a DICOM series read as one volume) is identified by its path and
    every file in it (name, size, digest), so an added, removed or edited slice gives the item a new entry.
    """
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return {"path": str(Path(value).resolve()), "size": os.path.getsize(value), "sha256": file_digest(value)}
    if isinstance(value, (str, os.PathLike)) and os.path.isdir(value):
        files = sorted(p for p in Path(value).iterdir() if p.is_file())
        return {
            "path": str(Path(value).resolve()),
            "files": [[p.name, p.stat().st_size, file_digest(p)] for p in files],
        }
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    return value


def item_identity(item: Any) -> str:
    """What identifies a datalist item, as canonical JSON: every field (the label too), with each file path
    resolved (symbolic links followed) and with the file's size and the SHA-256 of its bytes
    (:func:`~fpt_monai.utils.file_digest`: hashed once per process while the file's inode, size, modification and
    change times stay the same; after that an identity costs one ``stat`` per file)."""
    return json.dumps(_identity(item), sort_keys=True, default=str)


def item_digest(item: Any) -> bytes:
    """Name of an item's cache entry (``PersistentDataset`` ``hash_func``): SHA-256 of its identity."""
    return _name(item_identity(item)).encode()


def _name(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:40]


def _entry_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of everything an entry stores: its tensors and every metadata field but the checksum itself."""
    digest = hashlib.sha256(state_dict_sha256({name: tensors[name] for name in sorted(tensors)}).encode())
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != _DIGEST_KEY}, sort_keys=True).encode())
    return digest.hexdigest()


def _difference(stored: Any, current: Any, where: str = "") -> str:
    """Where two identities first differ, e.g. ``label: 0 != 1`` (the stored value first; a file's path before
    its size and modification time)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in sorted(set(stored) | set(current), key=lambda k: (k != "path", str(k))):
            if stored.get(key) != current.get(key):
                return _difference(stored.get(key), current.get(key), f"{where}.{key}" if where else str(key))
    elif isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        for index, (a, b) in enumerate(zip(stored, current)):
            if a != b:
                return _difference(a, b, f"{where}[{index}]")
    return f"{where or 'item'}: {stored!r:.200} != {current!r:.200}"


def write_entry(path: Path, item: dict, fingerprint: str, identity: str | None = None) -> None:
    """Write a cached item atomically: tensors as safetensors, other fields as JSON metadata, plus the item's
    identity, the cache fingerprint and a SHA-256 of all of it.

    Args:
        path: the entry file.
        item: the item after the cached transforms (tensors and JSON-able fields).
        fingerprint: the cache's fingerprint.
        identity: the datalist item's :func:`item_identity`, checked by :func:`read_entry`.

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
        _VERSION_KEY: str(CACHE_FORMAT_VERSION),
        _FINGERPRINT_KEY: fingerprint,
        **({_IDENTITY_KEY: identity} if identity is not None else {}),
    }
    metadata[_DIGEST_KEY] = _entry_checksum(tensors, metadata)
    payload = safetensors_save(tensors, metadata=metadata)
    with atomic_write(path, what="cache entry") as f:  # readers see the old state or the whole new entry
        f.write(payload)


def read_entry(path: Path, fingerprint: str, identity: str | None = None, checksum: bool = True) -> dict:
    """Read and verify a cache entry written by :func:`write_entry`.

    Args:
        path: the entry file.
        fingerprint: the cache's fingerprint; an entry of another cache is refused.
        identity: the :func:`item_identity` of the item the entry is read for; an entry stored for another
            item (or without an identity) is refused. ``None`` checks the entry's integrity only.
        checksum: verify the SHA-256 of the entry's tensors and fields (reads every byte); ``False`` for a file
            that was verified and has not changed since (the other checks are made either way).

    Raises:
        CorruptCacheEntryError: when the file is truncated or altered, belongs to another cache, or was stored
            for another item; the message names the file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise CorruptCacheEntryError(f"unreadable cache entry {path}: {err}") from err
    if metadata.get(_VERSION_KEY) != str(CACHE_FORMAT_VERSION) or metadata.get(_FINGERPRINT_KEY) != fingerprint:
        raise CorruptCacheEntryError(f"cache entry {path} was written for another cache (fingerprint/version).")
    if checksum and metadata.get(_DIGEST_KEY) != _entry_checksum(tensors, metadata):
        raise CorruptCacheEntryError(
            f"cache entry {path} fails its checksum (its tensors or fields were altered, or it is partially written)."
        )
    if identity is not None and metadata.get(_IDENTITY_KEY) != identity:
        stored = metadata.get(_IDENTITY_KEY)
        what = _difference(json.loads(stored), json.loads(identity)) if stored else "no item identity stored"
        raise CorruptCacheEntryError(
            f"cache entry {path} was stored for another item or another version of its files ({what})."
        )
    try:
        fields = json.loads(metadata[_JSON_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise CorruptCacheEntryError(f"cache entry {path} has unreadable fields: {err}") from err
    return {**fields, **tensors}


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file apart from its other versions: inode, size, modification and change times."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class KVReference(NamedTuple):
    """Where an item's keys/values are: its verified cache entry, as it was when verified (see :func:`read_kv_into`)."""

    path: str
    signature: tuple[int, int, int, int]
    index: int


def read_kv_into(reference: KVReference, key: str, out: torch.Tensor) -> bool:
    """Copy the tensor ``key`` of a verified cache entry into ``out`` (contiguous, of its dtype and size).

    One read of the file into ``out``, with no intermediate copy. Returns ``False``, leaving ``out`` as it may be,
    when the file is no longer the one verified (another inode, size or time) or holds ``key`` in another layout.
    """
    if not out.is_contiguous():
        return False
    try:
        with open(reference.path, "rb", buffering=0) as f:
            if _signature(os.fstat(f.fileno())) != tuple(reference.signature):
                return False
            size = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(size)).get(key, {})  # the safetensors header: dtype, shape, byte offsets
            begin, end = info.get("data_offsets", (0, -1))
            layout = (_SAFETENSORS_DTYPES.get(info.get("dtype")), info.get("shape"), end - begin)
            target = out.view(torch.uint8).reshape(-1)
            if layout != (out.dtype, list(out.shape), target.numel()):
                return False
            f.seek(8 + size + begin)
            view, done = memoryview(target.numpy()), 0
            while done < len(view):
                count = f.readinto(view[done:])
                if not count:
                    return False
                done += count
    except (OSError, ValueError):
        return False
    return True


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def _as_list(batch: list) -> list:
    return batch


class _UncachedItems(torch.utils.data.Dataset):
    """(identity, item through the transforms before the K/V transform) of (identity, item) pairs, for batched
    preloading in workers."""

    def __init__(self, items: list[tuple[str, Any]], before_kv: Compose) -> None:
        self.items, self.before_kv = items, before_kv

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, dict]:
        identity, item = self.items[index]
        return identity, self.before_kv(deepcopy(item))


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
        layout = {
            "kv_key": self.kv_transform.kv_key,
            "image_key": self.kv_transform.image_key,
            "delete_input": self.kv_transform.delete_input,
        }
        self.fingerprint, description = cache_fingerprint(
            self.kv_transform.backbone,
            transforms[: self.kv_index],
            self.kv_transform.dtype,
            {**layout, **(fingerprint_extra or {})},
        )
        self.cache_root = Path(cache_dir)
        folder = self.cache_root / self.fingerprint[:24]
        try:
            super().__init__(data=data, transform=Compose(transforms), cache_dir=folder, hash_func=item_digest)
        except OSError as err:  # the folder of this fingerprint cannot be created
            raise _unwritable(folder, None, err) from err
        self.progress = progress
        self.corrupt_entries: list[Path] = []
        self._verified: dict[str, tuple[int, int, int, int]] = {}  # entry file -> its signature when verified
        self._writable = False  # the folder took a file in this process
        self._write_description(folder / "fingerprint.json", description)

    def _write_description(self, path: Path, description: dict) -> None:
        if path.is_file():
            return
        try:
            with atomic_write(path, "w", what="cache description") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint, **description}, indent=2, default=str))
        except OSError as err:  # read-only storage: a complete cache is still usable, a missing entry is reported
            logger.debug("Cache description %s not written: %s", path, err)

    def check_writable(self, missing: int) -> None:
        """Raise :class:`CacheNotWritableError`, naming the cache folder and the fixes, when ``missing`` entries
        would have to be written to a folder that takes no file (read-only storage); checked once per process.
        """
        if self._writable or missing == 0:
            return
        folder = Path(self.cache_dir)
        try:
            handle, probe = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            raise _unwritable(folder, missing, err) from err
        self._writable = True

    def set_data(self, data: Sequence) -> None:
        """Replace the datalist. Unlike ``PersistentDataset`` the cache is kept: entries are named by item."""
        self.data = data

    # -- where the cached part of the chain ends --------------------------------------------------------
    def _pre_transform(self, item_transformed):
        # what an entry holds: the K/V transform's cache form (int8 storage: values and scales, not dequantised)
        return self.kv_transform.cache_form(self.transform(item_transformed, end=self.kv_index, threading=True))

    def _post_transform(self, item_transformed):
        return self.transform(item_transformed, start=self.kv_index + 1)

    # -- entries -------------------------------------------------------------------------------------
    def entry_path(self, item: Any) -> Path:
        """The file that holds (or will hold) ``item``'s cached keys/values."""
        return self._entry_path(item_identity(item))

    def _entry_path(self, identity: str) -> Path:
        return Path(self.cache_dir) / f"{_name(identity)}.safetensors"

    def is_cached(self, item: Any) -> bool:
        """Whether ``item`` has an entry on disk (not verified: reading it verifies it)."""
        return self.entry_path(item).is_file()

    def _cachecheck(self, item_transformed):
        return dequantize_item(self._cached(item_transformed)[0], self.kv_transform.kv_key)

    def _cached(self, item: Any) -> tuple[dict, Path, tuple[int, int, int, int] | None]:
        """(the item through the cached transforms, its entry file, the file's signature when read; ``None`` when
        the entry was missing or corrupt and has been computed and written now)."""
        # the identity is taken before the files are read: an image edited meanwhile gets a new entry later
        identity = item_identity(item)
        path = self._entry_path(identity)
        try:
            return self._read(path, identity)
        except FileNotFoundError:
            pass
        except CorruptCacheEntryError as err:
            warnings.warn(f"{err} Recomputing it.", stacklevel=3)
            logger.warning("%s Recomputing it.", err)
            self.corrupt_entries.append(path)
        self.check_writable(1)
        computed = convert_to_tensor(self._pre_transform(deepcopy(item)), convert_numeric=False, track_meta=False)
        write_entry(path, computed, self.fingerprint, identity)
        return computed, path, None

    def _read(self, path: Path, identity: str) -> tuple[dict, Path, tuple[int, int, int, int]]:
        """:func:`read_entry`, verifying the checksum unless this process (or the one it was started from) verified
        this very file before; raises ``FileNotFoundError`` for a missing entry."""
        signature = _signature(os.stat(path))
        known = self._verified.get(str(path)) == signature
        started = time.time_ns()
        entry = read_entry(path, self.fingerprint, identity, checksum=not known)
        if not known and max(signature[2], signature[3]) < started - _RECENT_NS:
            self._verified[str(path)] = signature
        return entry, path, signature

    def kv_reference(self, index: int) -> dict:
        """Item ``index`` as ``dataset[index]`` gives it, its keys/values left in the cache: a :class:`KVReference`
        to the verified entry in their place (:class:`~fpt_monai.preload.KVCacheLoader` reads them in the process
        that trains). An entry computed now (it was missing or corrupt), and one of int8 storage (dequantised
        where it is read), gives its keys/values themselves. Equals ``transform_cached(cached_item(index))``."""
        return self.transform_cached(self.cached_item(index))

    def cached_item(self, index: int) -> dict:
        """Item ``index`` through the cached transforms only (its entry, read, or computed and written now), with a
        :class:`KVReference` in place of the keys/values as :meth:`kv_reference` gives them. Draws no random number."""
        entry, path, signature = self._cached(self.data[index])
        if signature is not None and self.kv_transform.dtype != torch.int8:
            entry = {**entry, self.kv_transform.kv_key: KVReference(str(path), signature, int(index))}
        return dequantize_item(entry, self.kv_transform.kv_key)

    def transform_cached(self, item: dict) -> dict:
        """The transforms after the cached ones (from the first random transform on) applied to an item of
        :meth:`cached_item`."""
        return self._post_transform(item)

    # -- batched filling -------------------------------------------------------------------------------
    def _verifies(self, identity: str) -> bool:
        """Whether the entry of the item with this identity is on disk and sound (a corrupt one is reported)."""
        path = self._entry_path(identity)
        try:
            self._read(path, identity)
            return True
        except FileNotFoundError:
            return False
        except CorruptCacheEntryError as err:
            warnings.warn(f"{err} Recomputing it.", stacklevel=3)
            logger.warning("%s Recomputing it.", err)
            self.corrupt_entries.append(path)
            return False

    def preload(
        self,
        batch_size: int = 8,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        items: Sequence | None = None,
    ) -> dict[str, float]:
        """Fill every missing entry, running the backbone on batches of ``batch_size`` images.

        Entries already on disk are verified (:func:`read_entry`) and kept; a corrupt one is reported and computed
        again. An interrupted preload resumes where it stopped. Each entry is written as soon as its batch is done.
        What it verifies stays verified in this process, and in the data-loading workers it starts afterwards,
        as long as the files do not change: their reads then skip the checksum.

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        items = self.data if items is None else items
        items = list(items)[rank::world_size] if world_size > 1 else items
        identified = [(item_identity(item), item) for item in items]
        missing = [(identity, item) for identity, item in identified if not self._verifies(identity)]
        self.check_writable(len(missing))  # one clear error before any compute, not one per entry
        report = {"total": len(items), "already_cached": len(items) - len(missing), "computed": 0}
        if world_size > 1:
            report.update(rank=rank, world_size=world_size)
        start = time.perf_counter()
        if missing:
            before_kv = Compose(self.transform.transforms[: self.kv_index])
            loader = DataLoader(
                _UncachedItems(missing, before_kv), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
            )
            key = self.kv_transform.image_key
            # one bar per job: the shards advance alike, and bars of several processes would garble a terminal
            desc = "preloading K/V" + (f" (shard {rank + 1} of {world_size})" if world_size > 1 else "")
            with tqdm(total=len(missing), desc=desc, unit="img", disable=not self.progress or rank > 0) as bar:
                for batch in loader:
                    kv = self.kv_transform.compute(torch.stack([prepared[key] for _, prepared in batch]))
                    for (identity, prepared), item_kv in zip(batch, kv):
                        entry = self.kv_transform.cache_form(prepared, item_kv)
                        write_entry(self._entry_path(identity), entry, self.fingerprint, identity)
                    report["computed"] += len(batch)
                    bar.update(len(batch))
        seconds = time.perf_counter() - start
        for identity, _ in missing:  # read back: what training reads is then verified here, not in every epoch
            self._verifies(identity)
        report["seconds"] = round(seconds, 3)
        report["images_per_second"] = round(report["computed"] / seconds, 3) if report["computed"] else 0.0
        logger.info(
            "preloaded %d images (%d already cached)%s into %s in %.1f s, %.2f images/s",
            report["computed"],
            report["already_cached"],
            f" as shard {rank + 1} of {world_size}" if world_size > 1 else "",
            self.cache_dir,
            seconds,
            report["images_per_second"],
        )
        return report
