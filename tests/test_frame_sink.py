"""The frame sink (bridge.frame_sink) and its PNG encoder (bridge.png),
read back with bridge.png's reader, written from the PNG
specification."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from bridge import png
from bridge.frame_sink import CURSOR_SIZE, FrameSink


def rgb_of(xrgb: bytes) -> bytes:
    out = bytearray(len(xrgb) // 4 * 3)
    out[0::3], out[1::3], out[2::3] = xrgb[2::4], xrgb[1::4], xrgb[0::4]
    return bytes(out)


@pytest.mark.parametrize("w,h", [(1, 1), (3, 2), (640, 480)])
def test_png_round_trip(w, h):
    pixels = random.Random(w * h).randbytes(w * h * 3)
    data = png.encode_rgb(w, h, pixels)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert png.decode_rgb(data) == (w, h, pixels)


def test_png_refuses_a_wrong_pixel_count():
    with pytest.raises(ValueError, match="expected 12"):
        png.encode_rgb(2, 2, bytes(11))
    with pytest.raises(ValueError):
        png.encode_rgb(0, 2, b"")


def test_png_decoder_undoes_every_filter():
    """The test decoder itself, on rows written with filters 1-4 by hand."""
    w, h = 3, 5
    rows = [bytes(random.Random(y).randbytes(w * 3)) for y in range(h)]
    raw = bytearray()
    prev = bytes(w * 3)
    for ftype, row in zip((0, 1, 2, 3, 4), rows):
        line = bytearray(row)
        for i in range(len(row)):
            a = row[i - 3] if i >= 3 else 0
            b = prev[i]
            c = prev[i - 3] if i >= 3 else 0
            pred = {0: 0, 1: a, 2: b, 3: (a + b) // 2, 4: png._paeth(a, b, c)}[ftype]
            line[i] = (row[i] - pred) & 0xFF
        raw += bytes([ftype]) + line
        prev = row
    import struct
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = png.SIGNATURE + png._chunk(b"IHDR", ihdr) + png._chunk(b"IDAT", zlib.compress(bytes(raw))) \
        + png._chunk(b"IEND", b"")
    assert png.decode_rgb(data) == (w, h, b"".join(rows))


def test_updates_compose_and_a_new_size_starts_black():
    sink = FrameSink()
    sink.set_scanout(0, 8, 4)
    full = bytes(random.Random(1).randbytes(8 * 4 * 4))
    sink.update(0, 0, 0, 8, 4, full)
    patch = bytes([1, 2, 3, 0]) * 6
    sink.update(0, 5, 2, 3, 2, patch)
    expected = bytearray(full)
    for r in range(2):
        start = ((2 + r) * 8 + 5) * 4
        expected[start:start + 12] = patch[:12]
    assert sink.frame(0).rgb == rgb_of(bytes(expected))
    sink.set_scanout(0, 8, 4)  # the same size: the picture stays
    assert sink.frame(0).rgb == rgb_of(bytes(expected))
    sink.set_scanout(0, 4, 4)
    assert sink.frame(0).rgb == bytes(4 * 4 * 3)
    sink.set_scanout(0, 0, 0)
    with pytest.raises(LookupError):
        sink.frame(0)


def cursor_image(alpha_at: dict[tuple[int, int], tuple[int, int, int, int]]) -> bytes:
    img = bytearray(CURSOR_SIZE * CURSOR_SIZE * 4)
    for (x, y), (r, g, b, a) in alpha_at.items():
        img[(y * CURSOR_SIZE + x) * 4:(y * CURSOR_SIZE + x) * 4 + 4] = bytes([b, g, r, a])
    return bytes(img)


def test_the_cursor_is_drawn_only_on_request_at_its_hot_spot():
    sink = FrameSink()
    sink.set_scanout(0, 100, 80)
    sink.update(0, 0, 0, 100, 80, bytes([10, 20, 30, 0]) * (100 * 80))  # R 30, G 20, B 10
    img = cursor_image({(0, 0): (255, 255, 255, 255), (5, 6): (200, 0, 100, 128), (63, 63): (0, 0, 0, 255)})
    sink.cursor_update(0, 50, 40, 5, 6, img)
    plain = sink.frame(0)
    assert plain.pixel(50, 40) == (30, 20, 10)
    drawn = sink.frame(0, cursor=True)
    # the hot spot (5, 6) of the image is at (50, 40)
    assert drawn.pixel(45, 34) == (255, 255, 255)
    assert drawn.pixel(50, 40) == ((200 * 128 + 30 * 127 + 127) // 255, (0 * 128 + 20 * 127 + 127) // 255,
                                   (100 * 128 + 10 * 127 + 127) // 255)
    assert drawn.pixel(46, 34) == (30, 20, 10)  # transparent cursor pixels leave the picture
    # (63, 63) of the image falls at (108, 97): outside, clipped
    changed = [i for i in range(0, len(plain.rgb), 3) if plain.rgb[i:i + 3] != drawn.rgb[i:i + 3]]
    assert len(changed) == 2
    sink.cursor_move(0, 10, 10, False)
    assert sink.frame(0, cursor=True) == plain
    sink.cursor_move(0, 5, 6, True)
    assert sink.frame(0, cursor=True).pixel(0, 0) == (255, 255, 255)
    sink.cursor_move(1, 5, 6, True)  # on another scanout
    assert sink.frame(0, cursor=True) == plain


def test_a_cursor_move_before_any_image_shows_nothing():
    sink = FrameSink(draw_cursor=True)
    sink.set_scanout(0, 4, 4)
    sink.cursor_move(0, 1, 1, True)
    assert sink.frame(0).rgb == bytes(4 * 4 * 3)


async def test_pngs_on_request_and_on_every_flush(tmp_path):
    sink = FrameSink(output_dir=str(tmp_path), png_every_flush=True, name="t")
    sink.set_scanout(0, 6, 5)
    first = bytes(random.Random(2).randbytes(6 * 5 * 4))
    sink.update(0, 0, 0, 6, 5, first)
    await sink.presented(0)
    sink.update(0, 1, 1, 2, 2, bytes(16))
    await sink.presented(0)
    names = sorted(os.listdir(tmp_path))
    assert names == ["t-scanout0-00001.png", "t-scanout0-00002.png"]
    assert png.read_rgb(str(tmp_path / names[0])) == (6, 5, rgb_of(first))
    w, h, second = png.read_rgb(str(tmp_path / names[1]))
    assert second != rgb_of(first) and second[(1 * 6 + 1) * 3:(1 * 6 + 3) * 3] == bytes(6)
    sink.set_scanout(2, 3, 3)
    paths = await sink.snapshot()
    assert [os.path.basename(p) for p in paths] == ["t-scanout0-00003.png", "t-scanout2-00004.png"]
    assert png.read_rgb(paths[1]) == (3, 3, bytes(27))
    assert sink.last_png == {0: paths[0], 2: paths[1]}


async def test_no_pngs_without_an_output_directory():
    with pytest.raises(ValueError, match="output directory"):
        FrameSink(png_every_flush=True)
    sink = FrameSink()
    sink.set_scanout(0, 2, 2)
    await sink.presented(0)
    with pytest.raises(ValueError, match="--gpu-output"):
        await sink.write_png(0)


async def test_a_png_that_cannot_be_written_is_one_error_and_the_frames_go_on(tmp_path, caplog):
    out = tmp_path / "frames"
    out.mkdir()
    sink = FrameSink(output_dir=str(out), png_every_flush=True, name="t")
    sink.set_scanout(0, 2, 2)
    out.rmdir()
    for _ in range(3):
        await sink.presented(0)
    assert sink.flushes == 3 and "No such file or directory" in sink.png_error
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [
        f"t: cannot write PNG snapshots: {sink.png_error}"]
    out.mkdir()
    await sink.presented(0)
    assert sink.png_error is None and len(os.listdir(out)) == 1
