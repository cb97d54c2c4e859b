"""The one file digest: SHA-256 of a file's bytes, hashed once per process and version of the file."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import fpt_monai.utils as utils
from fpt_monai.utils import file_digest


def rewrite_keeping_size_and_mtime(path, content: bytes) -> None:
    """Overwrite a file in place with as many other bytes and set its old times back, as ``cp -p``, ``rsync -t``
    and tar extraction leave a changed file."""
    status = os.stat(path)
    assert len(content) == status.st_size
    with open(path, "r+b") as f:
        f.write(content)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (status.st_size, status.st_mtime_ns)


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "x.bin"
    content = os.urandom(3 * (1 << 20) + 17)  # several chunks and a partial one
    path.write_bytes(content)
    assert file_digest(path) == file_digest(str(path)) == hashlib.sha256(content).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(OSError):
        file_digest(tmp_path / "missing")


def test_file_digest_hashes_a_file_once_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "_RECENT_NS", 0)  # the file counts as old enough to keep its digest at once
    hashed = []
    sha256 = hashlib.sha256

    def counting():
        hashed.append(1)
        return sha256()

    monkeypatch.setattr(utils.hashlib, "sha256", counting)
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 1000)
    time.sleep(0.05)  # file times are coarse: the rewrite below falls in a later tick
    first = file_digest(path)
    assert file_digest(path) == first and len(hashed) == 1
    rewrite_keeping_size_and_mtime(path, b"b" * 1000)
    assert file_digest(path) == sha256(b"b" * 1000).hexdigest() != first and len(hashed) == 2


def test_a_file_changed_just_after_it_was_hashed_is_hashed_again(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"a" * 1000)
    first = file_digest(path)
    rewrite_keeping_size_and_mtime(path, b"b" * 1000)  # possibly within the same tick of the file clock
    assert file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest() != first
