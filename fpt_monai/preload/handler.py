"""Ignite handler that fills the preloading caches before the first epoch, sharded over the processes of a
distributed run."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from ignite.engine import Events

from fpt_monai.engine.distributed import barrier, is_distributed, rank_and_world_size
from fpt_monai.preload.dataset import KVCacheDataset

__all__ = ["PreloadHandler", "preload_all_ranks"]

logger = logging.getLogger(__name__)


class PreloadHandler:
    """On ``Events.STARTED``, fill the K/V caches of the given datasets with batched backbone inference.

    Attach it to the trainer (e.g. in a bundle's ``handlers`` list). What is cached stays cached: a run that was
    interrupted while preloading resumes where it stopped, and a finished cache costs one directory scan.

    In a distributed run (a ``torch.distributed`` process group of several processes) attach it on every rank:
    each rank fills its shard of every cache and training starts when the caches are whole
    (:func:`preload_all_ranks`).

    Args:
        datasets: one or more :class:`KVCacheDataset` (for example the training and validation sets).
        batch_size: images per backbone forward pass.
        num_workers: data-loading workers for reading and preprocessing the high-resolution views.
    """

    def __init__(self, datasets: KVCacheDataset | Sequence[KVCacheDataset], batch_size: int = 8, num_workers: int = 0):
        self.datasets = [datasets] if isinstance(datasets, KVCacheDataset) else list(datasets)
        for dataset in self.datasets:
            if not isinstance(dataset, KVCacheDataset):
                raise TypeError(f"PreloadHandler fills KVCacheDataset caches, got {type(dataset).__name__}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.reports: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        for dataset in self.datasets:
            report = preload_all_ranks(dataset, batch_size=self.batch_size, num_workers=self.num_workers)
            self.reports.append(report)
            logger.info("K/V cache %s: %s", dataset.cache_dir, report)


def preload_all_ranks(dataset: KVCacheDataset, batch_size: int = 8, num_workers: int = 0) -> dict:
    """Fill ``dataset``'s cache with every process of the process group; returns once the whole cache is there.

    Collective: every rank must call it. Each rank computes its shard (items ``rank::world_size`` of the
    datalist, written atomically as they finish), then all ranks wait for each other. Entries that a rank still
    cannot see after that were written on another node to a folder that is not shared (node-local disks): the
    processes of this node compute them, shared by local rank, and all wait again. Without a process group, or
    with one process, this is ``dataset.preload(batch_size, num_workers)``.

    A rank that dies leaves only complete entries (and perhaps a ``.*.tmp`` file, never read as an entry);
    ``torchrun`` then stops the others, and the next run computes what is missing.

    Returns:
        this rank's report (see :meth:`KVCacheDataset.preload`), with ``"not_visible"``: the entries of other
        ranks it did not see after the first wait.
    """
    if not is_distributed():
        return dataset.preload(batch_size=batch_size, num_workers=num_workers)
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # without torchrun's LOCAL_WORLD_SIZE every process of a node fills all it misses: redundant, still correct
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return _preload_sharded(dataset, batch_size, num_workers, rank, world_size, local_rank, local_world_size, barrier)


def _preload_sharded(
    dataset: KVCacheDataset,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    wait: Callable[[], None],
) -> dict:
    """:func:`preload_all_ranks` with the process layout and the barrier given (testable without processes)."""
    report = dataset.preload(batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size)
    wait()
    missing = [item for item in dataset.data if not dataset.is_cached(item)]
    report["not_visible"] = len(missing)
    if missing:
        logger.warning(
            "rank %d: %d of %d cache entries written by other processes are not visible in %s (a cache folder that "
            "is not shared between nodes?); this node computes them itself.",
            rank,
            len(missing),
            len(dataset.data),
            dataset.cache_dir,
        )
        local = dataset.preload(
            batch_size=batch_size, num_workers=num_workers, rank=local_rank, world_size=local_world_size, items=missing
        )
        report["computed"] += local["computed"]
    wait()
    return report
