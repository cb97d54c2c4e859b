"""Image files for the tests of the reader's limits (shared with the bundle-level tests)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def huge_png(path: Path, height: int = 12000, width: int = 12000) -> Path:
    """A one-colour gray PNG of ``height`` x ``width`` written row by row (a few hundred KB; never in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row, parts = zlib.compressobj(9), b"\x00" + b"\x80" * width, []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path
