"""What identifying image files by their content costs: :func:`fpt_monai.utils.file_digest` over a data set.

Writes ``num_files`` distinct 512x512 RGB images (PNG, or JPEG at quality 90) of a smooth random field with sensor-
like noise, then hashes every file: once on one thread as the first use in a process does (the files are in the
page cache, as they are after the data check has read them), once on ``threads`` threads as the data check's pass
does, and once more on one thread, where each digest is known already (what the cache's reads of every epoch pay:
one ``stat`` per file). The images are ``bases`` rendered images, each written several times with a distinct
``tEXt`` chunk (PNG) or comment (JPEG): every file has its own bytes and a realistic size.
"""

from __future__ import annotations

import io
import os
import platform
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import fpt_monai.utils as utils
from fpt_monai.utils import file_digest

__all__ = ["run", "write_images"]


def _render(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (9, 9, 3)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 2.0, smooth.shape), 0, 255).astype(np.uint8)


def _png_with_text(png: bytes, text: bytes) -> bytes:
    """The PNG with a ``tEXt`` chunk inserted before its ``IEND`` chunk (12 bytes, at the end)."""
    body = b"tEXt" + b"id\x00" + text
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]


def write_images(folder: str | os.PathLike, num_files: int, image_format: str = "png", bases: int = 50,
                 size: int = 512) -> list[str]:
    """``num_files`` distinct image files in ``folder`` (see the module); returns their paths."""
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoded = []
    for seed in range(min(bases, num_files)):
        buffer = io.BytesIO()
        pixels = Image.fromarray(_render(seed, size))
        pixels.save(buffer, format="PNG") if image_format == "png" else pixels.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    paths = []
    for index in range(num_files):
        base, tag = encoded[index % len(encoded)], f"{index:08d}".encode()
        # JPEG: a comment segment right after the SOI marker
        content = _png_with_text(base, tag) if image_format == "png" else (
            base[:2] + b"\xff\xfe" + struct.pack(">H", len(tag) + 2) + tag + base[2:])
        path = folder / f"{index:06d}.{'png' if image_format == 'png' else 'jpg'}"
        path.write_bytes(content)
        paths.append(str(path))
    return paths


def run(num_files: int = 10_000, work_dir: str = "/tmp/fpt_file_digest", image_format: str = "png",
        threads: int = 8, bases: int = 50) -> dict:
    """Write the files (reused when ``work_dir`` already holds them) and time the hashing; returns a report."""
    folder = Path(work_dir) / image_format
    extension = "png" if image_format == "png" else "jpg"
    paths = sorted(str(p) for p in folder.glob(f"*.{extension}")) if folder.is_dir() else []
    if len(paths) != num_files:
        paths = write_images(folder, num_files, image_format, bases)
    sizes = [os.path.getsize(p) for p in paths]
    for path in paths:  # into the page cache, as after the data check's reading
        Path(path).read_bytes()
    time.sleep(2.1)  # past the 2 s after their writing within which a digest is not kept

    utils._digests.clear()
    start = time.perf_counter()
    for path in paths:
        file_digest(path)
    one_thread = time.perf_counter() - start

    utils._digests.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(file_digest, paths))
    threaded = time.perf_counter() - start

    start = time.perf_counter()
    for path in paths:
        file_digest(path)
    known = time.perf_counter() - start

    megabytes = sum(sizes) / 1e6
    return {
        "files": num_files,
        "format": image_format,
        "megabytes": round(megabytes, 1),
        "mean_kb": round(sum(sizes) / len(sizes) / 1e3, 1),
        "min_kb": round(min(sizes) / 1e3, 1),
        "max_kb": round(max(sizes) / 1e3, 1),
        "one_thread_seconds": round(one_thread, 2),
        "one_thread_mb_per_s": round(megabytes / one_thread, 1),
        "ms_per_image": round(one_thread / num_files * 1e3, 3),
        f"{threads}_threads_seconds": round(threaded, 2),
        "known_digests_seconds": round(known, 3),
        "known_digest_us_per_image": round(known / num_files * 1e6, 1),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
