"""PNG encoding, 8-bit RGB, with the standard library's zlib.

A frame sink needs exactly one kind of PNG: truecolour, 8 bits per
channel, not interlaced. That is a signature, three chunks (IHDR, IDAT,
IEND) each with a CRC-32, and the rows zlib-compressed with a filter byte
in front of each (0: none). zlib and struct do all of it, so the bridge
takes no imaging library (and its native code) as a dependency for it.
"""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_RGB = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_rgb(width: int, height: int, rgb: bytes | bytearray | memoryview, *, level: int = 6) -> bytes:
    """The PNG file of a ``width`` x ``height`` image whose pixels are
    ``rgb``: R, G, B bytes, row after row, no padding."""
    if width < 1 or height < 1 or width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise ValueError(f"a PNG is 1 to 2^31-1 pixels a side, not {width}x{height}")
    row = width * 3
    if len(rgb) != row * height:
        raise ValueError(f"{len(rgb)} bytes of pixels for a {width}x{height} RGB image, expected {row * height}")
    raw = bytearray((row + 1) * height)  # filter byte 0 at the start of each row
    src = memoryview(rgb)
    for y in range(height):
        start = y * (row + 1) + 1
        raw[start:start + row] = src[y * row:(y + 1) * row]
    header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_RGB, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw), level))
            + _chunk(b"IEND", b""))
