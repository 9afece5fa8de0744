"""bridge.png's reader (the smoke harness, the demo and the tests use it):
what the bridge writes reads back exactly, the other row filters decode as
the PNG spec says, and a file cut short is an error, not a wrong picture."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from bridge import png
from bridge.png import PngError, decode_rgb


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of(width: int, height: int, rows: list[bytes], colour: int = 2) -> bytes:
    head = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (png.SIGNATURE + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def test_what_the_bridge_writes_reads_back_exactly():
    rgb = random.Random(1).randbytes(37 * 23 * 3)
    assert decode_rgb(png.encode_rgb(37, 23, rgb)) == (37, 23, rgb)


def test_each_row_filter_decodes_as_the_spec_says():
    # 2x2 RGB. Row 0 with Sub (1): the second pixel is a delta on the first.
    # Row 1 with Up (2): deltas on row 0. A third row with Average (3) and a
    # fourth with Paeth (4) on top.
    rows = [
        b"\x01" + bytes([10, 20, 30, 5, 5, 5]),          # -> 10 20 30 | 15 25 35
        b"\x02" + bytes([1, 1, 1, 255, 0, 0]),           # -> 11 21 31 | 14 25 35
        b"\x03" + bytes([0, 0, 0, 0, 0, 0]),             # -> 5 10 15 | (5+14)//2=9 (10+25)//2=17 (15+35)//2=25
        b"\x04" + bytes([0, 0, 0, 0, 0, 0]),             # Paeth of (left, up, up-left)
    ]
    width, height, rgb = decode_rgb(png_of(2, 4, rows))
    assert (width, height) == (2, 4)
    assert rgb[:6] == bytes([10, 20, 30, 15, 25, 35])
    assert rgb[6:12] == bytes([11, 21, 31, 14, 25, 35])
    assert rgb[12:18] == bytes([5, 10, 15, 9, 17, 25])
    # first pixel: left 0, up-left 0 -> up; second: p = left + up - corner, nearest of the three
    assert rgb[18:21] == bytes([5, 10, 15])
    assert rgb[21:24] == bytes([9, 17, 25])


def test_rgba_drops_the_alpha():
    rows = [b"\x00" + bytes([1, 2, 3, 4, 5, 6, 7, 8])]
    assert decode_rgb(png_of(2, 1, rows, colour=6)) == (2, 1, bytes([1, 2, 3, 5, 6, 7]))


@pytest.mark.parametrize("cut", [10, 40, -13])
def test_a_file_cut_short_is_an_error(cut):
    data = png.encode_rgb(8, 8, bytes(8 * 8 * 3))
    with pytest.raises((PngError, zlib.error)):
        decode_rgb(data[:cut])
