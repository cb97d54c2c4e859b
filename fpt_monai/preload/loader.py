"""KVCacheLoader: a MONAI ``DataLoader`` for a :class:`~fpt_monai.preload.KVCacheDataset` whose data-loading
workers never carry the cached keys/values.

A training batch of FPT is mostly keys/values (ViT-B/16, float16, batch 16: 121 MB for FPT, 60 MB for FPT+),
against a few MB of side views. Through a plain ``DataLoader`` with workers, a worker's collation stacks them into
a new shared-memory block for every batch, whose pages are then touched again by the training process; reading them
into a batch tensor that is already mapped is far cheaper (figures: docs/design.md, "The training epoch"). This
loader leaves the keys/values on disk in the workers, which make the side views and send a
:class:`~fpt_monai.preload.KVReference` per item; the training process reads each entry's keys/values straight into
a batch tensor it reuses once nothing refers to it any more. A thread reads the next batch's keys/values while the
current batch trains: with workers, from the references they sent; without workers, from the entries this process
verified, by index (the batch sampler's order is known in advance, and reading keys/values draws no random number,
so the items and their random transforms are made as PyTorch's single-process loading makes them).

Everything else is MONAI's ``DataLoader`` (same sampler, collation of the other fields, worker seeding and
arguments), and with any other dataset this loader is that ``DataLoader``.
"""

from __future__ import annotations

import collections
import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate

from fpt_monai.preload.dataset import KVCacheDataset, KVReference, read_kv_into
from fpt_monai.preload.quantize import kv_read_dtype

__all__ = ["KVCacheLoader", "default_num_workers"]


def default_num_workers(device: str | torch.device | None = None, max_workers: int = 4) -> int:
    """Data-loading workers per process for training or inference on ``device`` (default: the CPU).

    CPUs are those this process may run on, shared by the processes ``torchrun`` starts on the node
    (``LOCAL_WORLD_SIZE``). On a GPU the training process needs little CPU: half the CPUs, at most ``max_workers``.
    On the CPU the training step's threads use every core and a worker takes its time from them: none up to
    3 CPUs, a quarter of them beyond, at most ``max_workers``. From the cache the data path of an image is cheap
    (a side view and one read), and on a 2-core CPU a bundle epoch of FPT+ kept more of the bare step's speed with
    no worker than with one (docs/design.md, "The training epoch").
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if torch.device(device if device is not None else "cpu").type == "cpu":
        return 0 if cpus < 4 else min(int(max_workers), cpus // 4)
    return max(0, min(int(max_workers), cpus // 2))


class _WithoutKV(torch.utils.data.Dataset):
    """The items of a :class:`KVCacheDataset` with :class:`KVReference` in place of their keys/values."""

    def __init__(self, dataset: KVCacheDataset) -> None:
        self.dataset = dataset  # the only attribute: MONAI's worker seeding (set_rnd) reaches the transforms as before

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset.kv_reference(index)


class _CollateWithoutKV:
    """``collate_fn`` on every field but the keys/values, which stay a list (of references or tensors)."""

    def __init__(self, collate_fn: Callable, key: str) -> None:
        self.collate_fn, self.key = collate_fn, key

    def __call__(self, items: Sequence[dict]) -> dict:
        kv = [item[self.key] for item in items]
        batch = self.collate_fn([{k: v for k, v in item.items() if k != self.key} for item in items])
        batch[self.key] = kv
        return batch


class _Buffers:
    """Batch tensors whose memory is handed out again once nothing refers to it any more.

    Each batch tensor is made (``torch.from_numpy``) from a NumPy view of a pooled buffer; the tensor's storage
    holds that view for as long as any tensor or view of the storage lives, and when it is released a finalizer
    puts the buffer back. Reusing it spares the kernel's zeroing and page faults of a new allocation of tens of MB
    per batch. Pinned memory (for a GPU) is not pooled: PyTorch's pinned-memory allocator caches it already.
    """

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self.free: collections.deque[np.ndarray] = collections.deque()  # thread-safe appends and pops

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        shape = tuple(shape)
        if self.pin_memory:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = None
        while buffer is None and self.free:
            candidate = self.free.popleft()
            buffer = candidate if candidate.nbytes >= nbytes else None  # a smaller one is dropped
        if buffer is None:
            buffer = np.empty(nbytes, dtype=np.uint8)
        view = buffer[:nbytes]
        weakref.finalize(view, self.free.append, buffer)
        return torch.from_numpy(view).view(dtype).view(shape)


class KVCacheLoader(DataLoader):
    """MONAI's ``DataLoader``; for a :class:`~fpt_monai.preload.KVCacheDataset`, the cached keys/values are read by
    the process that iterates it, into reused batch tensors (see the module).

    Batches are those of ``DataLoader(dataset, ...)``: the same fields, with the keys/values stacked into one
    tensor of the cache's dtype. A batch's keys/values stay valid as long as they are referenced: their memory is
    reused only when nothing refers to it any more. Transforms after the K/V transform must not read the
    keys/values (in the workers they are a :class:`~fpt_monai.preload.KVReference`).

    Args:
        dataset: the dataset; any other than a ``KVCacheDataset`` is loaded as by MONAI's ``DataLoader``.
        num_workers: data-loading worker processes.
        kwargs: the other arguments of MONAI's ``DataLoader`` (``batch_size``, ``shuffle``, ``sampler``,
            ``collate_fn``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: Any, num_workers: int = 0, **kwargs) -> None:
        self.kv_dataset = dataset if isinstance(dataset, KVCacheDataset) else None
        if self.kv_dataset is not None:
            self.kv_key = self.kv_dataset.kv_transform.kv_key
            kwargs["collate_fn"] = _CollateWithoutKV(kwargs.get("collate_fn") or list_data_collate, self.kv_key)
            dataset = _WithoutKV(self.kv_dataset)
        super().__init__(dataset, num_workers=num_workers, **kwargs)
        self._buffers = _Buffers(pin_memory=bool(kwargs.get("pin_memory")) and torch.cuda.is_available())

    def __iter__(self) -> Iterator:
        batches = super().__iter__()
        if self.kv_dataset is None:
            yield from batches
        elif self.num_workers == 0 and self.batch_sampler is not None and not self.pin_memory:
            yield from self._single_process(batches)
        else:
            reader = ThreadPoolExecutor(1, thread_name_prefix="fpt-kv-reader")
            try:
                pending = reader.submit(self._next_with_kv, batches)
                while (batch := pending.result()) is not None:
                    pending = reader.submit(self._next_with_kv, batches)
                    yield batch
            finally:  # also when the consumer stops early: the thread ends with the batch it is reading
                reader.shutdown(wait=False, cancel_futures=True)

    def _single_process(self, iterator: Iterator) -> Iterator[dict]:
        """Without workers: the batches of the batch sampler's indices, as PyTorch's single-process loading makes
        them (``iterator``, created for that, is not advanced). A thread reads each batch's entries and
        keys/values, one batch ahead, while this thread makes the items' side views (the random transforms, which
        draw from this process's generator in the same order as there) and the step trains: reading draws no
        random number."""
        reader = ThreadPoolExecutor(1, thread_name_prefix="fpt-kv-reader")
        try:
            batches = iter(self.batch_sampler)
            indices = next(batches, None)
            pending = reader.submit(self._read_cached, indices) if indices is not None else None
            while indices is not None:
                cached, kv = pending.result()
                batch = self.collate_fn([self.kv_dataset.transform_cached(item) for item in cached])
                batch[self.kv_key] = kv
                indices = next(batches, None)
                pending = reader.submit(self._read_cached, indices) if indices is not None else None
                yield batch
        finally:  # also when the consumer stops early: the thread ends with the batch it is reading
            reader.shutdown(wait=False, cancel_futures=True)
            del iterator

    def _read_cached(self, indices: Sequence[int]) -> tuple[list[dict], torch.Tensor]:
        """The cached items of ``indices`` and their keys/values read into one batch tensor."""
        cached = [self.kv_dataset.cached_item(i) for i in indices]
        return cached, self._batch_kv([item[self.kv_key] for item in cached])

    def _next_with_kv(self, batches: Iterator) -> dict | None:
        batch = next(batches, None)
        return None if batch is None else self._read_kv(batch)

    def _read_kv(self, batch: dict) -> dict:
        """The batch with its keys/values read into one (reused) tensor."""
        batch[self.kv_key] = self._batch_kv(batch[self.kv_key])
        return batch

    def _batch_kv(self, items: Sequence[Any]) -> torch.Tensor:
        """One (reused) batch tensor holding the keys/values of ``items`` (references or tensors)."""
        transform = self.kv_dataset.kv_transform
        out = self._buffers.take((len(items), *transform.backbone.shape.kv_shape), kv_read_dtype(transform.dtype))
        self._read_rows(list(zip(out, items)))
        return out

    def _read_rows(self, rows: Sequence[tuple[torch.Tensor, Any]]) -> None:
        for row, item in rows:
            if isinstance(item, KVReference):
                if read_kv_into(item, self.kv_key, row):
                    continue
                # the entry changed since the worker verified it: read (or compute) it again, verified, here
                item = self.kv_dataset._cachecheck(self.kv_dataset.data[item.index])[self.kv_key]
            row.copy_(torch.as_tensor(item))
