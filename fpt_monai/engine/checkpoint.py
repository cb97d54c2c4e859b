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

Reading: :func:`load_checkpoint` reads a checkpoint without unpickling arbitrary objects and with errors that
name the file and say what to do (a truncated or damaged file, a file holding pickled objects);
:class:`SafeCheckpointLoader` is MONAI's ``CheckpointLoader`` reading through it.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from fpt_monai._compat import checkpoint_saver_checkpoints
from fpt_monai.networks.fpt import FPTNet
from fpt_monai.utils import atomic_write

__all__ = ["AtomicDiskSaver", "CheckpointReadError", "SafeCheckpointLoader", "SafeCheckpointSaver", "load_checkpoint"]

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
        with atomic_write(path, what="checkpoint", fsync=True) as f:  # the old checkpoint or the whole new one
            try:
                torch.save(checkpoint, f, **self.kwargs)
            except RuntimeError as err:
                # torch's zip writer reports a failed write (a full disk) as a RuntimeError of its C++ code
                # ("enforce fail at inline_container.cc", "PytorchStreamWriter failed writing file")
                raise OSError(errno.EIO, f"{err} (is the disk full?)") from err
        os.chmod(path, os.stat(path).st_mode | stat.S_IRGRP | stat.S_IROTH)

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


class CheckpointReadError(RuntimeError):
    """A checkpoint file that cannot be read: truncated, damaged, or not a PyTorch checkpoint."""


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint", advice: str | None = None
) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do.

    Args:
        path: the checkpoint file.
        map_location: where the tensors go.
        what: what the file is, for messages (``"resume checkpoint"``, ...).
        advice: what to do about a damaged file (default: restore it from a copy or train again).

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file holds pickled objects other than tensors and plain containers; they
            are refused, as unpickling them could run any code.
        CheckpointReadError: the file is truncated or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist{' (it is a folder)' if path.is_dir() else ''}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, i.e. running the file's code: keep only its reason
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", str(err)) if p.strip()]
        reason = " ".join(p for p in paragraphs[1:] if not p.startswith("Check the documentation"))
        raise pickle.UnpicklingError(
            f"{what} {path} was refused: it holds pickled objects other than tensors and plain containers "
            f"({reason or 'not a weights-only checkpoint'}), and unpickling them could run any "
            "code. Load only checkpoints this package wrote, or re-save a trusted one as a plain state dict "
            "(torch.save(model.state_dict(), ...))."
        ) from err
    except Exception as err:  # torch raises RuntimeError (zip), EOFError, KeyError, ... for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointReadError(
            f"{what} {path} cannot be read ({type(err).__name__}: {reason}): the file is truncated or damaged "
            f"(an interrupted copy, a full disk). {advice or 'Restore it from a copy, or train again.'}"
        ) from err


def _allow_missing_backbone_digest(objects: Mapping) -> None:
    for obj in objects.values():
        for module in obj.modules() if isinstance(obj, torch.nn.Module) else ():
            if isinstance(module, FPTNet):
                module.allow_missing_backbone_digest = True


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` (same arguments) whose errors name the checkpoint file and say what to do.

    The file is first read with :func:`load_checkpoint` (a truncated or damaged file, or one holding pickled
    objects, gives a clear error), and a failure to load it into the objects (another network, another
    backbone) names the file too.

    Args:
        load_path, load_dict, name, map_location, strict, strict_shape: as ``CheckpointLoader``.
        allow_missing_backbone_digest: accept a checkpoint of an :class:`~fpt_monai.networks.FPTNet` that has no
            backbone digest (``backbone_sha256``): you vouch that it was trained with this backbone.
        what: what the file is, for messages.
        advice: what to do about a damaged file (see :func:`load_checkpoint`).
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        name: str | None = None,
        map_location: Any = None,
        strict: bool = True,
        strict_shape: bool = True,
        allow_missing_backbone_digest: bool = False,
        what: str = "checkpoint",
        advice: str | None = None,
    ) -> None:
        super().__init__(
            load_path, load_dict, name=name, map_location=map_location, strict=strict, strict_shape=strict_shape
        )
        self.allow_missing_backbone_digest = bool(allow_missing_backbone_digest)
        self.what, self.advice = what, advice

    def __call__(self, engine: Engine) -> None:
        # read once here for the errors; MONAI's loader then reads the (small: what learns) file again
        load_checkpoint(self.load_path, map_location="cpu", what=self.what, advice=self.advice)
        if self.allow_missing_backbone_digest:
            _allow_missing_backbone_digest(self.load_dict)
        try:
            super().__call__(engine)
        except (RuntimeError, KeyError, ValueError) as err:  # another network or backbone, missing objects
            error = ValueError if isinstance(err, ValueError) else RuntimeError
            raise error(f"could not load {self.what} {self.load_path}: {err}") from err
