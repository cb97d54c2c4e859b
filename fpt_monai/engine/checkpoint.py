"""Checkpoints that are never half-written: MONAI's ``CheckpointSaver`` with atomic, full-disk-safe writes.

MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` straight into the final file, and
ignite deletes the previous checkpoint *before* writing the next one. A full disk or a kill during the write
therefore leaves a truncated ``model.pt`` or ``resume_checkpoint_epoch=N.pt`` - or none at all - which a
later run reads. :class:`SafeCheckpointSaver` keeps MONAI's behaviour and file names but writes each checkpoint
to a temporary file in the same folder, flushes it to disk and renames it into place; an old checkpoint is
removed only after its successor is complete. A failed write raises an ``OSError`` that names the file and
says the previous checkpoint is kept; no partial file remains.

It also has a ``state_dict`` (the best-metric bookkeeping of ``save_key_metric``), so a resumed run keeps
choosing the best checkpoint as an uninterrupted run would (see :mod:`fpt_monai.engine.resume`).
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

from fpt_monai._compat import checkpoint_saver_checkpoints

__all__ = ["AtomicDiskSaver", "SafeCheckpointSaver"]

logger = logging.getLogger(__name__)


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes atomically and removes superseded files only after a successful write.

    Args:
        dirname: the checkpoint folder (created).
        filename: a fixed file name for every save (MONAI's ``final_filename``/``key_metric_filename``), or
            ``None`` for ignite's names.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=True, create_dir=True)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename if self.filename is not None else filename
        if idist.get_rank() != self.save_on_rank:
            return
        self._write(checkpoint, Path(self.dirname) / name)
        # only now that the new checkpoint is complete may the ones it replaces go
        for old in self._superseded:
            if old != name:
                (Path(self.dirname) / old).unlink(missing_ok=True)
        self._superseded = []

    def _write(self, checkpoint: Mapping, path: Path) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f, **self.kwargs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)  # readers see the old checkpoint or the whole new one
            os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            kept = "the previous checkpoint of that name is kept" if path.exists() else "no checkpoint was written"
            raise OSError(err.errno, f"could not write checkpoint {path}: {err.strerror or err}; {kept}") from err
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def remove(self, filename: str) -> None:
        """Defer removal until the next checkpoint is written (a fixed file name is simply overwritten)."""
        if self.filename is None:
            self._superseded.append(filename)


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments and files) with atomic writes and a resumable best-metric state.

    See the module docstring. ``state_dict``/``load_state_dict`` carry the key-metric bookkeeping (which
    checkpoint is the best so far, and its score) and can go into a resume checkpoint's ``save_dict``.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        final_filename = kwargs.get("final_filename")
        key_metric_filename = kwargs.get("key_metric_filename")
        checkpoints = checkpoint_saver_checkpoints(self)
        for kind, filename in (("final", final_filename), ("key_metric", key_metric_filename), ("interval", None)):
            checkpoint = checkpoints[kind]
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename)

    @property
    def tracks_key_metric(self) -> bool:
        """Whether this saver keeps the best checkpoint by a key metric (``save_key_metric=True``)."""
        return checkpoint_saver_checkpoints(self)["key_metric"] is not None

    @property
    def interval_checkpoint(self) -> Checkpoint | None:
        """The ignite ``Checkpoint`` of the interval (e.g. per-epoch resume) checkpoints, if any."""
        return checkpoint_saver_checkpoints(self)["interval"]

    def state_dict(self) -> dict:
        """The best-metric bookkeeping: ``{"saved": [(score, file name), ...]}`` (empty without a key metric)."""
        key_metric = checkpoint_saver_checkpoints(self)["key_metric"]
        if key_metric is None:
            return {"saved": []}
        saved = key_metric.state_dict()["_saved"]
        return {"saved": [(float(priority), str(filename)) for priority, filename in saved]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`; the best checkpoint is then only replaced by a better one."""
        key_metric = checkpoint_saver_checkpoints(self)["key_metric"]
        if key_metric is not None:
            key_metric.load_state_dict({"_saved": [tuple(item) for item in state_dict["saved"]]})
