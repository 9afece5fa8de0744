"""PNG encoding (8-bit RGB) and reading back, with the standard library's zlib.

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


# -- reading back (the smoke harness, the demo and the tests compare frames
# pixel for pixel with it; it undoes every row filter and checks every
# CRC, so it also reads what other encoders write, a browser's screenshot)

_CHANNELS = {0: 1, 2: 3, 6: 4}  # greyscale, RGB, RGBA at 8 bits


class PngError(ValueError):
    """Not a PNG this reader takes (the message says why)."""


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _chunks(data: bytes) -> tuple[tuple[int, ...], bytes]:
    """The IHDR fields and the joined IDAT data, every CRC checked."""
    if not data.startswith(SIGNATURE):
        raise PngError("no PNG signature")
    pos, header, idat = len(SIGNATURE), None, bytearray()
    while True:
        if pos + 12 > len(data):
            raise PngError("no IEND chunk (the file is cut short)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if pos + 12 + length > len(data):
            raise PngError(f"chunk {kind!r} is cut short")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise PngError(f"bad CRC on chunk {kind!r}")
        if kind == b"IHDR":
            if length != 13:
                raise PngError(f"an IHDR of {length} bytes")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise PngError("no IHDR chunk")
    return header, bytes(idat)


def decode_rgb(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, R G B bytes row after row) of a PNG file's contents:
    8-bit greyscale, RGB or RGBA (alpha dropped), not interlaced."""
    (width, height, depth, colour, _comp, _filter, interlace), idat = _chunks(data)
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise PngError(f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}")
    bpp = _CHANNELS[colour]
    try:
        raw = zlib.decompress(idat)
    except zlib.error as exc:
        raise PngError(f"image data does not decompress: {exc}") from None
    stride = width * bpp
    if len(raw) != (stride + 1) * height:
        raise PngError(f"{len(raw)} bytes of image data for {width}x{height}")
    out = bytearray(stride * height)
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                upleft = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + _paeth(left, prev[i], upleft)) & 0xFF
        elif ftype != 0:
            raise PngError(f"row {y}: filter type {ftype}")
        out[y * stride:(y + 1) * stride] = line
        prev = line
    if colour == 2:
        return width, height, bytes(out)
    rgb = bytearray(width * height * 3)
    if colour == 6:
        rgb[0::3], rgb[1::3], rgb[2::3] = out[0::4], out[1::4], out[2::4]
    else:
        rgb[0::3] = rgb[1::3] = rgb[2::3] = out
    return width, height, bytes(rgb)


def read_rgb(path: str) -> tuple[int, int, bytes]:
    """:func:`decode_rgb` of a file."""
    with open(path, "rb") as f:
        return decode_rgb(f.read())
