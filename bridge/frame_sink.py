"""What a vhost-user-gpu daemon shows: the framebuffer of each scanout and
the cursor, composed from the display channel's messages, and PNG
snapshots of them.

Pixels are kept as the daemon sends them, XRGB8888 on a little-endian host
(bytes B, G, R, X), one bytearray per scanout; an update overwrites its
rectangle row by row. A new SCANOUT size starts a black framebuffer.

The cursor (64x64 ARGB, a hot spot, a position, shown or hidden) is kept
apart and drawn only into frames that ask for it (``frame(cursor=True)``,
or ``draw_cursor`` for the snapshots): its image's top-left corner goes at
(x - hot_x, y - hot_y), blended as out = (src * a + dst * (255 - a) + 127)
// 255 per channel, clipped to the scanout.

Snapshots: ``write_png`` writes ``NAME-scanoutN-SEQ.png`` (SEQ counts the
sink's snapshots from 1) in ``output_dir``, encoding in a worker thread
from a copy of the pixels, so the display channel does not wait on zlib;
with ``png_every_flush`` every presented frame is written.
"""

from __future__ import annotations

import logging
import os

import attrs
import trio

from bridge import png

log = logging.getLogger(__name__)

CURSOR_SIZE = 64


@attrs.frozen
class Frame:
    """One picture: ``rgb`` holds R, G, B bytes row after row."""

    width: int
    height: int
    rgb: bytes

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = (y * self.width + x) * 3
        return self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]


@attrs.define
class Cursor:
    scanout: int = 0
    x: int = 0
    y: int = 0
    hot_x: int = 0
    hot_y: int = 0
    image: bytes = b""
    """64x64 pixels, bytes B, G, R, A; empty until the first CURSOR_UPDATE."""
    visible: bool = False


def xrgb_to_rgb(xrgb: bytes | bytearray, width: int, height: int) -> bytearray:
    """B, G, R, X bytes -> R, G, B bytes."""
    rgb = bytearray(width * height * 3)
    rgb[0::3] = xrgb[2::4]
    rgb[1::3] = xrgb[1::4]
    rgb[2::3] = xrgb[0::4]
    return rgb


def blend_cursor(rgb: bytearray, width: int, height: int, cursor: Cursor) -> None:
    """Draw the cursor into an RGB picture (see the module docstring)."""
    left, top = cursor.x - cursor.hot_x, cursor.y - cursor.hot_y
    img = cursor.image
    for cy in range(CURSOR_SIZE):
        y = top + cy
        if not 0 <= y < height:
            continue
        for cx in range(CURSOR_SIZE):
            x = left + cx
            if not 0 <= x < width:
                continue
            s = (cy * CURSOR_SIZE + cx) * 4
            a = img[s + 3]
            if a == 0:
                continue
            d = (y * width + x) * 3
            for channel, src in ((0, img[s + 2]), (1, img[s + 1]), (2, img[s])):
                rgb[d + channel] = (src * a + rgb[d + channel] * (255 - a) + 127) // 255


class FrameSink:
    """The display channel's sink (vhost_user.gpu_display.DisplaySink)."""

    def __init__(self, *, output_dir: str | None = None, png_every_flush: bool = False, draw_cursor: bool = False,
                 name: str = "gpu", level: int = 3) -> None:
        if png_every_flush and output_dir is None:
            raise ValueError("PNGs on every flush need an output directory")
        self.output_dir = output_dir
        self.png_every_flush = png_every_flush
        self.draw_cursor = draw_cursor
        self.name = name
        self.level = level
        self._pixels: dict[int, bytearray] = {}
        self._sizes: dict[int, tuple[int, int]] = {}
        self.cursor = Cursor()
        self.flushes = 0
        """Frames presented (UPDATE or DMABUF_UPDATE), all scanouts."""
        self.updates = 0
        self.snapshots = 0
        self.last_png: dict[int, str] = {}
        self.png_error: str | None = None
        """Why the last PNG on a flush could not be written (None: it was)."""
        self.version = 0
        """Counts changes (frames, scanout sizes, the cursor)."""
        self._changed = trio.Event()
        self._write_lock = trio.Lock()

    # -- the display channel's calls

    def set_scanout(self, scanout: int, width: int, height: int) -> None:
        if width and height:
            if self._sizes.get(scanout) != (width, height):
                self._pixels[scanout] = bytearray(width * height * 4)
                self._sizes[scanout] = (width, height)
            log.info("%s: scanout %d is %dx%d", self.name, scanout, width, height)
        else:
            self._pixels.pop(scanout, None)
            self._sizes.pop(scanout, None)
            log.info("%s: scanout %d is off", self.name, scanout)
        self._notify()

    def update(self, scanout: int, x: int, y: int, width: int, height: int, data: bytes | memoryview) -> None:
        fb = self._pixels.get(scanout)
        if fb is None:
            raise ValueError(f"update for scanout {scanout}, which is off")
        stride = self._sizes[scanout][0] * 4
        row = width * 4
        src = memoryview(data)
        for r in range(height):
            start = (y + r) * stride + x * 4
            fb[start:start + row] = src[r * row:(r + 1) * row]
        self.updates += 1

    async def presented(self, scanout: int) -> None:
        self.flushes += 1
        self._notify()
        if self.png_every_flush and scanout in self._sizes:
            try:
                await self.write_png(scanout)
            except OSError as exc:
                # The frames keep coming; say so once per kind of failure.
                message = f"{exc.strerror or exc} (in {self.output_dir})"
                if message != self.png_error:
                    log.error("%s: cannot write PNG snapshots: %s", self.name, message)
                self.png_error = message
            else:
                self.png_error = None

    def cursor_move(self, scanout: int, x: int, y: int, visible: bool) -> None:
        c = self.cursor
        c.scanout, c.x, c.y, c.visible = scanout, x, y, visible and bool(c.image)
        self._notify()

    def cursor_update(self, scanout: int, x: int, y: int, hot_x: int, hot_y: int, image: bytes) -> None:
        if len(image) != CURSOR_SIZE * CURSOR_SIZE * 4:
            raise ValueError(f"a cursor image is {CURSOR_SIZE * CURSOR_SIZE * 4} bytes, not {len(image)}")
        self.cursor = Cursor(scanout, x, y, hot_x, hot_y, bytes(image), True)
        self._notify()

    # -- what it shows

    def _notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait for the next change (a frame, a scanout size, the cursor)."""
        await self._changed.wait()

    def scanout_size(self, scanout: int = 0) -> tuple[int, int] | None:
        return self._sizes.get(scanout)

    @property
    def scanouts(self) -> list[int]:
        return sorted(self._sizes)

    def frame(self, scanout: int = 0, *, cursor: bool | None = None) -> Frame:
        """The scanout's picture now, with the cursor when asked (default:
        ``draw_cursor``) and it is shown on this scanout."""
        size = self._sizes.get(scanout)
        if size is None:
            raise LookupError(f"scanout {scanout} is off")
        width, height = size
        rgb = xrgb_to_rgb(self._pixels[scanout], width, height)
        if cursor is None:
            cursor = self.draw_cursor
        if cursor and self.cursor.visible and self.cursor.scanout == scanout:
            blend_cursor(rgb, width, height, self.cursor)
        return Frame(width, height, bytes(rgb))

    def png(self, scanout: int = 0, *, cursor: bool | None = None) -> bytes:
        frame = self.frame(scanout, cursor=cursor)
        return png.encode_rgb(frame.width, frame.height, frame.rgb, level=self.level)

    async def write_png(self, scanout: int = 0, *, cursor: bool | None = None) -> str:
        """Write the scanout as a PNG in ``output_dir``; returns its path."""
        if self.output_dir is None:
            raise ValueError("no output directory for PNG snapshots (--gpu-output DIR)")
        frame = self.frame(scanout, cursor=cursor)
        async with self._write_lock:
            self.snapshots += 1
            path = os.path.join(self.output_dir, f"{self.name}-scanout{scanout}-{self.snapshots:05d}.png")
            await trio.to_thread.run_sync(_write_file, path, frame, self.level)
        self.last_png[scanout] = path
        log.info("%s: wrote %s (%dx%d)", self.name, path, frame.width, frame.height)
        return path

    async def snapshot(self) -> list[str]:
        """A PNG of every scanout that is on (a snapshot on request)."""
        return [await self.write_png(s) for s in self.scanouts]


def _write_file(path: str, frame: Frame, level: int) -> None:
    data = png.encode_rgb(frame.width, frame.height, frame.rgb, level=level)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
