"""One run at a time in an output folder: a lock file taken when a run starts and released when it ends.

Two runs writing into the same folder (the same ``bundle_root`` trained twice at once, an evaluation started
while training still writes its reports, two inferences on one ``eval/inference``) would interleave their files:
checkpoints, reports and predictions from both, each looking complete. :class:`RunLock` takes an exclusive
``fcntl.flock`` on ``<folder>/run.lock``, held open for the run's life, and writes who holds it there (process id,
host, start time, command line). A second run refuses with :class:`RunLockedError`, naming the running one.

The operating system drops the lock when the process ends, however it ends (an exception, Ctrl-C, ``kill -9``,
out of memory), so a crashed run never blocks the next one: the next run takes the lock, and warns that the
previous run (named from the file) ended without releasing it, so its outputs there may be incomplete.
``release`` (the bundle's ``finalize``) unlocks and empties the file. ``flock`` works on local file systems and
on NFS (Linux maps it to NFS byte-range locks); on Windows (no ``fcntl``) the lock is not taken, with a warning.

In a multi-process run (``torchrun``) only rank 0 takes the lock: the ranks of one run share its folder.
Within one process, a run that takes a folder an earlier run of the same process still holds (an earlier
``ConfigWorkflow`` that never reached ``finalize``) takes the lock over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fpt_monai.engine.distributed import rank_and_world_size

__all__ = ["LOCK_FILE_NAME", "RunLock", "RunLockedError"]

logger = logging.getLogger(__name__)

#: The lock file's name in the locked folder.
LOCK_FILE_NAME = "run.lock"
# folders this process holds: resolved path -> the RunLock holding it
_HELD: dict[str, RunLock] = {}
_HELD_LOCK = threading.RLock()


class RunLockedError(RuntimeError):
    """Another run holds the output folder; the message names it (process id, host, start time, command)."""


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run that did not say who it is"
    pid, host, started = (holder.get(key, "?") for key in ("pid", "host", "started"))
    return f"pid {pid} on host {host}, started {started}, command: {holder.get('command', '?')}"


def _read_holder(file: Any) -> dict[str, Any] | None:
    """Who last wrote the lock file (``None`` when it is empty or not ours)."""
    try:
        file.seek(0)
        text = file.read().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return {"command": "(unreadable lock file)"}


class RunLock:
    """An exclusive lock on an output folder for one run (see the module docstring).

    The bundle's configs hold one as ``run_lock`` and call ``$@run_lock.acquire()`` at the end of ``initialize``
    and ``$@run_lock.release()`` in ``finalize``. It is also a context manager.

    Args:
        folder: the run's output folder (created if missing); the lock file is ``folder/run.lock``.
        enabled: ``False`` makes ``acquire``/``release`` do nothing (the bundle's ``--run_lock#enabled False``,
            e.g. for file systems without locking).
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True) -> None:
        if not isinstance(folder, (str, os.PathLike)) or not str(folder):
            raise TypeError(f"folder must be a folder path, got {type(folder).__name__} {folder!r:.60}.")
        self.folder = Path(folder)
        self.enabled = bool(enabled)
        self._file: Any = None

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_FILE_NAME

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._file is not None

    def acquire(self) -> RunLock:
        """Take the folder for this run, or raise :class:`RunLockedError` naming the run that has it.

        Does nothing when disabled, already held, on a rank other than 0 of a multi-process run, or where the
        platform has no ``fcntl`` (warned).
        """
        if not self.enabled or self.held:
            return self
        if rank_and_world_size()[0] > 0:
            return self  # rank 0 holds the folder for the whole run
        try:
            import fcntl  # POSIX only: imported here so that the package imports on Windows, unlocked
        except ImportError:
            logger.warning("No file locking on this platform: %s is not protected from a second run.", self.folder)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_LOCK:
            earlier = _HELD.get(key)
            if earlier is not None and earlier is not self:
                logger.warning(
                    "%s is held by an earlier run in this process that did not finish (no finalize); taking it over.",
                    self.folder,
                )
                earlier.release()
            file = open(self.path, "a+", encoding="utf-8")  # held open for the run's life
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(file)
                file.close()
                raise RunLockedError(
                    f"{self.folder} is in use by another run ({_describe(holder)}). Two runs writing into one folder "
                    "would mix their outputs: wait for that run to finish, or give this run its own folder (another "
                    f"--bundle_root or --output_dir). The lock is {self.path}; the operating system drops it when "
                    "that process ends."
                ) from err
            previous = _read_holder(file)
            if previous:
                logger.warning(
                    "The previous run in %s (%s) ended without releasing it (it failed, was interrupted or killed): "
                    "its outputs there may be incomplete. Taking the folder over.",
                    self.folder,
                    _describe(previous),
                )
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join(sys.argv) or sys.executable,
            }
            file.seek(0)
            file.truncate()
            file.write(json.dumps(holder) + "\n")
            file.flush()
            self._file = file
            _HELD[key] = self
        return self

    def release(self) -> None:
        """Unlock the folder and empty the lock file (nothing to do when not held)."""
        if self._file is None:
            return
        import fcntl  # POSIX only (held implies that acquire imported it)

        file, self._file = self._file, None
        with _HELD_LOCK:
            key = os.path.realpath(self.path)
            if _HELD.get(key) is self:
                del _HELD[key]
            try:
                file.seek(0)
                file.truncate()  # an empty file: released normally (a full one tells the next run of a crash)
                file.flush()
            except OSError as err:
                logger.warning("Could not empty the lock file %s (%s).", self.path, err)
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)
                file.close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.folder)!r}, held={self.held})"
