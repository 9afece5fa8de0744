"""What the simulated guest draws on its virtio-gpu framebuffers: pictures
in B, G, R, X bytes (the B8G8R8X8 format), built row by row with slice
assignments so a 1024x768 frame takes milliseconds, not seconds."""

from __future__ import annotations


def solid(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    r, g, b = rgb
    return bytes([b, g, r, 0]) * (width * height)


def picture(width: int, height: int) -> bytes:
    """A recognisable test card: a red-to-blue horizontal gradient whose
    green rises from top to bottom, a white frame 4 pixels in from the
    edge, a black-and-white checkerboard in the top-left quarter, a filled
    orange disc in the middle and a dark-green bar along the bottom."""
    out = bytearray(width * height * 4)
    red = bytes(255 - x * 255 // max(1, width - 1) for x in range(width))
    blue = bytes(x * 255 // max(1, width - 1) for x in range(width))
    cx, cy, radius = width // 2, height // 2, min(width, height) // 5
    cell = max(2, min(width, height) // 24)
    for y in range(height):
        row = bytearray(width * 4)
        row[0::4] = blue
        row[1::4] = bytes([y * 255 // max(1, height - 1)]) * width
        row[2::4] = red
        # checkerboard in the top-left quarter
        if 8 <= y < height // 4:
            for x0 in range(8, width // 4, cell):
                if ((x0 - 8) // cell + (y - 8) // cell) % 2 == 0:
                    x1 = min(x0 + cell, width // 4)
                    row[x0 * 4:x1 * 4] = b"\xff\xff\xff\x00" * (x1 - x0)
                else:
                    x1 = min(x0 + cell, width // 4)
                    row[x0 * 4:x1 * 4] = b"\x00\x00\x00\x00" * (x1 - x0)
        # the disc
        dy = y - cy
        if dy * dy <= radius * radius:
            half = int((radius * radius - dy * dy) ** 0.5)
            x0, x1 = max(0, cx - half), min(width, cx + half + 1)
            row[x0 * 4:x1 * 4] = b"\x00\xa5\xff\x00" * (x1 - x0)
        # the bottom bar
        if height - height // 10 <= y < height - 8:
            x0, x1 = width // 8, width - width // 8
            row[x0 * 4:x1 * 4] = b"\x20\x60\x00\x00" * (x1 - x0)
        # the frame
        if y in (4, height - 5):
            row[4 * 4:(width - 4) * 4] = b"\xff\xff\xff\x00" * (width - 8)
        elif 4 < y < height - 5 and width > 9:
            row[4 * 4:5 * 4] = row[(width - 5) * 4:(width - 4) * 4] = b"\xff\xff\xff\x00"
        out[y * width * 4:(y + 1) * width * 4] = row
    return bytes(out)


def cursor_arrow() -> bytes:
    """A 64x64 B, G, R, A cursor: an opaque black-edged white arrow whose
    tip is at (0, 0), and a half-transparent red square at (40..56, 40..56);
    transparent elsewhere."""
    img = bytearray(64 * 64 * 4)
    for y in range(32):
        for x in range(y // 2 + 1):
            edge = x == 0 or x == y // 2 or y == 31
            img[(y * 64 + x) * 4:(y * 64 + x) * 4 + 4] = b"\x00\x00\x00\xff" if edge else b"\xff\xff\xff\xff"
    for y in range(40, 56):
        for x in range(40, 56):
            img[(y * 64 + x) * 4:(y * 64 + x) * 4 + 4] = b"\x00\x00\xff\x80"
    return bytes(img)


def to_rgb(bgrx: bytes) -> bytes:
    """B, G, R, X bytes -> R, G, B bytes (what a PNG of it holds)."""
    rgb = bytearray(len(bgrx) // 4 * 3)
    rgb[0::3], rgb[1::3], rgb[2::3] = bgrx[2::4], bgrx[1::4], bgrx[0::4]
    return bytes(rgb)
