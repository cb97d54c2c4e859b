"""Ignite handler that fills the preloading caches before the first epoch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fpt_monai.preload.dataset import KVCacheDataset

__all__ = ["PreloadHandler"]

logger = logging.getLogger(__name__)


class PreloadHandler:
    """On ``Events.STARTED``, fill the K/V caches of the given datasets with batched backbone inference.

    Attach it to the trainer (e.g. in a bundle's ``handlers`` list). What is cached stays cached: a run that was
    interrupted while preloading resumes where it stopped, and a finished cache costs one directory scan.

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
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        for dataset in self.datasets:
            report = dataset.preload(batch_size=self.batch_size, num_workers=self.num_workers)
            self.reports.append(report)
            logger.info("K/V cache %s: %s", dataset.cache_dir, report)
