"""Helpers the whole package shares: atomic file writes, SHA-256 digests of files, of tensors and of weights,
whether a network is being traced or exported, the escaped form in which file paths are written to reports, and
where the package's copy of the bundle's files is."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
import torch.nn as nn

__all__ = [
    "BUNDLE_FILES",
    "atomic_write",
    "bundle_dir",
    "config_files",
    "escape_path",
    "exporting",
    "file_digest",
    "state_dict_sha256",
    "unescape_path",
    "weights_digest",
]


#: Where the package finds the bundle (a link to ``bundles/fpt_classification`` in a clone).
BUNDLE_FILES = "bundle_files"


def bundle_dir() -> Path:
    """The bundle folder: ``bundles/fpt_classification`` of a clone, or its copy inside an installed wheel."""
    # in a clone, fpt_monai/bundle_files links to bundles/fpt_classification; a wheel carries the files there
    path = (Path(__file__).parent / BUNDLE_FILES).resolve()
    if not (path / "configs" / "train.json").is_file():
        raise FileNotFoundError(
            f"the bundle files are missing from this fpt_monai installation (looked in {path}); reinstall fpt-monai."
        )
    return path


def config_files(*names: str, root: str | os.PathLike | None = None) -> list[str]:
    """Paths of the bundle's config files, e.g. ``config_files("train", "demo")``."""
    configs = Path(root) / "configs" if root is not None else bundle_dir() / "configs"
    paths = [configs / f"{name}.json" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config files not found: {missing}")
    return [str(p) for p in paths]


def exporting() -> bool:
    """Whether the forward is being traced, scripted, compiled or exported.

    Such a forward must not loop over the batch in Python (the batch size would be frozen into the graph) nor call
    Python autograd functions, so the networks take their plain tensor paths then.
    """
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


@contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", what: str = "file", fsync: bool = False, **open_kwargs
) -> Iterator[IO]:
    """Write ``path`` all at once: readers see its old content or the whole new one, never a partial file.

    Yields a file opened on a temporary name in the same folder (two processes writing one path never share
    it); when the ``with`` block ends normally the file is closed (and flushed to disk with ``fsync=True``)
    and renamed to ``path``. When the block or the write fails the temporary file is removed and ``path`` is
    left as it was.

    Args:
        path: the file to write.
        mode: ``"wb"`` or ``"w"`` (text; further ``open`` arguments such as ``newline`` go in ``open_kwargs``).
        what: what the file is, for error messages (``"checkpoint"``, ``"cache entry"``, ...).
        fsync: flush the data to the disk before the rename (checkpoints: survive a power cut).

    Raises:
        OSError: when the file cannot be written (e.g. a full disk), naming ``path`` and saying whether a
            previous file of that name is kept. Other errors of the ``with`` block propagate unchanged.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_write writes files; mode must contain 'w', got {mode!r}.")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, mode, **open_kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        kept = f"the previous {what} of that name is kept" if path.exists() else f"no {what} was written"
        raise OSError(err.errno, f"could not write {what} {path}: {err.strerror or err}; {kept}") from err
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def state_dict_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (a state dict): names, dtypes, shapes and bytes of every tensor, in order."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (:func:`state_dict_sha256`).

    A frozen backbone (:class:`~fpt_monai.networks.FrozenViTBackbone`) answers from its own cached digest, the
    same value.
    """
    if callable(getattr(module, "weights_digest", None)):
        return module.weights_digest()
    return state_dict_sha256(module.state_dict())


#: A backslash, ``x`` and a byte 0x80-0xff in hexadecimal: what marks an escaped path (see :func:`escape_path`).
_ESCAPED = re.compile(r"\\x[89a-f][0-9a-f]", re.IGNORECASE)
_ESCAPE_SEQUENCE = re.compile(rb"\\(\\|x[0-9a-fA-F]{2})")


def escape_path(path: str | os.PathLike | bytes) -> str:
    """A file path as text that any UTF-8 file, log or table can hold, from which its bytes can be recovered.

    On Linux a file name is any sequence of bytes; Python hands out a name that is not valid UTF-8 (from an old
    Windows share, a Latin-1 archive) with each bad byte as a surrogate escape (``os.fsdecode(b"caf\\xe9.png")``),
    which no UTF-8 file can hold. The reports (``predictions.csv``, the data check reports) and the log write
    every path through this function:

    - a valid UTF-8 path is written exactly as it is (``Müller.png`` stays ``Müller.png``);
    - a path that is not valid UTF-8 is written with every backslash doubled and every byte that is not part of
      valid UTF-8 as ``\\xNN`` (two lower-case hexadecimal digits; such a byte is 0x80 or above):
      ``caf\\xe9.png``. A valid path that itself contains a backslash followed by ``x`` and such a byte is
      written the same way (backslashes doubled), so that it cannot be taken for an escaped one.

    A text holds an escaped path exactly when it contains ``\\x80``-``\\xff``; :func:`unescape_path` gives back the
    bytes (``os.fsdecode`` of them is the path Python opens).
    """
    raw = os.fspath(path)
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = os.fsencode(raw)  # surrogate escapes -> the name's own bytes
            except UnicodeEncodeError:  # other lone surrogates: their (invalid) UTF-8 bytes
                raw = raw.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if not _ESCAPED.search(text):
            return text
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape_path(text: str) -> bytes:
    """The bytes of a path written by :func:`escape_path` (``os.fsdecode(unescape_path(text))`` opens the file).

    A text without ``\\x80``-``\\xff`` is a path as it is (its UTF-8 bytes); in an escaped one ``\\\\`` is a
    backslash and ``\\xNN`` the byte NN.
    """
    raw = text.encode("utf-8", "surrogateescape")
    if not _ESCAPED.search(text):
        return raw
    return _ESCAPE_SEQUENCE.sub(
        lambda match: b"\\" if match.group(1) == b"\\" else bytes([int(match.group(1)[1:], 16)]), raw
    )


#: Bytes read at a time by :func:`file_digest`.
_CHUNK = 1 << 20
#: A file changed this close to (or after) the moment it was hashed is hashed again at its next use: file times are
#: coarse (a change within the same tick of the clock leaves them as they were).
_RECENT_NS = 2_000_000_000
_digests: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (the file's stat signature when hashed, digest)
_digests_lock = threading.Lock()


def _stat_signature(status: os.stat_result) -> tuple[int, ...]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, as hex: what identifies an image file's content (data splits, cache entries).

    The file is read in chunks of 1 MiB. SHA-256 runs through OpenSSL, which uses the CPU's SHA instructions
    where it has them (its cost per image: ``benchmarks/results/file_digest.md``).

    A process hashes each file once: the digest is kept with the file's device, inode, size, modification and
    change times, and given again while they are unchanged. Every write to a file sets its change time (which no
    ``touch``, ``cp -p``, ``rsync -t`` or tar extraction can set back), so a file rewritten in place with its old
    size and modification time is hashed again. A file changed within 2 s of being hashed is hashed again at its
    next use.

    Raises:
        OSError: when the file cannot be read (missing, a folder, no permission); the message names it.
    """
    path = os.fspath(path)
    key = os.path.abspath(path)
    with _digests_lock:
        known = _digests.get(key)
    if known is not None and known[0] == _stat_signature(os.stat(path)):
        return known[1]
    with open(path, "rb", buffering=0) as f:
        signature = _stat_signature(os.fstat(f.fileno()))
        started = time.time_ns()
        digest = hashlib.sha256()
        buffer = bytearray(min(_CHUNK, signature[2] + 1))  # a smaller file: one read, and no large buffer to zero
        view = memoryview(buffer)
        while count := f.readinto(buffer):
            digest.update(view[:count])
        value = digest.hexdigest()
    if max(signature[3], signature[4]) < started - _RECENT_NS:
        with _digests_lock:
            _digests[key] = (signature, value)
    return value
