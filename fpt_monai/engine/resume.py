"""Resuming a killed training run so that it ends exactly as an uninterrupted run would.

Two parts:

- :func:`attach_resume` loads the newest resume checkpoint (``<prefix>_checkpoint_epoch=N.pt``: network,
  optimizer, scheduler, trainer, best-metric bookkeeping) with MONAI's ``CheckpointLoader`` when the trainer
  starts, read with ``torch.load(weights_only=True)`` (nothing arbitrary is unpickled); a damaged or refused
  file stops the run with an error naming it. Training continues
  with epoch N + 1; a run killed in the middle of an epoch repeats that epoch from its start.
- :class:`EpochSeeder` reseeds every random generator at the start of each epoch from (seed, epoch, rank).
  Without it, epoch N + 1's shuffling, augmentation and dropout would depend on the random numbers drawn in
  epochs 1..N, which a resumed run never drew; with it, an epoch's randomness depends only on its number, so
  the resumed epochs replay the uninterrupted ones bit for bit (on the same hardware and software). ignite
  creates an epoch's data-loader iterator after ``EPOCH_STARTED``, so the shuffling order and the worker
  seeds of ``num_workers > 0`` are covered too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events
from monai.utils import set_determinism

from fpt_monai.engine.checkpoint import SafeCheckpointLoader, SafeCheckpointSaver

__all__ = ["EpochSeeder", "attach_resume", "checkpoint_epoch", "epoch_seed", "latest_checkpoint", "resume_objects"]

logger = logging.getLogger(__name__)


def resume_objects(network, optimizer, lr_scheduler, trainer, validation_handlers: Sequence = ()) -> dict:
    """What a resume checkpoint holds: ``{"model", "optimizer", "lr_scheduler", "trainer"}``, plus
    ``"best_checkpoint"``: the best-metric bookkeeping of the :class:`~fpt_monai.engine.SafeCheckpointSaver`
    with a key metric among ``validation_handlers`` (when there is one), so that a resumed run replaces the best
    checkpoint only with a better one, as the uninterrupted run would.
    """
    objects = {"model": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "trainer": trainer}
    savers = [h for h in validation_handlers or () if isinstance(h, SafeCheckpointSaver) and h.tracks_key_metric]
    if len(savers) > 1:
        raise ValueError(f"{len(savers)} key-metric checkpoint savers among the validation handlers; expected one.")
    if savers:
        objects["best_checkpoint"] = savers[0]
    return objects


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "resume", name: str = "checkpoint") -> Path | None:
    """The ``<prefix>_<name>_epoch=N.pt`` of ``ckpt_dir`` with the largest N, or ``None`` if there is none.

    ``name`` is ignite's: ``"checkpoint"`` for a checkpoint of several objects, else the one object's key.
    Temporary files of interrupted writes (``.<name>.tmp``) are never candidates.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}_{re.escape(name)}_epoch=(\d+)\.pt$")
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := pattern.match(path.name))]
    return max(found)[1] if found else None


def checkpoint_epoch(path: str | os.PathLike) -> int:
    """The epoch N of a ``<prefix>_<name>_epoch=N.pt`` checkpoint file."""
    return int(Path(path).stem.split("=")[-1])


def attach_resume(trainer: Engine, saver, map_location: str | None = "cpu", strict: bool = True) -> Path | None:
    """Make ``trainer`` resume from the newest resume checkpoint that ``saver`` wrote, if there is one.

    Args:
        trainer: the training engine (not yet running).
        saver: the ``CheckpointSaver`` of the resume checkpoints (its ``save_dir``, file prefix and
            ``save_dict`` say where they are and what they hold); a
            :class:`~fpt_monai.engine.SafeCheckpointSaver` also takes over the checkpoint as its latest, so
            it is removed once a newer one is written.
        map_location: where the loaded tensors go first (``"cpu"``; the objects move them to their device).
        strict: every object of ``save_dict`` must be in the checkpoint.

    Returns:
        The checkpoint that will be loaded, or ``None`` when there is none (training starts from scratch,
        with a warning).
    """
    interval = getattr(saver, "_interval_checkpoint", None)
    prefix = interval.filename_prefix if interval is not None else "resume"
    name = "checkpoint" if len(saver.save_dict) > 1 else next(iter(saver.save_dict))  # ignite's file naming
    path = latest_checkpoint(saver.save_dir, prefix, name)
    if path is None:
        logger.warning(
            "resume: no %s_%s_epoch=N.pt in %s; training starts from the beginning.", prefix, name, saver.save_dir
        )
        return None
    epoch = checkpoint_epoch(path)
    logger.info("resume: continuing after epoch %d from %s", epoch, path)
    advice = (
        "Delete it (or restore it from a copy): resuming then continues from the newest older resume checkpoint "
        f"in {path.parent}, or starts from the beginning when there is none."
    )
    SafeCheckpointLoader(
        load_path=str(path),
        load_dict=dict(saver.save_dict),
        map_location=map_location,
        strict=strict,
        what="resume checkpoint",
        advice=advice,
    ).attach(trainer)
    if interval is not None:  # this file is the saver's latest: n_saved then removes it in due course
        interval.load_state_dict({"_saved": [(epoch, path.name)]})
    return path


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 32-bit seed that depends only on (seed, epoch, rank), well mixed (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


class EpochSeeder:
    """On ``EPOCH_STARTED``, reseed Python, NumPy and PyTorch (all devices) from (seed, epoch, rank).

    Uses MONAI's ``set_determinism`` (which also keeps cuDNN deterministic). Attach it to the trainer.

    Args:
        seed: the run's seed (the bundle's ``seed``).
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        self.seed = int(seed)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        set_determinism(seed=epoch_seed(self.seed, engine.state.epoch, idist.get_rank()))
