"""A cache on storage the run cannot write: complete, it is used; incomplete, one clear error names the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preload_setup import make_dataset, write_images

TESTS = Path(__file__).resolve().parent.parent

#: Run in a child process on read-only caches: for each, preload, then read every item in a data loader worker.
CHILD = """
import json, sys, torch
from preload_setup import make_dataset
from fpt_monai.preload import CacheNotWritableError
data = json.loads(sys.argv[1])
for name, cache in zip(("COMPLETE", "INCOMPLETE"), sys.argv[2:]):
    dataset = make_dataset(data, cache, augment=False)
    try:
        dataset.preload()
    except CacheNotWritableError as err:
        print(name, "PRELOAD:", err)
    try:
        list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1))
    except Exception as err:
        print(name, "WORKER:", type(err).__name__, str(err).replace(chr(10), " "))
    else:
        print(name, "READ ALL")
"""


def run_on_read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run :data:`CHILD` with ``folder`` read-only: a read-only bind mount for root (whom permissions do not stop),
    the folder's write permission removed otherwise."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")] if path.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            return subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True,
                                  timeout=300)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a read-only folder")
    script = 'mount --bind -o ro "$0" "$0" || exit 77; exec "$@"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), sys.executable, "-c", CHILD, *args],
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a read-only folder here: {result.stderr[-200:]}")
    return result


def test_an_incomplete_read_only_cache_is_one_clear_error_naming_the_folder_and_the_fixes(tmp_path):
    data = write_images(tmp_path / "images")
    dataset = make_dataset(data, tmp_path / "caches" / "complete", augment=False)
    dataset.preload()
    shutil.copytree(tmp_path / "caches" / "complete", tmp_path / "caches" / "incomplete")
    incomplete = make_dataset(data, tmp_path / "caches" / "incomplete", augment=False)
    incomplete.entry_path(data[1]).unlink()  # one entry missing
    result = run_on_read_only(tmp_path / "caches", json.dumps(data), *(str(tmp_path / "caches" / n) for n in
                                                                      ("complete", "incomplete")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "COMPLETE READ ALL"  # a whole cache is used as it is
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}
    for where in ("PRELOAD", "WORKER"):  # preloading, and reading an item in a data loader worker
        message = lines[f"INCOMPLETE {where}"]
        assert f"the K/V cache {incomplete.cache_dir} lacks 1 of its entries and cannot be written there" in message
        assert "Make the folder writable, point cache_dir at a writable folder" in message
        assert "preload the cache where it is writable" in message
    assert "CacheNotWritableError" in lines["INCOMPLETE WORKER"]
